//! Sans-I/O policy of sessions: banning failed peers with backoff, choosing a
//! route from the view, and how long a hop may take.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fogmesh_protocols::ModelHash;

use crate::link::{PeerKey, PeerView};
use crate::placement::{self, ModelCosts, PlacementPeer};

/// Peers a session stopped trusting, each until its ban expires. A peer
/// banned again soon after its last ban waits twice as long (up to `max`).
#[derive(Debug, Clone)]
pub struct BanList {
    base: Duration,
    max: Duration,
    bans: BTreeMap<PeerKey, (u32, Instant)>,
}

impl BanList {
    /// Bans start at `base` and double up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        BanList { base, max: max.max(base), bans: BTreeMap::new() }
    }

    /// Bans `peer` from `now`; returns how long.
    pub fn ban(&mut self, peer: &str, now: Instant) -> Duration {
        let strikes = match self.bans.get(peer) {
            // A ban that ended long ago is forgiven.
            Some(&(n, until)) if now.saturating_duration_since(until) < self.max => n + 1,
            _ => 1,
        };
        let d = self.base.saturating_mul(1u32 << (strikes - 1).min(20)).min(self.max);
        self.bans.insert(peer.to_string(), (strikes, now + d));
        d
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&self, peer: &str, now: Instant) -> bool {
        self.bans.get(peer).is_some_and(|&(_, until)| now < until)
    }

    /// The peers banned at `now`.
    pub fn banned(&self, now: Instant) -> Vec<PeerKey> {
        self.bans.iter().filter(|(_, (_, until))| now < *until).map(|(p, _)| p.clone()).collect()
    }
}

/// One hop of a route: a peer and the layers it runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hop {
    /// The peer.
    pub peer: PeerKey,
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
}

/// Turns a view into placement candidates: peers holding `model` with a
/// known speed, minus `excluded`. Speeds become FLOP/s.
pub fn candidates(view: &[PeerView], model: &ModelHash, excluded: &[PeerKey], memory_cap: u64) -> Vec<PlacementPeer> {
    view.iter()
        .filter(|p| p.models.contains(model) && p.gflops > 0.0 && !excluded.contains(&p.peer))
        .map(|p| PlacementPeer {
            id: p.peer.clone(),
            speed: p.gflops as f64 * 1e9,
            memory_bytes: if memory_cap == 0 { p.memory_bytes } else { p.memory_bytes.min(memory_cap) },
        })
        .collect()
}

/// The route for a session: the placement plan over the candidates, one hop
/// per stage. Deterministic for a given set of candidates.
pub fn route(costs: &ModelCosts, peers: &[PlacementPeer]) -> Result<Vec<Hop>, placement::PlacementError> {
    let plan = placement::plan(costs, peers, 0)?;
    Ok(plan.stages.into_iter().map(|s| Hop { peer: s.peer, start: s.start, end: s.end }).collect())
}

/// Timeouts of a session's hops.
#[derive(Debug, Clone)]
pub struct Deadlines {
    /// Allowed for any step, whatever its size.
    pub base: Duration,
    /// Added per token of input (prefill chunks and replays).
    pub per_token: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines { base: Duration::from_secs(1), per_token: Duration::from_millis(20) }
    }
}

impl Deadlines {
    /// How long a step feeding `tokens` tokens may take before the session
    /// treats it as lost.
    pub fn step(&self, tokens: usize) -> Duration {
        self.base + self.per_token.saturating_mul(tokens.min(1 << 20) as u32)
    }
}

#[cfg(test)]
mod tests;
