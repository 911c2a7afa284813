//! Sans-I/O policy of sessions and shards: banning failed peers with
//! backoff, choosing a route from the view, how long a hop may take, what a
//! session does about a late or failed step, the room a shard reserves for
//! session caches, and which standby ranges a peer keeps; `affinity.rs`:
//! where an owner's finished conversations left their keys and values.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use fogmesh_protocols::{ErrorCode, ModelHash};

use crate::error::SessionError;
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
            missing: None,
        })
        .collect()
}

/// [`candidates`] for `model`, each with the bytes it lacks (from its
/// gossiped chunks): placement counts their fetch.
pub fn candidates_for(view: &[PeerView], model: &crate::model::ModelInfo, excluded: &[PeerKey], memory_cap: u64) -> Vec<PlacementPeer> {
    let mut out = candidates(view, &model.hash, excluded, memory_cap);
    for c in &mut out {
        let held = view.iter().find(|p| p.peer == c.id).and_then(|p| p.partial.iter().find(|h| h.model == model.hash));
        c.missing = held.map(|h| std::sync::Arc::new(model.parts.missing(&h.bitmap)));
    }
    out
}

/// The routes serving the model over the candidates (whole replicas and
/// pipelines, the preferred first; see [`placement::layout`]), each as its
/// hops. Deterministic for a given set of candidates.
pub fn routes(costs: &ModelCosts, peers: &[PlacementPeer]) -> Result<Vec<Vec<Hop>>, placement::PlacementError> {
    Ok(placement::layout(costs, peers)?.routes.into_iter().map(hops).collect())
}

fn hops(plan: placement::Plan) -> Vec<Hop> {
    plan.stages.into_iter().map(|s| Hop { peer: s.peer, start: s.start, end: s.end }).collect()
}

/// The preferred route of [`routes`].
pub fn route(costs: &ModelCosts, peers: &[PlacementPeer]) -> Result<Vec<Hop>, placement::PlacementError> {
    // A layout holds at least one route.
    Ok(routes(costs, peers)?.into_iter().next().unwrap_or_default())
}

/// What the layout over the candidates gives one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The layout's routes, the preferred first.
    pub routes: Vec<Vec<Hop>>,
    /// The ranges this peer serves: its hops on any route, then the stages
    /// it keeps a copy of (spare memory on the busiest ranges).
    pub mine: Vec<Range<usize>>,
}

/// The layout over `peers` as `me` acts on it.
pub fn assignment(costs: &ModelCosts, peers: &[PlacementPeer], me: &str) -> Result<Assignment, placement::PlacementError> {
    let layout = placement::layout(costs, peers)?;
    let mut mine: Vec<Range<usize>> = Vec::new();
    let stages = layout.routes.iter().flat_map(|r| &r.stages);
    for s in stages.clone().filter(|s| s.peer == me).chain(stages.filter(|s| s.replicas.iter().any(|p| p == me))) {
        if !mine.contains(&(s.start..s.end)) {
            mine.push(s.start..s.end);
        }
    }
    Ok(Assignment { routes: layout.routes.into_iter().map(hops).collect(), mine })
}

/// The route a new session takes among `routes`: the lowest expected time
/// per token by gossip (each hop's stage time at its peer's speed, times
/// the steps queued there plus this one; hops at
/// [`placement::HOP_COST_S`]); ties to the earlier route. Its hops are then
/// bid for among the holders of their ranges.
pub fn choose_route(routes: &[Vec<Hop>], view: &[PeerView], costs: &ModelCosts) -> usize {
    let expected = |r: &Vec<Hop>| -> f64 {
        let hops: f64 = r
            .iter()
            .map(|h| {
                let Some(v) = view.iter().find(|p| p.peer == h.peer).filter(|v| v.gflops > 0.0) else { return f64::INFINITY };
                costs.stage_work(h.start..h.end) / (f64::from(v.gflops) * 1e9) * (f64::from(v.queued) + 1.0)
            })
            .sum();
        hops + placement::HOP_COST_S * r.len().saturating_sub(1) as f64
    };
    let mut best = (0, f64::INFINITY);
    for (i, r) in routes.iter().enumerate() {
        let e = expected(r);
        if e < best.1 {
            best = (i, e);
        }
    }
    best.0
}

/// How a session picks, for each hop, among the peers holding its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HopChoice {
    /// The holders bid; the lowest expected completion wins (the default).
    #[default]
    Bids,
    /// In turn, whatever their load (a baseline for comparisons).
    RoundRobin,
    /// The fewest steps queued by gossip (a baseline for comparisons).
    LeastQueued,
}

impl std::str::FromStr for HopChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bids" => Ok(HopChoice::Bids),
            "round-robin" => Ok(HopChoice::RoundRobin),
            "least-queued" => Ok(HopChoice::LeastQueued),
            other => Err(format!("unknown hop choice {other:?} (bids, round-robin, least-queued)")),
        }
    }
}

