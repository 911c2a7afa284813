//! The membership view: which peers this node knows to be alive, and what they
//! said about themselves. Sans-I/O: the swarm task feeds it events with the
//! current time, and reads it back; tests drive it with a fake clock.
//!
//! ## When does a peer leave the view?
//! A peer stays in the view while it has an open connection to us, or while
//! something from it (a ping answer, an identify record, a gossip message) is
//! younger than [`Membership::ttl`]. A peer that stops — gracefully, killed,
//! or cut off — therefore leaves within `ttl` after its connection closes. A
//! silent connection is closed by the swarm after [`MAX_PING_FAILURES`] failed
//! pings, so a host that vanishes without closing its sockets leaves within
//! `ttl + MAX_PING_FAILURES × (ping interval + ping timeout)`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use fogmesh_protocols::{Capabilities, LoadReport, ShardLoad};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use super::reach::LinkKind;

/// Consecutive failed pings after which the swarm task closes a connection.
pub const MAX_PING_FAILURES: u32 = 2;

/// Most addresses remembered per peer (the newest win).
pub const MAX_ADDRS_PER_PEER: usize = 8;

/// How a peer came to our attention (for the status view and debugging).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Multicast DNS on the local link.
    Mdns,
    /// The Kademlia DHT or a bootstrap address.
    Kad,
    /// A direct connection (identify, ping).
    Direct,
    /// A gossip message relayed by others.
    Gossip,
}

/// Members the view holds at most (meshes of hundreds are a goal; beyond
/// this, the unconnected member heard from least recently goes).
pub const MAX_MEMBERS: usize = 4096;

/// One peer as seen from here.
#[derive(Debug, Clone)]
struct Entry {
    addrs: Vec<Multiaddr>,
    caps: Option<Capabilities>,
    load: Vec<ShardLoad>,
    /// The sender's timestamp of the load report in `load`, once one came
    /// (older or replayed reports are ignored).
    load_ms: Option<u64>,
    rtt: Option<Duration>,
    last_seen: Instant,
    /// When it entered the view.
    since: Instant,
    connections: u32,
    sources: BTreeSet<Source>,
    agent: Option<String>,
    link: Option<LinkKind>,
}

/// A peer in the view, in the form the CLI and HTTP status print.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The libp2p peer id.
    pub peer_id: String,
    /// Addresses it is reachable at (as far as we know).
    pub addrs: Vec<String>,
    /// CPU cores it reported (0 until its capabilities arrive).
    pub cores: u32,
    /// Free memory it reported, in bytes.
    pub memory_bytes: u64,
    /// Its measured matmul speed.
    pub gflops: f32,
    /// Its fogmesh version ("" until known).
    pub version: String,
    /// Round-trip time from our last ping, if connected.
    pub rtt_ms: Option<f64>,
    /// Milliseconds since we last heard from it.
    pub last_seen_ms: u64,
    /// Open connections between us.
    pub connections: u32,
    /// How we learnt of it.
    pub sources: Vec<Source>,
    /// Shards it reported serving, as `[start, end, queue_depth]`.
    pub shards: Vec<[u32; 3]>,
    /// Its identify agent string, if received.
    pub agent: Option<String>,
    /// Models it holds locally, as hex SHA-256.
    #[serde(default)]
    pub models: Vec<String>,
    /// Of `models`, those it holds only in part: the chunks it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partial: Vec<HeldInfo>,
    /// Tokens per second its shards processed (from its last load report).
    #[serde(default)]
    pub tokens_per_s: f32,
    /// How this node reaches it now: `direct`, `hole-punched` or `relayed`
    /// (absent without a connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkKind>,
}

/// The chunks a peer holds of a model it holds in part.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldInfo {
    /// The model, hex SHA-256.
    pub model: String,
    /// How many chunks it holds.
    pub chunks: u32,
    /// One bit per chunk of the model's manifest (bit `i % 8` of byte
    /// `i / 8`), hex.
    pub bitmap: String,
}

/// The live view of the mesh.
#[derive(Debug, Clone)]
pub struct Membership {
    local: PeerId,
    ttl: Duration,
    peers: BTreeMap<PeerId, Entry>,
    /// Members removed by a departure notice or by the TTL, for three
    /// TTLs. A load report from them no newer than the last one seen is an
    /// echo, and does not bring them back.
    departed: BTreeMap<PeerId, Departed>,
}

