//! Placement: cutting a model's layers into contiguous ranges over peers so
//! that the slowest stage is as fast as possible. Sans-I/O and deterministic:
//! every peer that computes a plan from the same view gets the same plan,
//! whatever order the view lists the peers in.
//!
//! ## The problem
//! Layers `0..L` with costs `c_i` (work per token) and sizes `b_i`; the first
//! stage also pays the embedding, the last the head. Peers have a speed `s_p`
//! and usable memory `m_p`. A plan is an ordered choice of distinct peers and
//! cut points; stage `k` on peer `p` covering `i..j` takes
//! `(Σ c + extras) / s_p` and must fit `m_p`. Minimise the largest stage time
//! (the pipeline's throughput), then the number of stages (latency, hops).
//!
//! ## Exact solution
//! The optimal bottleneck is one of the finitely many stage times
//! `time(p, i, j)`; binary search over them with a feasibility test. For a
//! bound `T`, let `reach(p, i)` be the farthest `j` such that peer `p` can take
//! `i..j` within `T` and its memory. `reach` is monotone in `i` (costs and
//! sizes are non-negative), so covering the longest possible prefix with each
//! subset of peers is a dynamic programme over subsets:
//! `best[S] = max_{p ∈ S} reach(p, best[S \ {p}])`, feasible iff some subset
//! covers all `L` layers. This is exact for up to [`MAX_EXACT_PEERS`]
//! candidates (2^16 subsets × 16 peers × log(#times) steps, a few ms); with more
//! peers the plan is exact over the [`MAX_EXACT_PEERS`] fastest ones (by speed,
//! then memory, then id), which a pipeline of a few dozen layers never needs
//! to exceed.

use std::cmp::Ordering;

mod routes;
pub use routes::{HOP_COST_S, Layout, MAX_ROUTES, layout};

/// Most peers the exact search considers at once.
pub const MAX_EXACT_PEERS: usize = 16;

/// What placement needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCosts {
    /// Work per token of each layer (any unit consistent with peer speeds,
    /// e.g. FLOPs with speeds in FLOP/s).
    pub layer_cost: Vec<f64>,
    /// Weight bytes of each layer (plus its KV cache budget, if wanted).
    pub layer_bytes: Vec<u64>,
    /// Extra work of the first stage (embedding lookup: usually ~0).
    pub first_cost: f64,
    /// Extra bytes of the first stage (the embedding table).
    pub first_bytes: u64,
    /// Extra work of the last stage (final norm and output head).
    pub last_cost: f64,
    /// Extra bytes of the last stage (head, or the tied embedding again).
    pub last_bytes: u64,
    /// Bytes the first and last stages' extras share (a tied embedding): a
    /// stage holding both holds them once.
    pub shared_bytes: u64,
}

impl ModelCosts {
    /// From the engine's profile of a GGUF file. Decoding streams every weight
    /// once per token, so a stage's time follows the bytes it reads, not its
    /// FLOPs (the output head of SmolLM2 is 8 layers by FLOPs but ~14 by bytes,
    /// and measures ~14): costs are weight bytes, scaled so the layers' total
    /// equals their FLOPs (peer speeds stay in FLOP/s). The embedding lookup
    /// reads one row: no cost.
    pub fn from_profile(p: &fogmesh_models::ModelProfile) -> Self {
        let flops: f64 = p.layers.iter().map(|l| l.flops_per_token as f64).sum();
        let bytes: f64 = p.layers.iter().map(|l| l.weight_bytes as f64).sum();
        let k = if bytes > 0.0 { flops / bytes } else { 0.0 };
        ModelCosts {
            layer_cost: p.layers.iter().map(|l| l.weight_bytes as f64 * k).collect(),
            layer_bytes: p.layers.iter().map(|l| l.weight_bytes).collect(),
            first_cost: 0.0,
            first_bytes: p.embedding_bytes,
            last_cost: p.head_bytes as f64 * k,
            last_bytes: p.head_bytes,
            shared_bytes: if p.tied_head { p.embedding_bytes.min(p.head_bytes) } else { 0 },
        }
    }

    fn layers(&self) -> usize {
        self.layer_cost.len()
    }