/// The holder [`HopChoice::RoundRobin`] or [`HopChoice::LeastQueued`] takes
/// among `candidates` (`turn` counts this peer's choices so far); `None`
/// for [`HopChoice::Bids`] (an auction decides) or no candidate.
pub fn baseline_choice(how: HopChoice, candidates: &[PeerKey], view: &[PeerView], turn: u64) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    match how {
        HopChoice::Bids => None,
        HopChoice::RoundRobin => {
            let mut by_id: Vec<usize> = (0..candidates.len()).collect();
            by_id.sort_by(|&a, &b| candidates[a].cmp(&candidates[b]));
            Some(by_id[(turn % candidates.len() as u64) as usize])
        }
        HopChoice::LeastQueued => {
            let queued = |p: &PeerKey| view.iter().find(|v| v.peer == *p).map_or(u32::MAX, |v| v.queued);
            (0..candidates.len()).min_by_key(|&i| (queued(&candidates[i]), i))
        }
    }
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

    /// [`Deadlines::step`] over a route whose hops answer pings in `rtts`
    /// (from the session's owner; unknown ones count as nothing): twice
    /// their sum more, so that a step over slow or distant links is not
    /// taken for lost while it travels.
    pub fn step_over(&self, tokens: usize, rtts: &[Option<Duration>]) -> Duration {
        let travel: Duration = rtts.iter().flatten().copied().sum();
        self.step(tokens) + travel.min(Duration::from_secs(60)) * 2
    }
}

/// Standby ranges of `me`: what it would serve if any one other peer of
/// `plan`'s routes were lost (the layout over `peers` without that peer),
/// minus what the plan already gives it; each range once, in the order the
/// lost peers appear.
pub fn standby_ranges(costs: &ModelCosts, peers: &[PlacementPeer], plan: &Assignment, me: &str) -> Vec<Range<usize>> {
    let mut standby: Vec<Range<usize>> = Vec::new();
    let mut lost_seen: Vec<&str> = Vec::new();
    for lost in plan.routes.iter().flatten().filter(|h| h.peer != me) {
        if lost_seen.contains(&lost.peer.as_str()) {
            continue;
        }
        lost_seen.push(&lost.peer);
        let rest: Vec<PlacementPeer> = peers.iter().filter(|p| p.id != lost.peer).cloned().collect();
        let Ok(alt) = assignment(costs, &rest, me) else { continue };
        for r in alt.mine {
            if !plan.mine.contains(&r) && !standby.contains(&r) {
                standby.push(r);
            }
        }
    }
    standby
}

/// A session cache a shard holds, as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<'a> {
    /// The session.
    pub session: u64,
    /// Its owner.
    pub owner: &'a str,
    /// Bytes reserved for its cache (its token bound times the bytes one
    /// token takes).
    pub bytes: usize,
    /// When it last did work.
    pub last_used: Instant,
}

/// The bounds of one shard's session caches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheBounds {
    /// A cache idle this long is dropped.
    pub ttl: Duration,
    /// Caches held at most (at least 1).
    pub max_sessions: usize,
    /// Bytes reserved by every cache together.
    pub budget_bytes: usize,
    /// The share of the budget one owner may hold (in (0, 1]).
    pub owner_share: f64,
}

impl CacheBounds {
    /// The most one owner may hold.
    pub fn owner_bytes(&self) -> usize {
        (self.budget_bytes as f64 * self.owner_share.clamp(0.0, 1.0)) as usize
    }
}

/// Why a shard cannot reserve a new session's cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoom {
    /// It would not fit even in an empty shard: asking again will not help.
    Never(String),
    /// Running sessions hold the room; it frees as they end.
    Now(String),
}

/// How long a session cache may sit unused before a newcomer that needs
/// its room may take it: a generation in progress steps far more often.
pub const IDLE_EVICT: Duration = Duration::from_secs(30);

