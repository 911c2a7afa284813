//! Reachability: whether this peer can be dialed from outside (AutoNAT's
//! verdict), the relays it holds a reservation on while it cannot, and the
//! kind of each link (direct, direct after a hole punch, relayed).
//! Sans-I/O: the swarm task feeds it events with the current time and
//! performs the dials and listens it asks for; tests drive it with a fake
//! clock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// Relays a peer behind NAT keeps a reservation on at once.
pub const MAX_RELAYS: usize = 2;
/// First wait before retrying a reservation that failed (doubling).
pub const MIN_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between reservation attempts on one relay.
pub const MAX_RETRY: Duration = Duration::from_secs(60);
/// Relay candidates remembered at most.
pub const MAX_CANDIDATES: usize = 64;

/// Whether this peer can be reached from outside, as AutoNAT found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Nat {
    /// Not probed yet (or no peer could probe it).
    #[default]
    Unknown,
    /// Peers dialed it back: it can serve as a relay.
    Public,
    /// Dial-backs failed: behind NAT or a firewall; it reserves relay slots.
    Private,
}

/// How this peer reaches another one now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    /// A direct connection (the LAN, a routed network, a public address).
    Direct,
    /// A direct connection made by hole punching through NAT.
    HolePunched,
    /// Only through a relay peer's circuit.
    Relayed,
}

impl LinkKind {
    /// The name the status view prints.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Direct => "direct",
            LinkKind::HolePunched => "hole-punched",
            LinkKind::Relayed => "relayed",
        }
    }
}

/// Whether `addr` goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