/// What the view keeps of a member it removed.
#[derive(Debug, Clone)]
struct Departed {
    /// The newest report of theirs seen (their own clock): by the notice's
    /// reporter, or by this node when the TTL removed them.
    seen_ms: u64,
    /// When they were removed.
    at: Instant,
    /// Whether a departure notice removed them (then their capabilities
    /// alone, which carry no time and could be an echo, do not bring them
    /// back).
    notice: bool,
    /// Their capabilities, kept for their return: a newer load report
    /// brings the member back with them (a refutation's capabilities and
    /// load travel on two topics, and may arrive in either order; a member
    /// whose refresh is slower than this node's TTL comes back by its next
    /// report, not after its capabilities' next round).
    caps: Option<Capabilities>,
}

impl Membership {
    /// An empty view for the node `local`, forgetting silent, unconnected peers
    /// after `ttl`.
    pub fn new(local: PeerId, ttl: Duration) -> Self {
        Membership { local, ttl, peers: BTreeMap::new(), departed: BTreeMap::new() }
    }

    /// How long an unconnected peer is kept after it was last heard from.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Changes the TTL (it grows with the gossip cadence as the mesh does).
    pub fn set_ttl(&mut self, ttl: Duration) {
        self.ttl = ttl;
    }

    fn entry(&mut self, peer: PeerId, now: Instant) -> Option<&mut Entry> {
        if peer == self.local {
            return None;
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_MEMBERS {
            // Full: the unconnected peer heard from least recently makes
            // room; with every member connected, the newcomer waits.
            let victim = self.peers.iter().filter(|(_, e)| e.connections == 0).min_by_key(|(_, e)| e.last_seen).map(|(p, _)| *p)?;
            self.peers.remove(&victim);
        }
        Some(self.peers.entry(peer).or_insert_with(|| Entry {
            addrs: Vec::new(),
            caps: None,
            load: Vec::new(),
            load_ms: None,
            rtt: None,
            last_seen: now,
            since: now,
            connections: 0,
            sources: BTreeSet::new(),
            agent: None,
            link: None,
        }))
    }

    /// A connection to `peer` opened (through `addr`).
    pub fn connected(&mut self, peer: PeerId, addr: Option<Multiaddr>, now: Instant) {
        let held = self.departed.remove(&peer).and_then(|d| d.caps);
        if let Some(e) = self.entry(peer, now) {
            if e.caps.is_none() {
                e.caps = held;
            }
            e.connections += 1;
            e.last_seen = now;
            e.sources.insert(Source::Direct);
            if let Some(a) = addr {
                push_addr(&mut e.addrs, a);
            }
        }
    }

    /// How this node reaches `peer` now.
    pub fn set_link(&mut self, peer: PeerId, link: Option<LinkKind>) {
        if let Some(e) = self.peers.get_mut(&peer) {
            e.link = link;
        }
    }

    /// A connection to `peer` closed.
    pub fn disconnected(&mut self, peer: PeerId) {
        if let Some(e) = self.peers.get_mut(&peer) {
            e.connections = e.connections.saturating_sub(1);
            if e.connections == 0 {
                // From here the peer stays only while gossip keeps arriving
                // (`expire` counts the TTL from the last thing heard).
                e.rtt = None;
            }
        }
    }

    /// Identify told us `peer`'s listen addresses and agent string.
    pub fn identified(&mut self, peer: PeerId, addrs: &[Multiaddr], agent: &str, now: Instant) {
        if let Some(e) = self.entry(peer, now) {
            e.last_seen = now;
            e.agent = Some(agent.chars().take(128).collect());
            for a in addrs {
                push_addr(&mut e.addrs, a.clone());
            }
        }
    }

    /// Records that discovery (`source`) found `peer` at `addr`. This does not
    /// put an unknown peer in the view: a discovered peer appears once it has
    /// proved itself with a connection (so strangers without the cluster secret
    /// never do); it only remembers the address of a known one.
    pub fn discovered(&mut self, peer: PeerId, addr: Multiaddr, source: Source) {
        if let Some(e) = self.peers.get_mut(&peer) {
            e.sources.insert(source);
            push_addr(&mut e.addrs, addr);
        }
    }

    /// A ping to `peer` came back after `rtt`.
    pub fn ping(&mut self, peer: PeerId, rtt: Duration, now: Instant) {
        if let Some(e) = self.entry(peer, now) {
            e.rtt = Some(rtt);
            e.last_seen = now;
        }
    }

    /// A gossiped capabilities message whose signature says it came from
    /// `peer`, with the addresses it announced that are worth dialing.
    /// Returns whether they are the first of `peer`'s capabilities this
    /// view holds (new to it, or known only by a connection or a load
    /// report so far). A member a departure
    /// notice removed comes back only by a newer load report or a
    /// connection (capabilities carry no time, so an old copy could be an
    /// echo); until then they are held for it.
    pub fn capabilities(&mut self, peer: PeerId, caps: Capabilities, addrs: Vec<Multiaddr>, now: Instant) -> bool {
        let mut known = false;
        if let Some(d) = self.departed.get_mut(&peer) {
            if d.notice {
                // Held for the newer load report that may follow.
                d.caps = Some(caps);
                return false;
            }
            known = d.caps.is_some();
            self.departed.remove(&peer);
        }
        let new = !known && self.peers.get(&peer).is_none_or(|e| e.caps.is_none());
        if let Some(e) = self.entry(peer, now) {
            e.caps = Some(caps);
            e.last_seen = now;
            e.sources.insert(Source::Gossip);
            for a in addrs {
                push_addr(&mut e.addrs, a);
            }
            return new;
        }
        false
    }

    /// A gossiped load report whose signature says it came from `peer`.
    pub fn load(&mut self, peer: PeerId, report: LoadReport, now: Instant) {
        let mut held = None;
        if let Some(d) = self.departed.get(&peer) {
            if report.timestamp_ms <= d.seen_ms {
                return;
            }
            held = self.departed.remove(&peer).and_then(|d| d.caps);
        }
        if let Some(e) = self.entry(peer, now) {
            if e.caps.is_none() {
                e.caps = held;
            }
            if e.load_ms.is_some_and(|last| report.timestamp_ms <= last) {
                return;
            }
            e.load_ms = Some(report.timestamp_ms);
            e.load = report.shards;
            e.last_seen = now;
            e.sources.insert(Source::Gossip);
        }
    }

    /// The timestamp (its own clock) of the newest load report `peer` sent
    /// that reached this node.
    pub fn newest_report_ms(&self, peer: &PeerId) -> Option<u64> {
        self.peers.get(peer)?.load_ms
    }

    /// A departure notice: `gone` left, as far as a member that had heard
    /// its reports up to `seen_ms` (its clock) can tell. Removes it, unless
    /// this node holds a connection to it or has heard a newer report from
    /// it (the notice is stale, or false); returns whether it was removed.
    /// Until [`Membership::expire`] forgets the notice (after three TTLs),
    /// older reports of `gone` are ignored.
    pub fn departed(&mut self, gone: PeerId, seen_ms: u64, now: Instant) -> bool {
        if gone == self.local {
            return false;
        }
        if let Some(e) = self.peers.get(&gone) {
            if e.connections > 0 || e.load_ms.is_some_and(|ms| ms > seen_ms) {
                return false;
            }
        }
        let removed = self.peers.contains_key(&gone);
        self.remove(gone, seen_ms, true, now);
        removed
    }

    /// Takes `gone` out of the view, holding what `departed` keeps.
    fn remove(&mut self, gone: PeerId, seen_ms: u64, notice: bool, now: Instant) {
        if self.departed.len() >= MAX_MEMBERS && !self.departed.contains_key(&gone) {
            // Full: the oldest removal makes room.
            if let Some(old) = self.departed.iter().min_by_key(|(_, d)| d.at).map(|(p, _)| *p) {
                self.departed.remove(&old);
            }
        }
        let entry = self.peers.remove(&gone);
        let held = self.departed.entry(gone).or_insert(Departed { seen_ms, at: now, notice, caps: None });
        held.seen_ms = held.seen_ms.max(seen_ms);
        held.at = now;
        held.notice |= notice;
        if let Some(caps) = entry.and_then(|e| e.caps) {
            held.caps = Some(caps);
        }
    }

    /// Drops peers that are unconnected and silent for longer than the TTL;
    /// returns the ones dropped.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let ttl = self.ttl;
        self.departed.retain(|_, d| now.saturating_duration_since(d.at) <= ttl * 3);
        let gone: Vec<(PeerId, u64)> = self
            .peers
            .iter()
            .filter(|(_, e)| e.connections == 0 && now.saturating_duration_since(e.last_seen) > ttl)
            .map(|(p, e)| (*p, e.load_ms.unwrap_or(0)))
            .collect();
        for &(p, seen_ms) in &gone {
            self.remove(p, seen_ms, false, now);
        }
        gone.into_iter().map(|(p, _)| p).collect()
    }

