//! Which connections a member keeps. A bounded set: enough for gossip and
//! the DHT (dialed among the members it knows, at random, while it holds
//! fewer than `target_peers`), plus those its calls and stage streams open
//! on demand, and those a relay reservation links it to (either way);
//! above `max_peers`, connections that carry no stage stream, call or
//! reservation and have been up for [`GRACE`] close, picked at random.
//!
//! Departures (SWIM's suspicion and confirmation in one step, a dial
//! standing in for its indirect pings): when a connection that had been up
//! for [`PROBE_AFTER`] is lost without this node closing it, the member is
//! probed with a dial. A probe that fails, or brings no connection within
//! [`PROBE_TIMEOUT`], sends a signed departure notice that removes the
//! member from every view; one that succeeds is closed at once (the member
//! lives, and shed the connection) and the member is not dialed again for
//! a while. Probes are brief, so their closing never starts another.
//!
//! [`Keeper`] is the sans-I/O bookkeeping; the swarm task's glue follows.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fogmesh_protocols::{Departure, Message, NodeId};
use libp2p::PeerId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use rand::seq::SliceRandom;

use super::event_loop::Runner;
use super::gossip::DEPARTURE_TOPIC;

/// Peers a member dials on its own, by default.
pub const DEFAULT_TARGET_PEERS: usize = 6;
/// Connected peers above which idle connections close, by default.
pub const DEFAULT_MAX_PEERS: usize = 16;
/// How long a connection is up before it may be trimmed, or its loss
/// probed.
pub const GRACE: Duration = Duration::from_secs(15);
/// How long a connection is up before its loss is probed: longer than a
/// probe's own connection lives (the prober closes it as soon as it is up),
/// shorter than a churned connection (a member whose links were all
/// recent still gets probed when it vanishes).
pub const PROBE_AFTER: Duration = Duration::from_secs(3);
/// How long a probe may take to connect.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Open stage streams per peer: counted by the handles' streams, read by
/// the swarm task (a connection carrying one is never trimmed).
pub type StreamUse = Arc<Mutex<HashMap<PeerId, u32>>>;

/// Counts one open stage stream to a peer for as long as it lives.
#[derive(Debug)]
pub struct InUse {
    peer: PeerId,
    book: StreamUse,
}

impl InUse {
    /// Counts a stream to `peer` in `book`.
    pub fn new(peer: PeerId, book: &StreamUse) -> Self {
        *book.lock().unwrap_or_else(|e| e.into_inner()).entry(peer).or_insert(0) += 1;
        InUse { peer, book: book.clone() }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut b = self.book.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = b.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                b.remove(&self.peer);
            }
        }
    }
}

/// The connection bookkeeping: when each peer's connection came up, the
/// ones this node is closing, and the probes out.
#[derive(Debug, Default)]
pub struct Keeper {
    since: HashMap<PeerId, Instant>,
    closing: HashSet<PeerId>,
    probes: HashMap<PeerId, Instant>,
}

/// What a peer's last connection going down calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// This node closed it (a trim or a finished probe): nothing.
    ByUs,
    /// Lost within [`PROBE_AFTER`] (a probe's own connection): tell the
    /// node, probe nothing.
    Brief,
    /// Lost after [`PROBE_AFTER`]: tell the node, and probe the peer.
    Probe,
}

impl Keeper {
    /// `peer`'s first connection came up at `now`; returns whether it
    /// answers a probe.
    pub fn up(&mut self, peer: PeerId, now: Instant) -> bool {
        self.since.entry(peer).or_insert(now);
        self.probes.remove(&peer).is_some()
    }

    /// `peer`'s last connection went down at `now`.
    pub fn down(&mut self, peer: PeerId, now: Instant) -> Down {
        let since = self.since.remove(&peer);
        if self.closing.remove(&peer) {
            Down::ByUs
        } else if since.is_some_and(|t| now.saturating_duration_since(t) >= PROBE_AFTER) {
            Down::Probe
        } else {
            Down::Brief
        }
    }

    /// This node closes `peer`'s connections.
    pub fn close(&mut self, peer: PeerId) {
        self.closing.insert(peer);
    }

    /// A probe of `peer` starts at `now`.
    pub fn probe(&mut self, peer: PeerId, now: Instant) {
        self.probes.insert(peer, now);
    }

