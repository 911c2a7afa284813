//! Which discovered peers to dial and when: a sans-I/O table of candidates
//! with per-peer redial backoff, driven with explicit times, and the rule
//! for which announced addresses are worth dialing at all.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use rand::seq::SliceRandom;

/// Most discovered-but-unconnected peers remembered for redialing.
pub const MAX_CANDIDATES: usize = 1024;
/// First redial delay of a discovered peer (doubling per attempt).
pub const MIN_REDIAL: Duration = Duration::from_secs(1);
/// Longest redial delay.
pub const MAX_REDIAL: Duration = Duration::from_secs(30);
/// Failed dials in a row after which a candidate is forgotten.
pub const MAX_REDIALS: u32 = 10;

/// A discovered peer we want a connection to.
#[derive(Debug, Clone)]
struct Candidate {
    addrs: Vec<Multiaddr>,
    next: Instant,
    backoff: Duration,
    failures: u32,
}

/// The candidate table: discovered peers, their addresses (at most
/// `max_addrs` each, oldest out) and when each may be dialed again.
#[derive(Debug)]
pub struct Dialer<P> {
    candidates: HashMap<P, Candidate>,
    max_addrs: usize,
}

impl<P: Copy + Eq + Hash> Dialer<P> {
    /// An empty table keeping at most `max_addrs` addresses per peer.
    pub fn new(max_addrs: usize) -> Self {
        Dialer { candidates: HashMap::new(), max_addrs: max_addrs.max(1) }
    }

    /// Notes `addrs` of a discovered peer at `now`; returns the addresses
    /// to dial at once (all it knows of the peer). A full table remembers
    /// nothing new but still returns `addrs` to dial once.
    pub fn discovered(&mut self, peer: P, addrs: Vec<Multiaddr>, now: Instant) -> Vec<Multiaddr> {
        if !self.candidates.contains_key(&peer) && self.candidates.len() >= MAX_CANDIDATES {
            return addrs;
        }
        let max_addrs = self.max_addrs;
        let c = self
            .candidates
            .entry(peer)
            .or_insert_with(|| Candidate { addrs: Vec::new(), next: now, backoff: MIN_REDIAL, failures: 0 });
        for a in addrs {
            if !c.addrs.contains(&a) {
                if c.addrs.len() >= max_addrs {
                    c.addrs.remove(0);
                }
                c.addrs.push(a);
            }
        }
        c.failures = 0;
        c.addrs.clone()
    }

    /// Up to `limit` peers due for a dial at `now` (not connected, backoff
    /// passed), picked at random, with their addresses; each one's backoff
    /// doubles (up to [`MAX_REDIAL`]). Forgets peers that failed
    /// [`MAX_REDIALS`] times in a row (rediscovery brings them back).
    pub fn due(&mut self, now: Instant, connected: impl Fn(&P) -> bool, limit: usize) -> Vec<(P, Vec<Multiaddr>)> {
        self.candidates.retain(|_, c| c.failures < MAX_REDIALS);
        let mut due: Vec<&P> = self.candidates.iter().filter(|(p, c)| c.next <= now && !connected(p)).map(|(p, _)| p).collect();
        due.shuffle(&mut rand::rng());
        due.truncate(limit);
        let due: Vec<P> = due.into_iter().copied().collect();
        due.into_iter()
            .filter_map(|p| {
                let c = self.candidates.get_mut(&p)?;
                c.next = now + c.backoff;
                c.backoff = (c.backoff * 2).min(MAX_REDIAL);
                Some((p, c.addrs.clone()))
            })
            .collect()
    }

    /// `peer` shed its connection to this node (or this node shed it): not
    /// dialed again for [`MAX_REDIAL`].
    pub fn shed(&mut self, peer: &P, now: Instant) {
        if let Some(c) = self.candidates.get_mut(peer) {
            c.next = now + MAX_REDIAL;
        }
    }

    /// A connection to `peer` came up at `now`: its backoff starts over.
    pub fn connected(&mut self, peer: &P, now: Instant) {
        if let Some(c) = self.candidates.get_mut(peer) {
            c.failures = 0;
            c.backoff = MIN_REDIAL;
            c.next = now + MIN_REDIAL;
        }
    }