    /// The members in the view.
    pub fn members(&self) -> impl Iterator<Item = &PeerId> {
        self.peers.keys()
    }

    /// Whether `peer` is in the view.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    /// Number of peers in the view.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Known addresses of `peer`.
    pub fn addrs(&self, peer: &PeerId) -> &[Multiaddr] {
        self.peers.get(peer).map(|e| e.addrs.as_slice()).unwrap_or(&[])
    }

    /// Whether `peer`'s capabilities have reached this node.
    pub fn has_capabilities(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|e| e.caps.is_some())
    }

    /// Members in the view for longer than `after` whose capabilities have
    /// not reached this node (known by a connection or a load report only).
    pub fn lacking_capabilities(&self, now: Instant, after: Duration) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.iter().filter(move |(_, e)| e.caps.is_none() && now.saturating_duration_since(e.since) >= after).map(|(p, _)| *p)
    }

    /// Whether we hold a connection to `peer`.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|e| e.connections > 0)
    }

    /// The view, sorted by peer id.
    pub fn snapshot(&self, now: Instant) -> Vec<PeerInfo> {
        self.peers
            .iter()
            .map(|(p, e)| {
                let caps = e.caps.as_ref();
                PeerInfo {
                    peer_id: p.to_string(),
                    addrs: e.addrs.iter().map(|a| a.to_string()).collect(),
                    cores: caps.map_or(0, |c| c.cores),
                    memory_bytes: caps.map_or(0, |c| c.memory_bytes),
                    gflops: caps.map_or(0.0, |c| c.gflops),
                    version: caps.map(|c| c.version.clone()).unwrap_or_default(),
                    rtt_ms: e.rtt.map(|d| d.as_secs_f64() * 1e3),
                    last_seen_ms: now.saturating_duration_since(e.last_seen).as_millis() as u64,
                    connections: e.connections,
                    sources: e.sources.iter().copied().collect(),
                    shards: e.load.iter().map(|s| [s.start, s.end, s.queue_depth]).collect(),
                    agent: e.agent.clone(),
                    models: caps.map(|c| c.models.iter().map(hex::encode).collect()).unwrap_or_default(),
                    partial: caps
                        .map(|c| {
                            c.partial
                                .iter()
                                .map(|h| HeldInfo {
                                    model: hex::encode(h.model),
                                    chunks: h.bitmap.iter().map(|b| b.count_ones()).sum(),
                                    bitmap: hex::encode(&h.bitmap),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    tokens_per_s: e.load.iter().map(|s| s.tokens_per_s).sum(),
                    link: e.link,
                }
            })
            .collect()
    }
}

fn push_addr(addrs: &mut Vec<Multiaddr>, a: Multiaddr) {
    if let Some(i) = addrs.iter().position(|x| *x == a) {
        addrs.remove(i);
    } else if addrs.len() >= MAX_ADDRS_PER_PEER {
        addrs.remove(0);
    }
    addrs.push(a);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(cores: u32) -> Capabilities {
        Capabilities {
            peer: Default::default(),
            cores,
            memory_bytes: 1 << 30,
            gflops: 10.0,
            version: "t".into(),
            models: vec![],
            partial: vec![],
            addrs: vec![],
            joining: false,
        }
    }

    #[test]
    fn discovery_alone_does_not_admit_a_peer() {
        let me = PeerId::random();
        let other = PeerId::random();
        let mut m = Membership::new(me, Duration::from_secs(5));
        m.discovered(other, "/ip4/10.0.0.2/tcp/1".parse().unwrap(), Source::Mdns);
        assert!(m.is_empty());
        let t = Instant::now();
        m.connected(other, None, t);
        m.discovered(other, "/ip4/10.0.0.2/tcp/1".parse().unwrap(), Source::Mdns);
        let s = m.snapshot(t);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].sources, vec![Source::Mdns, Source::Direct]);
    }

    #[test]
    fn replayed_or_older_load_reports_are_ignored() {
        let me = PeerId::random();
        let p = PeerId::random();
        let mut m = Membership::new(me, Duration::from_secs(5));
        let t = Instant::now();
        m.connected(p, None, t);
        let report = |ms: u64, queue: u32| LoadReport {
            peer: Default::default(),
            timestamp_ms: ms,
            shards: vec![ShardLoad { model: [0; 32], start: 0, end: 4, queue_depth: queue, tokens_per_s: 1.0 }],
        };
        m.load(p, report(100, 1), t);
        m.load(p, report(100, 9), t);
        m.load(p, report(50, 9), t);
        assert_eq!(m.snapshot(t)[0].shards, vec![[0, 4, 1]]);
        m.load(p, report(101, 2), t);
        assert_eq!(m.snapshot(t)[0].shards, vec![[0, 4, 2]]);
    }

    #[test]
    fn the_view_is_bounded_and_makes_room_by_dropping_the_stalest_unconnected_member() {
        let me = PeerId::random();
        let mut m = Membership::new(me, Duration::from_secs(600));
        let t0 = Instant::now();
        let connected = PeerId::random();
        m.connected(connected, None, t0);
        let first = PeerId::random();
        m.capabilities(first, caps(1), vec![], t0);
        for i in 0..MAX_MEMBERS + 100 {
            m.capabilities(PeerId::random(), caps(1), vec![], t0 + Duration::from_millis(1 + i as u64));
        }
        let s = m.snapshot(t0);
        assert_eq!(s.len(), MAX_MEMBERS);
        assert!(s.iter().any(|p| p.peer_id == connected.to_string()), "connected members stay");
        assert!(!s.iter().any(|p| p.peer_id == first.to_string()), "the stalest goes first");
    }

    #[test]
    fn never_lists_itself() {
        let me = PeerId::random();
        let mut m = Membership::new(me, Duration::from_secs(5));
        let t = Instant::now();
        m.connected(me, None, t);
        m.capabilities(me, caps(4), vec![], t);
        assert!(m.is_empty());
    }

    #[test]
    fn a_peer_leaves_within_ttl_after_its_connection_closes() {
        let me = PeerId::random();
        let p = PeerId::random();
        let ttl = Duration::from_secs(3);
        let mut m = Membership::new(me, ttl);
        let t0 = Instant::now();
        m.connected(p, None, t0);
        m.capabilities(p, caps(8), vec![], t0);
        m.ping(p, Duration::from_millis(2), t0);
        // Connected peers stay however long they are silent.
        assert!(m.expire(t0 + Duration::from_secs(60)).is_empty());
        let t1 = t0 + Duration::from_secs(61);
        m.ping(p, Duration::from_millis(2), t1);
        m.disconnected(p);
        assert!(m.expire(t1 + ttl).is_empty());
        assert_eq!(m.expire(t1 + ttl + Duration::from_millis(1)), vec![p]);
        assert!(m.is_empty());
    }

    #[test]
    fn gossip_keeps_an_unconnected_peer_alive() {
        let me = PeerId::random();
        let p = PeerId::random();
        let ttl = Duration::from_secs(3);
        let mut m = Membership::new(me, ttl);
        let t0 = Instant::now();
        m.capabilities(p, caps(2), vec![], t0);
        let report = LoadReport { peer: Default::default(), timestamp_ms: 0, shards: vec![] };
        m.load(p, report.clone(), t0 + Duration::from_secs(2));
        assert!(m.expire(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(m.expire(t0 + Duration::from_secs(6)), vec![p]);
        let s = m.snapshot(t0);
        assert!(s.is_empty());
    }

    #[test]
    fn a_member_the_ttl_removed_comes_back_by_its_next_report_with_its_capabilities() {
        let me = PeerId::random();
        let p = PeerId::random();
        let ttl = Duration::from_secs(3);
        let mut m = Membership::new(me, ttl);
        let t0 = Instant::now();
        let report = |ms: u64| LoadReport { peer: Default::default(), timestamp_ms: ms, shards: vec![] };
        m.capabilities(p, caps(5), vec![], t0);
        m.load(p, report(10), t0);
        assert_eq!(m.expire(t0 + 2 * ttl), vec![p]);
        // An echo of the last report does not bring it back; a newer one
        // does, with the capabilities it had.
        m.load(p, report(10), t0 + 2 * ttl);
        assert!(!m.contains(&p));
        m.load(p, report(11), t0 + 2 * ttl);
        assert_eq!(m.snapshot(t0)[0].cores, 5);

        // Capabilities heard again after a removal by the TTL bring it back
        // too, and are not news.
        assert_eq!(m.expire(t0 + 4 * ttl), vec![p]);
        assert!(!m.capabilities(p, caps(5), vec![], t0 + 4 * ttl));
        assert!(m.contains(&p));
        assert_eq!(m.lacking_capabilities(t0 + 6 * ttl, ttl).count(), 0);
        // One known by its load report alone lacks them, once past the wait.
        let q = PeerId::random();
        m.load(q, report(1), t0 + 4 * ttl);
        assert_eq!(m.lacking_capabilities(t0 + 4 * ttl, ttl).count(), 0);
        assert_eq!(m.lacking_capabilities(t0 + 5 * ttl, ttl).collect::<Vec<_>>(), vec![q]);
    }

    #[test]
    fn snapshot_reports_capabilities_and_rtt() {
        let me = PeerId::random();
        let p = PeerId::random();
        let mut m = Membership::new(me, Duration::from_secs(3));
        let t0 = Instant::now();
        m.connected(p, Some("/ip4/127.0.0.1/tcp/4001".parse().unwrap()), t0);
        m.capabilities(p, caps(6), vec![], t0);
        m.ping(p, Duration::from_micros(1500), t0);
        let s = &m.snapshot(t0 + Duration::from_millis(250))[0];
        assert_eq!(s.cores, 6);
        assert_eq!(s.memory_bytes, 1 << 30);
        assert_eq!(s.rtt_ms, Some(1.5));
        assert_eq!(s.last_seen_ms, 250);
        assert_eq!(s.addrs, vec!["/ip4/127.0.0.1/tcp/4001".to_string()]);
        m.disconnected(p);
        assert_eq!(m.snapshot(t0)[0].rtt_ms, None);
    }

    #[test]
    fn addresses_are_bounded_and_deduplicated() {
        let me = PeerId::random();
        let p = PeerId::random();
        let mut m = Membership::new(me, Duration::from_secs(3));
        let t0 = Instant::now();
        m.connected(p, None, t0);
        for i in 0..50u16 {
            let a: Multiaddr = format!("/ip4/10.0.0.1/tcp/{}", 1000 + i % 20).parse().unwrap();
            m.discovered(p, a, Source::Kad);
        }
        assert_eq!(m.addrs(&p).len(), MAX_ADDRS_PER_PEER);
        let mut sorted = m.addrs(&p).to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), MAX_ADDRS_PER_PEER);
    }

    #[test]
    fn a_departure_notice_removes_a_member_until_it_speaks_again() {
        let me = PeerId::random();
        let (p, linked) = (PeerId::random(), PeerId::random());
        let mut m = Membership::new(me, Duration::from_secs(10));
        let t0 = Instant::now();
        let report = |ms: u64| LoadReport { peer: Default::default(), timestamp_ms: ms, shards: vec![] };
        m.capabilities(p, caps(2), vec!["/ip4/10.0.0.9/tcp/1".parse().unwrap()], t0);
        m.load(p, report(100), t0);
        assert_eq!(m.addrs(&p).len(), 1, "announced addresses are kept for dials");
        // A notice that had seen less than this node has is stale.
        assert!(!m.departed(p, 99, t0));
        assert!(m.contains(&p));
        assert!(m.departed(p, 100, t0));
        assert!(!m.contains(&p));
        // Echoes of what it said before do not bring it back.
        m.capabilities(p, caps(2), vec![], t0);
        m.load(p, report(100), t0);
        assert!(!m.contains(&p));
        // Something newer from it refutes the notice, and it comes back
        // with the capabilities it had.
        m.load(p, report(101), t0);
        assert!(m.contains(&p));
        assert_eq!(m.snapshot(t0)[0].cores, 2);
        // A refutation whose capabilities arrive before its load report
        // (two topics, either order): held until the report readmits it.
        assert!(m.departed(p, 101, t0));
        assert!(!m.capabilities(p, caps(3), vec![], t0));
        assert!(!m.contains(&p));
        m.load(p, report(102), t0);
        assert_eq!(m.snapshot(t0)[0].cores, 3);
        // A member this node holds a connection to stays whatever others say.
        m.connected(linked, None, t0);
        assert!(!m.departed(linked, u64::MAX, t0));
        assert!(m.contains(&linked));
        // The notice itself is forgotten after three TTLs.
        assert!(m.departed(p, 200, t0));
        m.expire(t0 + Duration::from_secs(31));
        m.capabilities(p, caps(2), vec![], t0 + Duration::from_secs(31));
        assert!(m.contains(&p));
    }
}