fn ip_of(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

/// A relay this peer may reserve a slot on.
#[derive(Debug, Clone)]
struct Relay {
    /// Where we reached it directly.
    addr: Multiaddr,
    /// A reservation asked for or held.
    listening: bool,
    /// Whether the relay accepted it.
    reserved: bool,
    next_try: Instant,
    backoff: Duration,
}

/// The reachability state of one peer.
#[derive(Debug)]
pub struct Reach {
    nat: Nat,
    relays: BTreeMap<PeerId, Relay>,
    /// Open connections: to whom, and whether through a relay.
    conns: HashMap<ConnectionId, (PeerId, bool)>,
    /// The open connections we dialed.
    dialed: HashSet<ConnectionId>,
    /// Peers whose direct connection came from a hole punch.
    punched: HashSet<PeerId>,
    /// A peer saw us at an address that is none of ours: a NAT rewrote it.
    translated: bool,
    /// Peers holding a reservation on this node (it relays for them).
    hosted: HashSet<PeerId>,
}

impl Default for Reach {
    fn default() -> Self {
        Self::new()
    }
}

impl Reach {
    /// Nothing known yet.
    pub fn new() -> Self {
        Reach { nat: Nat::Unknown, relays: BTreeMap::new(), conns: HashMap::new(), dialed: HashSet::new(), punched: HashSet::new(), translated: false, hosted: HashSet::new() }
    }

    /// AutoNAT's latest verdict.
    pub fn nat(&self) -> Nat {
        self.nat
    }

    /// AutoNAT changed its verdict.
    pub fn set_nat(&mut self, nat: Nat, now: Instant) {
        self.nat = nat;
        if nat == Nat::Private {
            for r in self.relays.values_mut() {
                r.next_try = r.next_try.min(now);
            }
        }
    }

    /// A peer told us (identify) the address it sees us at; `ours` are our
    /// listen addresses. An IP that is none of ours means a NAT rewrote
    /// it: until AutoNAT has a verdict (its dial-backs to a silent NAT
    /// take a dial timeout), that is reason enough to reserve a relay slot.
    pub fn observed(&mut self, seen: &Multiaddr, ours: &[Multiaddr], now: Instant) {
        if is_relayed(seen) || self.translated {
            return;
        }
        let Some(ip) = ip_of(seen) else { return };
        if ip.is_loopback() || ip.is_unspecified() || ours.iter().any(|a| ip_of(a) == Some(ip)) {
            return;
        }
        self.translated = true;
        for r in self.relays.values_mut() {
            r.next_try = r.next_try.min(now);
        }
    }

    /// A connection opened: `addr` is the address we dialed (None when the
    /// peer dialed us), `relayed` whether it runs through a relay.
    pub fn connected(&mut self, id: ConnectionId, peer: PeerId, addr: Option<&Multiaddr>, relayed: bool, now: Instant) {
        self.conns.insert(id, (peer, relayed));
        if addr.is_some() {
            self.dialed.insert(id);
        }
        // A peer we could dial directly ourselves is a relay candidate; the
        // relay itself refuses reservations until it knows it is public.
        let Some(addr) = addr.filter(|_| !relayed) else { return };
        if self.relays.len() < MAX_CANDIDATES || self.relays.contains_key(&peer) {
            let base: Multiaddr = addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect();
            self.relays
                .entry(peer)
                .and_modify(|r| r.addr = base.clone())
                .or_insert(Relay { addr: base, listening: false, reserved: false, next_try: now, backoff: MIN_RETRY });
        }
    }

    /// A connection closed.
    pub fn closed(&mut self, id: ConnectionId) {
        self.dialed.remove(&id);
        if let Some((peer, _)) = self.conns.remove(&id) {
            if !self.conns.values().any(|(p, _)| *p == peer) {
                self.punched.remove(&peer);
            }
        }
    }

    /// A hole punch to `peer` succeeded; returns the relayed connections to
    /// it, which the caller closes so that traffic moves to the direct one.
    pub fn hole_punched(&mut self, peer: PeerId) -> Vec<ConnectionId> {
        self.punched.insert(peer);
        // Behind NAT itself: no relay for us (its direct connection came
        // from our dial, which made it look like a candidate).
        if self.relays.get(&peer).is_some_and(|r| !r.listening) {
            self.relays.remove(&peer);
        }
        self.conns.iter().filter(|(_, (p, relayed))| *p == peer && *relayed).map(|(id, _)| *id).collect()
    }

    /// We dialed `peer` back for its AutoNAT probe, and it worked: the
    /// connection that dial made (our newest dialed one to it), to close
    /// unless it is the only one (a probe should not leave a second
    /// connection behind).
    pub fn dial_back_done(&self, peer: &PeerId) -> Option<ConnectionId> {
        let to_peer: Vec<ConnectionId> = self.conns.iter().filter(|(_, (p, _))| p == peer).map(|(id, _)| *id).collect();
        if to_peer.len() < 2 {
            return None;
        }
        to_peer.into_iter().filter(|id| self.dialed.contains(id)).max()
    }

    /// Whether a reservation links us to `peer`: one we asked for or hold
    /// on it, or one it holds on us (the connection carries a relayed
    /// address: never trimmed).
    pub fn relay_in_use(&self, peer: &PeerId) -> bool {
        self.relays.get(peer).is_some_and(|r| r.listening) || self.hosted.contains(peer)
    }

    /// `peer` holds a reservation on this node (at most `limit` counted:
    /// the relay server's own bound).
    pub fn hosting(&mut self, peer: PeerId, limit: usize) {
        if self.hosted.len() < limit {
            self.hosted.insert(peer);
        }
    }

    /// `peer`'s reservation on this node ended.
    pub fn hosting_ended(&mut self, peer: &PeerId) {
        self.hosted.remove(peer);
    }

    /// How this peer reaches `peer` now (None without a connection).
    pub fn link(&self, peer: &PeerId) -> Option<LinkKind> {
        let mut relayed = false;
        for (p, r) in self.conns.values() {
            if p == peer {
                if !*r {
                    return Some(if self.punched.contains(peer) { LinkKind::HolePunched } else { LinkKind::Direct });
                }
                relayed = true;
            }
        }
        relayed.then_some(LinkKind::Relayed)
    }

    /// The relay addresses to listen on now (`/…/p2p/RELAY/p2p-circuit`):
    /// while AutoNAT says private (or, before its verdict, a peer saw our
    /// address rewritten by a NAT), up to [`MAX_RELAYS`] reservations, each
    /// relay retried with backoff after a failure.
    pub fn due(&mut self, now: Instant, connected: impl Fn(&PeerId) -> bool) -> Vec<(PeerId, Multiaddr)> {
        let behind = self.nat == Nat::Private || (self.nat == Nat::Unknown && self.translated);
        if !behind {
            return Vec::new();
        }
        let held = self.relays.values().filter(|r| r.listening).count();
        let mut out = Vec::new();
        for (peer, r) in self.relays.iter_mut() {
            if held + out.len() >= MAX_RELAYS {
                break;
            }
            if r.listening || r.next_try > now || !connected(peer) {
                continue;
            }
            r.listening = true;
            r.next_try = now + r.backoff;
            r.backoff = (r.backoff * 2).min(MAX_RETRY);
            out.push((*peer, r.addr.clone().with(Protocol::P2p(*peer)).with(Protocol::P2pCircuit)));
        }
        out
    }

    /// The relay accepted our reservation.
    pub fn reserved(&mut self, relay: PeerId) {
        if let Some(r) = self.relays.get_mut(&relay) {
            r.reserved = true;
            r.backoff = MIN_RETRY;
        }
    }

    /// Our reservation on `relay` ended or was refused: it may be tried
    /// again after its backoff.
    pub fn reservation_lost(&mut self, relay: PeerId) {
        if let Some(r) = self.relays.get_mut(&relay) {
            r.listening = false;
            r.reserved = false;
        }
    }

    /// Relays holding a reservation for us.
    pub fn reservations(&self) -> Vec<PeerId> {
        self.relays.iter().filter(|(_, r)| r.reserved).map(|(p, _)| *p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(i: usize) -> ConnectionId {
        ConnectionId::new_unchecked(i)
    }

    #[test]
    fn a_private_peer_reserves_on_peers_it_dialed_and_retries_with_backoff() {
        let t = Instant::now();
        let mut r = Reach::new();
        let (relay, other) = (PeerId::random(), PeerId::random());
        let addr: Multiaddr = format!("/ip4/10.88.0.1/tcp/4001/p2p/{relay}").parse().unwrap();
        r.connected(conn(1), relay, Some(&addr), false, t);
        r.connected(conn(2), other, None, false, t);
        assert!(r.due(t, |_| true).is_empty(), "no reservation while AutoNAT has not said private");
        let ours: Vec<Multiaddr> = vec!["/ip4/10.88.2.1/tcp/4001".parse().unwrap(), "/ip4/127.0.0.1/tcp/4001".parse().unwrap()];
        r.observed(&"/ip4/10.88.2.1/tcp/4001".parse().unwrap(), &ours, t);
        assert!(r.due(t, |_| true).is_empty(), "seen at our own address: no NAT");
        r.set_nat(Nat::Private, t);
        let due = r.due(t, |_| true);
        assert_eq!(due.len(), 1, "only the peer we dialed is a relay candidate: {due:?}");
        assert_eq!(due[0].1.to_string(), format!("/ip4/10.88.0.1/tcp/4001/p2p/{relay}/p2p-circuit"));
        assert!(r.due(t + MAX_RETRY, |_| true).is_empty(), "one listen at a time per relay");
        // Refused (the relay is not public yet): retried after the backoff.
        r.reservation_lost(relay);
        assert!(r.due(t + MIN_RETRY / 2, |_| true).is_empty());
        assert_eq!(r.due(t + MIN_RETRY, |_| true).len(), 1);
        r.reserved(relay);
        assert_eq!(r.reservations(), vec![relay]);
        assert!(r.relay_in_use(&relay) && !r.relay_in_use(&other), "the relay's connection is not trimmed");
        // Not while disconnected from it.
        r.reservation_lost(relay);
        assert!(!r.relay_in_use(&relay));
        // The other way: a peer holding a reservation on us.
        r.hosting(other, 1);
        r.hosting(PeerId::random(), 1);
        assert!(r.relay_in_use(&other));
        r.hosting_ended(&other);
        assert!(!r.relay_in_use(&other));
        assert!(r.due(t + MAX_RETRY * 4, |_| false).is_empty());
    }

    #[test]
    fn an_address_rewritten_by_a_nat_reserves_before_autonat_says_so_unless_it_says_public() {
        let t = Instant::now();
        let mut r = Reach::new();
        let relay = PeerId::random();
        r.connected(conn(1), relay, Some(&"/ip4/10.88.0.1/tcp/4001".parse().unwrap()), false, t);
        let ours: Vec<Multiaddr> = vec!["/ip4/10.88.2.1/tcp/4001".parse().unwrap()];
        r.observed(&"/ip4/10.88.0.2/tcp/4001".parse().unwrap(), &ours, t);
        assert_eq!(r.due(t, |_| true).len(), 1, "a NAT rewrote our address");
        r.reservation_lost(relay);
        r.set_nat(Nat::Public, t);
        assert!(r.due(t + MAX_RETRY, |_| true).is_empty(), "reachable after all: no relay needed");
    }

    #[test]
    fn a_dial_back_leaves_no_second_connection() {
        let mut r = Reach::new();
        let p = PeerId::random();
        r.connected(conn(1), p, None, false, Instant::now());
        assert_eq!(r.dial_back_done(&p), None, "the only connection stays");
        r.connected(conn(2), p, Some(&"/ip4/10.0.0.2/tcp/4001".parse().unwrap()), false, Instant::now());
        assert_eq!(r.dial_back_done(&p), Some(conn(2)));
        r.closed(conn(2));
        assert_eq!(r.dial_back_done(&p), None);
    }

    #[test]
    fn link_kinds_follow_connections_and_hole_punches() {
        let mut r = Reach::new();
        let p = PeerId::random();
        let circuit: Multiaddr = format!("/ip4/10.88.0.1/tcp/4001/p2p/{}/p2p-circuit/p2p/{p}", PeerId::random()).parse().unwrap();
        assert!(is_relayed(&circuit));
        assert_eq!(r.link(&p), None);
        r.connected(conn(1), p, Some(&circuit), true, Instant::now());
        assert_eq!(r.link(&p), Some(LinkKind::Relayed));
        assert!(r.relays.is_empty(), "a peer reached through a relay is no relay candidate");
        r.connected(conn(2), p, None, false, Instant::now());
        assert_eq!(r.hole_punched(p), vec![conn(1)], "the relayed connection is to close");
        r.closed(conn(1));
        assert_eq!(r.link(&p), Some(LinkKind::HolePunched));
        r.closed(conn(2));
        assert_eq!(r.link(&p), None);
        r.connected(conn(3), p, None, false, Instant::now());
        assert_eq!(r.link(&p), Some(LinkKind::Direct), "a new connection after the punch is plain direct");
    }
}