    /// A dial to `peer` failed: whether it was a probe (now failed).
    pub fn dial_failed(&mut self, peer: &PeerId) -> bool {
        self.probes.remove(peer).is_some()
    }

    /// Probes out longer than [`PROBE_TIMEOUT`] at `now` (they failed).
    pub fn overdue(&mut self, now: Instant) -> Vec<PeerId> {
        let late: Vec<PeerId> =
            self.probes.iter().filter(|(_, t)| now.saturating_duration_since(**t) > PROBE_TIMEOUT).map(|(p, _)| *p).collect();
        for p in &late {
            self.probes.remove(p);
        }
        late
    }

    /// Of `connected`, the connections to close: of those up for [`GRACE`]
    /// and not `busy` (nor closing already), at random, the ones not `kept`
    /// while more than `target` remain, then kept ones while more than
    /// `max` remain.
    pub fn victims(
        &self,
        connected: &[PeerId],
        (target, max): (usize, usize),
        now: Instant,
        busy: impl Fn(&PeerId) -> bool,
        kept: impl Fn(&PeerId) -> bool,
    ) -> Vec<PeerId> {
        let mut open = connected.iter().filter(|p| !self.closing.contains(p)).count();
        let mut idle: Vec<PeerId> = connected
            .iter()
            .filter(|p| !self.closing.contains(p) && !busy(p))
            .filter(|p| self.since.get(p).is_some_and(|t| now.saturating_duration_since(*t) >= GRACE))
            .copied()
            .collect();
        idle.sort();
        idle.shuffle(&mut rand::rng());
        // Not kept first.
        idle.sort_by_key(|p| kept(p));
        let mut out = Vec::new();
        for p in idle {
            let bound = if kept(&p) { max } else { target };
            if open <= bound {
                continue;
            }
            open -= 1;
            out.push(p);
        }
        out
    }
}

impl Runner {
    /// Connections kept in bounds, on every tick: dials while below the
    /// target, trims above the maximum, and sends the departure notices of
    /// failed probes.
    pub(super) fn keep_connections(&mut self, now: Instant) {
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        let pending = self.swarm.network_info().connection_counters().num_pending_outgoing() as usize;
        let want = self.cfg.target_peers.saturating_sub(connected.len() + pending);
        if want > 0 {
            let swarm = &self.swarm;
            for (peer, addrs) in self.candidates.due(now, |p| swarm.is_connected(p), want) {
                self.dial_peer(peer, addrs);
            }
        }
        let streams = self.stream_use.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.recent_calls.retain(|_, t| now.saturating_duration_since(*t) < GRACE);
        let calling: HashSet<PeerId> = self.pending.values().map(|(p, _)| *p).chain(self.recent_calls.keys().copied()).collect();
        let reach = &self.reach;
        let busy = |p: &PeerId| streams.contains_key(p) || calling.contains(p) || reach.relay_in_use(p);
        // The gossip mesh's links are the ones kept: gossipsub grafts them
        // on both ends, so neither end trims what the other relies on.
        let mesh: HashSet<PeerId> = self.swarm.behaviour().gossipsub.all_mesh_peers().copied().collect();
        let bounds = (self.cfg.target_peers, self.cfg.max_peers);
        for p in self.keeper.victims(&connected, bounds, now, busy, |p| mesh.contains(p)) {
            tracing::debug!(peer = %p, "closing an idle connection");
            self.keeper.close(p);
            self.candidates.shed(&p, now);
            let _ = self.swarm.disconnect_peer_id(p);
        }
        for p in self.keeper.overdue(now) {
            self.depart(p, "a probe found no answer", now);
        }
    }