/// The caches a shard drops before reserving `bytes` for a new session of
/// `owner`, or why it cannot. Every cache idle past the TTL goes; while the
/// count, the byte budget or the owner's share would be passed, caches idle
/// for [`IDLE_EVICT`] go, oldest first (the owner's own first when its share
/// is what is short). A cache in use is never taken: a running generation
/// keeps its room to the end, and the newcomer is refused (it waits and
/// asks again; see [`ErrorCode::Full`]).
pub fn reserve(held: &[Held<'_>], owner: &str, bytes: usize, now: Instant, b: &CacheBounds) -> Result<Vec<u64>, NoRoom> {
    if bytes > b.owner_bytes() {
        return Err(NoRoom::Never(format!(
            "a session needing {bytes} bytes of cache here exceeds what one owner may hold ({} of {} bytes)",
            b.owner_bytes(),
            b.budget_bytes
        )));
    }
    let idle = |h: &Held<'_>, d: Duration| now.saturating_duration_since(h.last_used) > d;
    let mut out: Vec<u64> = held.iter().filter(|h| idle(h, b.ttl)).map(|h| h.session).collect();
    let mut live: Vec<Held<'_>> = held.iter().filter(|h| !out.contains(&h.session)).copied().collect();
    // Oldest first; ties by session id so the choice is deterministic.
    live.sort_by_key(|h| (h.last_used, h.session));
    let owned = |live: &[Held<'_>]| live.iter().filter(|h| h.owner == owner).map(|h| h.bytes).sum::<usize>();
    while owned(&live) + bytes > b.owner_bytes() {
        let Some(i) = live.iter().position(|h| h.owner == owner && idle(h, IDLE_EVICT)) else {
            return Err(NoRoom::Now(format!(
                "this owner's running sessions hold {} of the {} bytes of cache one owner may hold here",
                owned(&live),
                b.owner_bytes()
            )));
        };
        out.push(live.remove(i).session);
    }
    loop {
        let total: usize = live.iter().map(|h| h.bytes).sum();
        if live.len() < b.max_sessions.max(1) && total + bytes <= b.budget_bytes {
            return Ok(out);
        }
        let Some(i) = live.iter().position(|h| idle(h, IDLE_EVICT)) else {
            return Err(NoRoom::Now(format!(
                "running sessions hold {total} of {} bytes of cache here ({} sessions; {bytes} more needed)",
                b.budget_bytes,
                live.len()
            )));
        };
        out.push(live.remove(i).session);
    }
}

/// How long a session whose route is full ([`ErrorCode::Full`]) pauses
/// before asking again, after `waited` in all and `waits` pauses: 20 ms
/// doubling to 640 ms, never past `bound`; `None` once `bound` is spent.
pub fn full_pause(waited: Duration, bound: Duration, waits: u32) -> Option<Duration> {
    (waited < bound).then(|| Duration::from_millis(20 << waits.min(5)).min(bound - waited))
}

/// What went wrong with a session's step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trouble {
    /// These peers failed.
    Culprits(Vec<PeerKey>, String),
    /// Something failed; find out who (probe the hops).
    Unknown(String),
    /// Not a peer's fault (an evicted cache): rebuild on a fresh route.
    Rebuild(String),
}

/// How a session reads a stage error from `e_peer` (empty when unknown)
/// with `code`: an error that ends the generation (`Err`: the model itself
/// failed, or this peer's own stage refused the input), or trouble to fail
/// over from.
pub fn stage_trouble(code: ErrorCode, e_peer: &str, reason: String, local: &str) -> Result<Trouble, SessionError> {
    match code {
        ErrorCode::Model => Err(SessionError::Stage { peer: e_peer.to_string(), reason }),
        ErrorCode::Malformed if e_peer == local => Err(SessionError::LocalStage(reason)),
        ErrorCode::UnknownSession => Ok(Trouble::Rebuild(reason)),
        _ if e_peer.is_empty() => Ok(Trouble::Unknown(reason)),
        _ => Ok(Trouble::Culprits(vec![e_peer.to_string()], reason)),
    }
}

/// Deadlines a step may miss while the pipeline reports queued work before
/// the session treats the route as broken.
pub const MAX_BUSY_WAITS: u32 = 30;
/// Deadlines a step may miss while every hop answers probes and none has
/// work queued; after each, the session resends the step (its frames were
/// lost), so a lossy link costs resends, not bans.
pub const MAX_STALLS: u32 = 4;

/// What a session does about a late step, once its hops were probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LateStep {
    /// Every hop answers and work is queued: the pipeline is loaded, not
    /// broken; wait another deadline.
    WaitBusy,
    /// Every hop answers and nothing is queued: the step's frames were
    /// lost, not the peers; resend the step.
    WaitSlow,
    /// Fail over, banning these peers.
    FailOver(Vec<PeerKey>, String),
}

/// The failover decision for a step that missed its deadline (`why`):
/// `dead` are the hops that did not answer a probe, `busy` whether any hop
/// has stage work waiting; `busy_waits` and `stalls` count the deadlines
/// already waited out on this step. This peer (`local`) is never a culprit.
pub fn late_step(why: &str, dead: Vec<PeerKey>, busy: bool, busy_waits: u32, stalls: u32, route: &[Hop], local: &str) -> LateStep {
    if dead.is_empty() && busy && busy_waits < MAX_BUSY_WAITS {
        return LateStep::WaitBusy;
    }
    if dead.is_empty() && stalls < MAX_STALLS {
        return LateStep::WaitSlow;
    }
    if dead.is_empty() {
        let culprits = route.iter().map(|h| h.peer.clone()).filter(|p| p != local).collect();
        LateStep::FailOver(culprits, format!("{why}, repeatedly"))
    } else {
        let culprits = dead.into_iter().filter(|p| p != local).collect();
        LateStep::FailOver(culprits, format!("{why}; hop did not answer a probe"))
    }
}

pub mod affinity;

#[cfg(test)]
mod tests;