    /// Work per token of a stage running `range` (with the first stage's
    /// and the last stage's extras when it holds them).
    pub fn stage_work(&self, range: std::ops::Range<usize>) -> f64 {
        let mut w: f64 = self.layer_cost.get(range.clone()).map_or(0.0, |c| c.iter().sum());
        if range.start == 0 {
            w += self.first_cost;
        }
        if range.end == self.layers() {
            w += self.last_cost;
        }
        w
    }

    /// Weight bytes of a stage running `range` (with the embedding or head
    /// when it holds them).
    pub fn stage_bytes(&self, range: std::ops::Range<usize>) -> u64 {
        let mut b: u64 = self.layer_bytes.get(range.clone()).map_or(0, |c| c.iter().sum());
        if range.start == 0 {
            b += self.first_bytes;
        }
        if range.end == self.layer_bytes.len() {
            b += self.last_bytes;
            if range.start == 0 {
                b = b.saturating_sub(self.shared_bytes);
            }
        }
        b
    }
}

/// A peer as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementPeer {
    /// Stable identity (the peer id); ties are broken by it.
    pub id: String,
    /// Work per second (same unit as [`ModelCosts::layer_cost`]).
    pub speed: f64,
    /// Bytes it may spend on weights.
    pub memory_bytes: u64,
    /// The file bytes of each layer it lacks and would have to fetch from
    /// peers before serving it (`None`: it holds the whole model).
    pub missing: Option<std::sync::Arc<Missing>>,
}

/// File bytes of a model a peer lacks, by layer (and the first and last
/// stages' extra tensors), as its gossiped chunks say.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Missing {
    /// Bytes lacking of each layer.
    pub layer: Vec<u64>,
    /// Of the first stage's extra tensors (the embedding).
    pub first: u64,
    /// Of the last stage's extra tensors (output norm and head).
    pub last: u64,
}

/// The link rate placement assumes for fetching missing weights (100
/// Mbit/s), and the tokens a fetch is spread over: a stage's cost is its
/// compute time per token plus its fetch time divided by this many tokens,
/// so a peer that holds a range's bytes keeps it unless a plan without the
/// fetch is faster by more than that, and newcomers take less at first.
pub const FETCH_BYTES_PER_S: f64 = 12.5e6;
/// See [`FETCH_BYTES_PER_S`].
pub const FETCH_AMORTIZE_TOKENS: f64 = 256.0;

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// The serving peer.
    pub peer: String,
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
    /// Seconds per token on that peer (with the fetch of weights it lacks
    /// spread over [`FETCH_AMORTIZE_TOKENS`]).
    pub time: f64,
    /// Bytes it holds.
    pub bytes: u64,
    /// Extra holders of the same range (for failover).
    pub replicas: Vec<String>,
}

/// A placement plan: stages in pipeline order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The stages, covering `0..L` in order.
    pub stages: Vec<Stage>,
    /// The slowest stage's time per token.
    pub bottleneck: f64,
}

/// Why no plan exists.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// The model has no layers.
    #[error("the model has no layers")]
    NoLayers,
    /// Inconsistent model costs.
    #[error("model costs are inconsistent: {0}")]
    BadModel(&'static str),
    /// No usable peers (none, or all with zero speed).
    #[error("no peer can serve (none known, or none with a positive speed)")]
    NoPeers,
    /// The peers' memory cannot hold the model in any arrangement.
    #[error("the model ({needed} bytes) does not fit the memory of the {peers} candidate peers")]
    DoesNotFit {
        /// Bytes the model needs.
        needed: u64,
        /// Peers considered.
        peers: usize,
    },
}

struct Problem<'a> {
    m: &'a ModelCosts,
    peers: Vec<&'a PlacementPeer>,
    cost_prefix: Vec<f64>,
    bytes_prefix: Vec<u64>,
    /// Per peer: prefix sums of the bytes of each layer it lacks.
    missing_prefix: Vec<Option<Vec<u64>>>,
}