    /// `peer`'s first connection is up.
    pub(super) fn connection_up(&mut self, peer: PeerId, now: Instant) {
        if self.keeper.up(peer, now) {
            // It lives; it had shed the connection, so the probe closes and
            // the dialer looks elsewhere for a while.
            tracing::debug!(%peer, "probe answered");
            self.keeper.close(peer);
            self.candidates.shed(&peer, now);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// `peer`'s last connection is down.
    pub(super) fn connection_down(&mut self, peer: PeerId, now: Instant) {
        let how = self.keeper.down(peer, now);
        if how == Down::ByUs {
            return;
        }
        let _ = self.lost.send(peer);
        if how == Down::Probe && self.membership.contains(&peer) {
            self.keeper.probe(peer, now);
            let opts = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).allocate_new_port().build();
            match self.swarm.dial(opts) {
                // A dial to it is under way already: its outcome answers
                // the probe.
                Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                Err(e) => {
                    self.keeper.dial_failed(&peer);
                    self.depart(peer, &format!("cannot dial it: {e}"), now);
                }
            }
        }
    }

    /// A dial to `peer` failed.
    pub(super) fn dial_failed(&mut self, peer: PeerId, now: Instant) {
        self.candidates.failed(&peer);
        if self.keeper.dial_failed(&peer) {
            self.depart(peer, "a probe could not reach it", now);
        }
    }

    /// `peer` has gone: out of this view, and a notice to every other.
    pub(super) fn depart(&mut self, peer: PeerId, why: &str, now: Instant) {
        let seen = self.membership.newest_report_ms(&peer).unwrap_or(0);
        let me = NodeId::from(self.swarm.local_peer_id().to_string());
        let notice = Message::Departure(Departure { peer: me, gone: NodeId::from(peer.to_string()), last_heard_ms: seen });
        self.publish(DEPARTURE_TOPIC, &notice);
        if self.membership.departed(peer, seen, now) {
            tracing::info!(%peer, why, "peer left the view");
            self.swarm.behaviour_mut().book.set(peer, Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_idle_connections_past_the_grace_down_to_the_maximum() {
        let t0 = Instant::now();
        let mut k = Keeper::default();
        let peers: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        for p in &peers[..5] {
            k.up(*p, t0);
        }
        let late = t0 + GRACE;
        k.up(peers[5], late);
        let all = |_: &PeerId| true;
        assert!(k.victims(&peers, (2, 6), late, |_| false, all).is_empty(), "kept, within the maximum");
        // Two over the maximum: the young one and the busy one are spared.
        let busy = peers[0];
        let v = k.victims(&peers, (2, 4), late, |p| *p == busy, all);
        assert_eq!(v.len(), 2);
        assert!(!v.contains(&busy) && !v.contains(&peers[5]));
        // Closing ones count as gone already.
        for p in &v {
            k.close(*p);
        }
        assert!(k.victims(&peers, (2, 4), late, |_| false, all).is_empty());
        assert_eq!(k.down(v[0], late), Down::ByUs);
        // Links not kept go down to the target; kept ones stay up to the
        // maximum.
        let mut k = Keeper::default();
        for p in &peers {
            k.up(*p, t0);
        }
        let kept = |p: &PeerId| *p == peers[1] || *p == peers[2];
        let v = k.victims(&peers, (3, 16), late, |_| false, kept);
        assert_eq!(v.len(), 3);
        assert!(!v.contains(&peers[1]) && !v.contains(&peers[2]));
    }

    #[test]
    fn a_long_connection_lost_is_probed_and_a_brief_one_is_not() {
        let t0 = Instant::now();
        let mut k = Keeper::default();
        let (old, young) = (PeerId::random(), PeerId::random());
        k.up(old, t0);
        k.up(young, t0 + GRACE);
        assert_eq!(k.down(old, t0 + GRACE), Down::Probe);
        assert_eq!(k.down(young, t0 + GRACE + Duration::from_secs(1)), Down::Brief);
        let recent = PeerId::random();
        k.up(recent, t0);
        assert_eq!(k.down(recent, t0 + PROBE_AFTER), Down::Probe, "shorter than the grace, longer than a probe");
        // A probe answered, one failed, one overdue.
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        for p in [a, b, c] {
            k.probe(p, t0);
        }
        assert!(k.up(a, t0), "the probe's connection");
        assert!(k.dial_failed(&b));
        assert!(!k.dial_failed(&b), "once");
        assert!(k.overdue(t0 + PROBE_TIMEOUT).is_empty());
        assert_eq!(k.overdue(t0 + PROBE_TIMEOUT + Duration::from_millis(1)), vec![c]);
    }

    #[test]
    fn stream_use_counts_until_the_last_stream_drops() {
        let book = StreamUse::default();
        let p = PeerId::random();
        let a = InUse::new(p, &book);
        let b = InUse::new(p, &book);
        assert_eq!(book.lock().unwrap()[&p], 2);
        drop(a);
        assert_eq!(book.lock().unwrap()[&p], 1);
        drop(b);
        assert!(book.lock().unwrap().is_empty());
    }
}