    /// A dial to `peer` failed.
    pub fn failed(&mut self, peer: &P) {
        if let Some(c) = self.candidates.get_mut(peer) {
            c.failures += 1;
        }
    }

    /// `addr` of `peer` expired; a peer with no address left is forgotten.
    pub fn expired(&mut self, peer: &P, addr: &Multiaddr) {
        if let Some(c) = self.candidates.get_mut(peer) {
            c.addrs.retain(|a| a != addr);
            if c.addrs.is_empty() {
                self.candidates.remove(peer);
            }
        }
    }

    /// Candidates remembered.
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    /// Whether none are remembered.
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }
}

/// Whether `addr` is a loopback address.
pub fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Whether an address a peer announced is worth dialing from a connection
/// at `remote`: never unspecified, and loopback only when that connection
/// is itself loopback (another host's 127.0.0.1 is not that host).
pub fn dialable(addr: &Multiaddr, remote: Option<&Multiaddr>) -> bool {
    match ip_of(addr) {
        Some(ip) if ip.is_unspecified() => false,
        Some(ip) if ip.is_loopback() => remote.is_none_or(is_loopback),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> Multiaddr {
        format!("/ip4/10.0.0.{i}/tcp/4001").parse().unwrap()
    }

    #[test]
    fn dialable_addresses() {
        let lan: Multiaddr = "/ip4/10.1.0.2/tcp/4001".parse().unwrap();
        let lo: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let any: Multiaddr = "/ip4/0.0.0.0/tcp/4001".parse().unwrap();
        assert!(dialable(&lan, Some(&lo)));
        assert!(dialable(&lo, Some(&lo)));
        assert!(!dialable(&lo, Some(&lan)));
        assert!(dialable(&lo, None));
        assert!(!dialable(&any, None));
    }

    #[test]
    fn redials_back_off_doubling_to_the_cap_and_reset_on_connect() {
        let t0 = Instant::now();
        let mut d = Dialer::new(4);
        assert_eq!(d.discovered(1u32, vec![addr(1)], t0), vec![addr(1)]);
        // Due at once, then after 1 s, 2 s, 4 s ... up to 30 s.
        let mut t = t0;
        let mut gaps = Vec::new();
        let mut last = t0;
        for _ in 0..400 {
            if !d.due(t, |_| false, usize::MAX).is_empty() {
                gaps.push((t - last).as_secs());
                last = t;
            }
            t += Duration::from_millis(250);
        }
        assert_eq!(&gaps[..7], &[0, 1, 2, 4, 8, 16, 30]);
        assert!(gaps[7..].iter().all(|&g| g == 30));
        // Connected peers are never due; a connection resets the backoff.
        assert!(d.due(t + MAX_REDIAL, |_| true, usize::MAX).is_empty());
        d.connected(&1, t);
        assert!(d.due(t + MIN_REDIAL, |_| false, usize::MAX).len() == 1);
        d.shed(&1, t);
        assert!(d.due(t + MIN_REDIAL, |_| false, usize::MAX).is_empty(), "a shed peer waits");
    }

    #[test]
    fn failing_peers_are_forgotten_and_addresses_are_bounded() {
        let t = Instant::now();
        let mut d = Dialer::new(2);
        d.discovered(7u32, vec![addr(1), addr(2), addr(3)], t);
        assert_eq!(d.discovered(7, vec![], t), vec![addr(2), addr(3)], "oldest address out");
        for _ in 0..MAX_REDIALS {
            d.failed(&7);
        }
        let _ = d.due(t, |_| false, usize::MAX);
        assert!(d.is_empty(), "forgotten after {MAX_REDIALS} failures");
        d.discovered(8, vec![addr(4)], t);
        d.expired(&8, &addr(4));
        assert_eq!(d.len(), 0, "no address left");
        for p in 0..MAX_CANDIDATES as u32 + 5 {
            d.discovered(100 + p, vec![addr(9)], t);
        }
        assert_eq!(d.len(), MAX_CANDIDATES);
        // At most `limit` at a time, the rest stay due.
        assert_eq!(d.due(t, |_| false, 3).len(), 3);
        assert_eq!(d.due(t, |_| false, usize::MAX).len(), MAX_CANDIDATES - 3);
    }
}