impl Problem<'_> {
    fn l(&self) -> usize {
        self.m.layers()
    }

    fn work(&self, i: usize, j: usize) -> f64 {
        let mut w = self.cost_prefix[j] - self.cost_prefix[i];
        if i == 0 {
            w += self.m.first_cost;
        }
        if j == self.l() {
            w += self.m.last_cost;
        }
        w
    }

    fn bytes(&self, i: usize, j: usize) -> u64 {
        let mut b = self.bytes_prefix[j] - self.bytes_prefix[i];
        if i == 0 {
            b += self.m.first_bytes;
        }
        if j == self.l() {
            b += self.m.last_bytes;
            if i == 0 {
                b = b.saturating_sub(self.m.shared_bytes);
            }
        }
        b
    }

    fn time(&self, p: usize, i: usize, j: usize) -> f64 {
        self.work(i, j) / self.peers[p].speed + self.fetch(p, i, j)
    }

    /// Peer `p`'s fetch of what it lacks of `i..j`, per token.
    fn fetch(&self, p: usize, i: usize, j: usize) -> f64 {
        let (Some(pre), Some(m)) = (&self.missing_prefix[p], &self.peers[p].missing) else { return 0.0 };
        let mut b = pre[j] - pre[i];
        if i == 0 {
            b += m.first;
        }
        if j == self.l() {
            b += m.last;
        }
        b as f64 / FETCH_BYTES_PER_S / FETCH_AMORTIZE_TOKENS
    }

    fn fits(&self, p: usize, i: usize, j: usize, t: f64) -> bool {
        self.time(p, i, j) <= t && self.bytes(i, j) <= self.peers[p].memory_bytes
    }

    /// Farthest end reachable by peer `p` from `i` within `t` (`i` if none).
    /// Monotone in `i`: moving the start later only removes work and bytes.
    fn reach(&self, p: usize, i: usize, t: f64) -> usize {
        (i + 1..=self.l()).rev().find(|&j| self.fits(p, i, j, t)).unwrap_or(i)
    }

    /// Subset DP for bound `t`. `best[S]` is the longest prefix the peers of
    /// `S` cover, each with a non-empty stage (`NONE` if they cannot).
    /// Returns the covering subset with the fewest peers (ties: the lowest
    /// mask, i.e. the best-ranked peers), and the tables to rebuild it.
    fn feasible(&self, t: f64) -> Option<(usize, Vec<usize>, Vec<u8>)> {
        const NONE: usize = usize::MAX;
        let n = self.peers.len();
        let l = self.l();
        let mut best = vec![NONE; 1 << n];
        let mut choice = vec![u8::MAX; 1 << n];
        best[0] = 0;
        let mut memo = vec![vec![NONE; l + 1]; n];
        let mut answer: Option<usize> = None;
        for mask in 1usize..(1 << n) {
            for p in 0..n {
                if mask & (1 << p) == 0 {
                    continue;
                }
                let prev = best[mask ^ (1 << p)];
                if prev == NONE || prev == l {
                    continue;
                }
                if memo[p][prev] == NONE {
                    memo[p][prev] = self.reach(p, prev, t);
                }
                let r = memo[p][prev];
                if r > prev && (best[mask] == NONE || r > best[mask]) {
                    best[mask] = r;
                    choice[mask] = p as u8;
                }
            }
            if best[mask] == l && answer.is_none_or(|a| mask.count_ones() < a.count_ones()) {
                answer = Some(mask);
            }
        }
        answer.map(|a| (a, best, choice))
    }
}

fn rank(a: &PlacementPeer, b: &PlacementPeer) -> Ordering {
    b.speed
        .total_cmp(&a.speed)
        .then(b.memory_bytes.cmp(&a.memory_bytes))
        .then(a.id.cmp(&b.id))
}

/// Computes the plan with the fastest slowest stage (then the fewest stages),
/// and gives each stage up to `replicas` extra holders among the peers the
/// plan leaves unused (those whose memory fits the range, fastest first).
pub fn plan(model: &ModelCosts, peers: &[PlacementPeer], replicas: usize) -> Result<Plan, PlacementError> {
    let l = model.layers();
    if l == 0 {
        return Err(PlacementError::NoLayers);
    }
    if model.layer_bytes.len() != l {
        return Err(PlacementError::BadModel("layer_cost and layer_bytes differ in length"));
    }
    let finite = |x: f64| x.is_finite() && x >= 0.0;
    if !model.layer_cost.iter().all(|&c| finite(c)) || !finite(model.first_cost) || !finite(model.last_cost) {
        return Err(PlacementError::BadModel("costs must be finite and non-negative"));
    }
    let mut ranked: Vec<&PlacementPeer> = peers.iter().filter(|p| p.speed.is_finite() && p.speed > 0.0).collect();
    ranked.sort_by(|a, b| rank(a, b));
    ranked.dedup_by(|a, b| a.id == b.id);
    if ranked.is_empty() {
        return Err(PlacementError::NoPeers);
    }
    let candidates: Vec<&PlacementPeer> = ranked.iter().take(MAX_EXACT_PEERS).copied().collect();
    let mut cost_prefix = vec![0.0; l + 1];
    let mut bytes_prefix = vec![0u64; l + 1];
    for i in 0..l {
        cost_prefix[i + 1] = cost_prefix[i] + model.layer_cost[i];
        bytes_prefix[i + 1] = bytes_prefix[i].saturating_add(model.layer_bytes[i]);
    }
    let missing_prefix = candidates
        .iter()
        .map(|p| {
            p.missing.as_ref().filter(|m| m.layer.len() == l).map(|m| {
                let mut pre = vec![0u64; l + 1];
                for i in 0..l {
                    pre[i + 1] = pre[i].saturating_add(m.layer[i]);
                }
                pre
            })
        })
        .collect();
    let pb = Problem { m: model, peers: candidates, cost_prefix, bytes_prefix, missing_prefix };
    let needed = pb.bytes(0, l);

    // Every stage time a plan could have, sorted: the optimum is one of them.
    let mut times = Vec::with_capacity(pb.peers.len() * l * (l + 1) / 2);
    for p in 0..pb.peers.len() {
        for i in 0..l {
            for j in i + 1..=l {
                if pb.bytes(i, j) <= pb.peers[p].memory_bytes {
                    times.push(pb.time(p, i, j));
                }
            }
        }
    }
    times.sort_by(f64::total_cmp);
    times.dedup();
    let not_fit = PlacementError::DoesNotFit { needed, peers: pb.peers.len() };
    let (&max_t, _) = times.split_last().ok_or(not_fit.clone())?;
    if pb.feasible(max_t).is_none() {
        return Err(not_fit);
    }
    let (mut lo, mut hi) = (0usize, times.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pb.feasible(times[mid]).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let t = times[lo];
    // times[lo] was found feasible by the search (or is max_t, checked above).
    let Some((mut mask, best, choice)) = pb.feasible(t) else { return Err(not_fit) };

    // Walk the choices back: the peer chosen for `mask` serves the last range.
    let mut stages = Vec::new();
    while mask != 0 {
        let p = choice[mask] as usize;
        let prev = best[mask ^ (1 << p)];
        let end = best[mask];
        stages.push(Stage {
            peer: pb.peers[p].id.clone(),
            start: prev,
            end,
            time: pb.time(p, prev, end),
            bytes: pb.bytes(prev, end),
            replicas: Vec::new(),
        });
        mask ^= 1 << p;
    }
    stages.reverse();
    debug_assert!(stages.windows(2).all(|w| w[0].end == w[1].start));
    let bottleneck = stages.iter().map(|s| s.time).fold(0.0, f64::max);

    // Replicas from the unused peers (all of them, not just the candidates).
    if replicas > 0 {
        let mut unused: Vec<&PlacementPeer> =
            ranked.iter().filter(|p| !stages.iter().any(|s| s.peer == p.id)).copied().collect();
        for round in 0..replicas {
            for s in stages.iter_mut() {
                if s.replicas.len() != round {
                    continue;
                }
                if let Some(k) = unused.iter().position(|p| p.memory_bytes >= s.bytes) {
                    s.replicas.push(unused.remove(k).id.clone());
                }
            }
        }
    }
    Ok(Plan { stages, bottleneck })
}

#[cfg(test)]
mod tests;
