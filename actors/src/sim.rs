//! A seeded discrete-event simulator of a fog cluster, to compare scheduling
//! policies under the same arrivals, task sizes, links, failures and gossip.
//!
//! Peers serve tasks first-come first-served at their own speed (work units per
//! second; speeds spread over 20x). Tasks arrive in a Poisson stream at random
//! owner peers, with exponentially distributed work, and carry an activation
//! that takes `latency + bytes / bandwidth` to reach the chosen peer. Peers
//! fail and come back; a task lost with its peer is re-dispatched by its owner
//! after a detection delay. Every peer gossips its queue every
//! `gossip_interval_s`, seen by others `gossip_delay_s` later.
//!
//! Policies: `greedy` (the classic allocator: a central scheduler with perfect
//! knowledge gives each task to the up peer with the most remaining capacity,
//! capacity minus the work assigned and not yet finished), `round_robin`,
//! `random`, `p2c` (two random peers, the one with less gossiped queue),
//! `bidding` (fogmesh: the [`crate::sched::Scheduler`] auction among a few
//! candidates), and `oracle` (perfect instantaneous knowledge: join the
//! shortest expected completion).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use serde::Serialize;

use crate::sched::{Action, BidBook, LoadReport, Quote, SchedConfig, Scheduler, TaskSpec};

/// Gossip intervals without a report after which a peer is presumed down
/// (by gossip-based policies: p2c and bidding).
pub const SILENT_AFTER_INTERVALS: f64 = 2.5;

/// A bid holds its work for this many auction timeouts at most (its release
/// comes sooner: the auction closes within one timeout).
pub const BID_LEASE_TIMEOUTS: f64 = 2.0;
/// Open bids a peer keeps track of.
pub const BID_BOOK_CAPACITY: usize = 1024;

/// Bidding's candidate weights are 1 / estimate^beta with beta this much
/// per mean-sized task of work...
pub const BETA_PER_WORK: f64 = 0.5;
/// ...within these bounds.
pub const BETA_RANGE: (f64, f64) = (0.5, 4.0);

/// One simulated peer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PeerSpec {
    /// Work units per second.
    pub speed: f64,
    /// One-way network latency to the core of the network (seconds).
    pub latency_s: f64,
    /// Link bandwidth (bytes per second).
    pub bandwidth: f64,
}

/// The scheduling policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Policy {
    Greedy,
    RoundRobin,
    Random,
    P2c,
    Bidding,
    Oracle,
}

impl Policy {
    /// Every policy.
    pub const ALL: [Policy; 6] =
        [Policy::Greedy, Policy::RoundRobin, Policy::Random, Policy::P2c, Policy::Bidding, Policy::Oracle];

    /// The JSON key.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Greedy => "greedy",
            Policy::RoundRobin => "round_robin",
            Policy::Random => "random",
            Policy::P2c => "p2c",
            Policy::Bidding => "bidding",
            Policy::Oracle => "oracle",
        }
    }
}

/// A simulation's parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimConfig {
    /// The cluster.
    pub peers: Vec<PeerSpec>,
    /// Offered load as a fraction of the cluster's total speed.
    pub load: f64,
    /// Tasks to simulate.
    pub tasks: usize,
    /// Mean work of a task.
    pub mean_work: f64,
    /// Activation bytes sent with each task.
    pub task_bytes: f64,
    /// Seconds between a peer's load reports.
    pub gossip_interval_s: f64,
    /// Seconds before a report is seen by others.
    pub gossip_delay_s: f64,
    /// Mean seconds a peer stays up (0: never fails).
    pub mean_up_s: f64,
    /// Mean seconds a failed peer stays down.
    pub mean_down_s: f64,
    /// Seconds for an owner to notice a lost task.
    pub detect_s: f64,
    /// Peers asked for bids per task (bidding).
    pub candidates: usize,
    /// Auction timeout (bidding).
    pub auction_timeout_s: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl SimConfig {
    /// Defaults for a cluster: failures every ~10 minutes per peer, 1 s
    /// gossip, 64 KiB activations.
    pub fn new(peers: Vec<PeerSpec>, load: f64, seed: u64) -> Self {
        SimConfig {
            peers,
            load,
            tasks: 20_000,
            mean_work: 1.0,
            task_bytes: 65_536.0,
            gossip_interval_s: 1.0,
            gossip_delay_s: 0.05,
            mean_up_s: 600.0,
            mean_down_s: 20.0,
            detect_s: 0.5,
            candidates: 6,
            auction_timeout_s: 0.25,
            seed,
        }
    }
}

/// What one policy achieved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Mean task latency (arrival to result back at the owner), seconds.
    pub mean_s: f64,
    /// Median latency.
    pub p50_s: f64,
    /// 99th percentile latency.
    pub p99_s: f64,
    /// Completed tasks per second.
    pub throughput: f64,
    /// Variance of peer utilization (busy fraction), the classic balance metric.
    pub load_variance: f64,
    /// Scheduling messages per task (calls, bids, awards; or the request and
    /// answer of a central scheduler).
    pub messages_per_task: f64,
    /// The same divided by the candidates asked (bidding), else equal to it.
    pub messages_per_task_per_candidate: f64,
    /// Gossip messages received per task (reports times receivers).
    pub gossip_per_task: f64,
    /// Tasks completed.
    pub completed: usize,
    /// Dispatches repeated because a peer failed.
    pub redispatched: usize,
    /// Where the mean latency goes.
    pub breakdown: Breakdown,
    /// The same over the slowest 1 % of tasks (those at or past the p99).
    pub tail_breakdown: Breakdown,
}

/// The mean latency of completed tasks, in parts (seconds; they sum to the
/// mean).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Breakdown {
    /// Arrival to the final dispatch: the auction (bidding), and re-dispatch
    /// after a failure (every policy).
    pub decide_s: f64,
    /// The activation's way to the chosen peer.
    pub transfer_s: f64,
    /// Waiting in the peer's queue.
    pub wait_s: f64,
    /// Service.
    pub service_s: f64,
    /// The result's way back to the owner.
    pub return_s: f64,
}

impl Breakdown {
    fn mean(parts: &[[f64; 5]]) -> Self {
        let k = parts.len().max(1) as f64;
        let sum = parts.iter().fold([0.0; 5], |mut acc, p| {
            acc.iter_mut().zip(p).for_each(|(a, x)| *a += x);
            acc
        });
        let [decide_s, transfer_s, wait_s, service_s, return_s] = sum.map(|x| x / k);
        Breakdown { decide_s, transfer_s, wait_s, service_s, return_s }
    }
}

/// A SplitMix64 generator: small, seeded, reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Exponential with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform()).ln()
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// The classic fog example: three nodes of capacities 10, 15 and 8.
pub fn classic_cluster() -> Vec<PeerSpec> {
    [10.0, 15.0, 8.0].iter().map(|&speed| PeerSpec { speed, latency_s: 0.005, bandwidth: 12.5e6 }).collect()
}

/// The links of a random cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// A wired site: latencies uniform over 1-20 ms, 2-100 MB/s.
    Lan,
    /// Edge devices on mixed access links (Wi-Fi, cellular, DSL uplinks):
    /// latencies log-uniform over 2-100 ms, 0.25-12.5 MB/s (2-100 Mbit/s).
    Fog,
}

/// `n` peers with speeds log-uniform over [1, 20] (a 20x spread), latencies of
/// 1 to 20 ms and links of 2 to 100 MB/s.
pub fn random_cluster(n: usize, seed: u64) -> Vec<PeerSpec> {
    random_cluster_with(n, seed, Links::Lan)
}

/// `n` peers with speeds log-uniform over [1, 20] and `links`. The speeds
/// are the same for both kinds of links with the same seed.
pub fn random_cluster_with(n: usize, seed: u64, links: Links) -> Vec<PeerSpec> {
    let mut r = Rng::new(seed ^ 0xC1A5_7E55);
    (0..n)
        .map(|_| {
            let (speed, a, b) = (20f64.powf(r.uniform()), r.uniform(), r.uniform());
            match links {
                Links::Lan => PeerSpec { speed, latency_s: 0.001 + 0.019 * a, bandwidth: 2e6 * 50f64.powf(b) },
                Links::Fog => PeerSpec { speed, latency_s: 0.002 * 50f64.powf(a), bandwidth: 0.25e6 * 50f64.powf(b) },
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Task {
    owner: usize,
    work: f64,
    arrived: f64,
    /// When the current attempt was dispatched, and what was promised.
    dispatched: f64,
    promised: f64,
    auction: u64,
    /// When it reached its peer, and when service started there.
    reached: f64,
    started: f64,
    /// When the result left the peer.
    finished: f64,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Arrival,
    /// (Re-)dispatch a task from its owner.
    Dispatch(Task),
    /// A call for bids reaches `peer`.
    Call { task: Task, peer: usize },
    /// A bid reaches the owner.
    Bid { task: Task, peer: usize, quote: Quote },
    /// The owner's auction deadline.
    Deadline { owner: usize },
    /// A task (with its activation) reaches its peer.
    Reach { task: Task, peer: usize, epoch: u32 },
    /// `peer` finishes the task at the head of its queue.
    Done { peer: usize, epoch: u32 },
    /// The result reaches the owner.
    Result { task: Task, peer: usize },
    /// An auction's outcome reaches a candidate, `key` = (owner, auction):
    /// its award (`awarded` work) or its release (0).
    Heard { peer: usize, key: (usize, u64), awarded: f64 },
    Gossip { peer: usize },
    /// A report made at `made` becomes visible to the others.
    Seen { peer: usize, queue_s: f64, made: f64 },
    Fail { peer: usize },
    Recover { peer: usize },
}

struct Timed {
    at: f64,
    seq: u64,
    ev: Event,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> Ordering {
        // Earliest first in a max-heap.
        o.at.total_cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Clone)]
struct PeerState {
    spec: PeerSpec,
    up: bool,
    /// Bumped at each failure: events of an older epoch are void.
    epoch: u32,
    queue: VecDeque<Task>,
    /// Work queued or in service.
    backlog: f64,
    /// Work assigned (sent, not yet finished), as a central scheduler sees it.
    assigned: f64,
    /// Work awarded to this peer whose award has not reached it yet
    /// (bidding: the peer cannot count what it has not heard of).
    unheard: f64,
    /// Bids this peer made in auctions it has not heard the outcome of
    /// (bidding), keyed by (owner, auction).
    book: BidBook<(usize, u64)>,
    busy_s: f64,
    started: f64,
    /// Last report visible to others: (queue seconds, made at).
    board: Option<(f64, f64)>,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    policy: Policy,
    /// The policy's own random choices.
    rng: Rng,
    /// Arrivals: owners, work, gaps (the same for every policy).
    arr: Rng,
    /// Failures and recoveries (the same for every policy).
    fail: Rng,
    now: f64,
    seq: u64,
    heap: BinaryHeap<Timed>,
    peers: Vec<PeerState>,
    scheds: Vec<Scheduler>,
    /// Per owner: auction id -> task.
    pending: Vec<Vec<(u64, Task)>>,
    rr: Vec<usize>,
    latencies: Vec<f64>,
    messages: f64,
    candidates_asked: f64,
    gossip: f64,
    redispatched: usize,
    arrivals: usize,
    last_done: f64,
    /// Per completed task (in the order of `latencies`), the parts of its
    /// latency (see [`Breakdown`]).
    parts: Vec<[f64; 5]>,
}

impl Sim<'_> {
    fn at(&mut self, dt: f64, ev: Event) {
        self.seq += 1;
        self.heap.push(Timed { at: self.now + dt.max(0.0), seq: self.seq, ev });
    }

    fn msg_delay(&self, a: usize, b: usize) -> f64 {
        (self.peers[a].spec.latency_s + self.peers[b].spec.latency_s) / 2.0
    }

    fn transfer(&self, a: usize, b: usize) -> f64 {
        let bw = self.peers[a].spec.bandwidth.min(self.peers[b].spec.bandwidth);
        self.msg_delay(a, b) + if a == b { 0.0 } else { self.cfg.task_bytes / bw }
    }

    /// The queue a peer would report or quote now (never negative: the
    /// backlog is a running sum of floats).
    fn queue_s(&self, p: usize) -> f64 {
        (self.peers[p].backlog / self.peers[p].spec.speed).max(0.0)
    }

    /// Whether `p`'s gossip has gone silent for longer than
    /// [`SILENT_AFTER_INTERVALS`] intervals: others presume it down.
    fn silent(&self, p: usize) -> bool {
        self.peers[p].board.is_none_or(|(_, at)| self.now - at > SILENT_AFTER_INTERVALS * self.cfg.gossip_interval_s)
    }

    fn gossip_estimate(&self, owner: usize, p: usize, work: f64) -> f64 {
        let s = &self.peers[p];
        if self.silent(p) {
            return f64::INFINITY;
        }
        let queue = s.board.map_or(0.0, |(q, at)| (q - (self.now - at)).max(0.0));
        queue + work / s.spec.speed + self.transfer(owner, p)
    }

    fn send(&mut self, mut task: Task, peer: usize, promised: f64) {
        task.dispatched = self.now;
        task.promised = promised;
        self.peers[peer].assigned += task.work;
        let epoch = self.peers[peer].epoch;
        let d = self.transfer(task.owner, peer);
        self.at(d, Event::Reach { task, peer, epoch });
    }

    fn dispatch(&mut self, task: Task) {
        let n = self.peers.len();
        let o = task.owner;
        let up: Vec<usize> = (0..n).filter(|&p| self.peers[p].up).collect();
        let pick = match self.policy {
            Policy::Greedy => {
                self.messages += 2.0;
                up.iter()
                    .copied()
                    .max_by(|&a, &b| {
                        let ra = self.peers[a].spec.speed - self.peers[a].assigned;
                        let rb = self.peers[b].spec.speed - self.peers[b].assigned;
                        ra.total_cmp(&rb).then(b.cmp(&a))
                    })
            }
            Policy::Oracle => {
                self.messages += 2.0;
                let est = |p: usize| {
                    (self.peers[p].assigned + task.work) / self.peers[p].spec.speed + self.transfer(o, p)
                };
                up.iter().copied().min_by(|&a, &b| est(a).total_cmp(&est(b)).then(a.cmp(&b)))
            }
            Policy::RoundRobin => {
                self.rr[o] = (self.rr[o] + 1) % n;
                Some(self.rr[o])
            }
            Policy::Random => Some(self.rng.below(n)),
            Policy::P2c => {
                let (a, b) = (self.rng.below(n), self.rng.below(n));
                let (ea, eb) = (self.gossip_estimate(o, a, task.work), self.gossip_estimate(o, b, task.work));
                Some(if eb < ea { b } else { a })
            }
            Policy::Bidding => {
                self.start_auction(task);
                return;
            }
        };
        match pick {
            Some(p) => {
                let promised = self.queue_s(p) + task.work / self.peers[p].spec.speed;
                self.send(task, p, promised);
            }
            // Nobody is up: try again after the detection delay.
            None => self.at(self.cfg.detect_s, Event::Dispatch(task)),
        }
    }

    fn start_auction(&mut self, mut task: Task) {
        let n = self.peers.len();
        let o = task.owner;
        let k = self.cfg.candidates.min(n).max(1);
        // Candidates are drawn at random, without replacement, with weights
        // 1 / (gossiped expected completion)^beta: queue + service + transfer
        // as the owner last heard it, beta growing with the task's size
        // (BETA_PER_WORK per mean task, within BETA_RANGE). A small task's
        // estimate is mostly queue and transfer, so it spreads over many
        // peers; a big one's is mostly service, so it is asked of fast peers.
        // Randomness keeps owners holding the same stale gossip from all
        // asking the same few peers (a fixed "best by gossip" candidate did
        // exactly that: p99 1.41-1.46x the oracle's at 100 peers, against
        // 1.30-1.35x without it). Peers whose gossip went silent are presumed
        // down and not asked. Bids carry each peer's current queue (with its
        // in-flight awards and open bids), so the auction corrects the gossip.
        let beta = (BETA_PER_WORK * task.work / self.cfg.mean_work).clamp(BETA_RANGE.0, BETA_RANGE.1);
        let mut weight: Vec<f64> = (0..n)
            .map(|p| if self.silent(p) { 0.0 } else { self.gossip_estimate(o, p, task.work).powf(-beta) })
            .collect();
        let k = k.min(weight.iter().filter(|w| **w > 0.0).count()).max(1);
        let mut cands: Vec<usize> = Vec::with_capacity(k);
        while cands.len() < k {
            let total: f64 = weight.iter().sum();
            if total <= 0.0 {
                break;
            }
            let mut x = self.rng.uniform() * total;
            let mut pick = n - 1;
            for (i, w) in weight.iter().enumerate() {
                if x < *w {
                    pick = i;
                    break;
                }
                x -= w;
            }
            if weight[pick] > 0.0 {
                weight[pick] = 0.0;
                cands.push(pick);
            }
        }
        if cands.is_empty() {
            // Every peer is silent: try again after the detection delay.
            self.at(self.cfg.detect_s, Event::Dispatch(task));
            return;
        }
        for &p in &cands {
            if let Some((q, at)) = self.peers[p].board {
                let report = LoadReport { queue_s: q, speed: self.peers[p].spec.speed, sent_at: at };
                self.scheds[o].on_load_report(p as u64, report, self.now);
            }
            let rtt = 2.0 * self.msg_delay(o, p);
            self.scheds[o].on_rtt(p as u64, rtt);
        }
        let list: Vec<(u64, f64)> = cands.iter().map(|&p| (p as u64, self.transfer(o, p))).collect();
        let (id, actions) = self.scheds[o].start(TaskSpec { work: task.work }, &list, self.now);
        task.auction = id;
        self.candidates_asked += cands.len() as f64;
        self.pending[o].push((id, task));
        if let Some(at) = self.scheds[o].deadline(id) {
            let t = at - self.now;
            self.at(t + 1e-9, Event::Deadline { owner: o });
        }
        self.apply(o, actions);
    }

    fn apply(&mut self, owner: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::CallForBids { auction, peer } => {
                    self.messages += 1.0;
                    let Some(&(_, task)) = self.pending[owner].iter().find(|(id, _)| *id == auction) else { continue };
                    let d = self.msg_delay(owner, peer as usize);
                    self.at(d, Event::Call { task, peer: peer as usize });
                }
                Action::Award { auction, peer, expected_s, .. } => {
                    self.messages += 1.0;
                    let Some(i) = self.pending[owner].iter().position(|(id, _)| *id == auction) else { continue };
                    let (_, task) = self.pending[owner].swap_remove(i);
                    let p = peer as usize;
                    let promised = if expected_s.is_finite() { expected_s } else { self.gossip_estimate(owner, p, task.work) };
                    self.peers[p].unheard += task.work;
                    let d = self.msg_delay(owner, p);
                    self.at(d, Event::Heard { peer: p, key: (owner, auction), awarded: task.work });
                    self.send(task, p, promised);
                }
                Action::Release { auction, peer, .. } => {
                    self.messages += 1.0;
                    let p = peer as usize;
                    let d = self.msg_delay(owner, p);
                    self.at(d, Event::Heard { peer: p, key: (owner, auction), awarded: 0.0 });
                }
            }
        }
    }

    fn start_service(&mut self, p: usize) {
        let now = self.now;
        if let Some(t) = self.peers[p].queue.front_mut() {
            t.started = now;
            let d = t.work / self.peers[p].spec.speed;
            self.peers[p].started = self.now;
            let epoch = self.peers[p].epoch;
            self.at(d, Event::Done { peer: p, epoch });
        }
    }

    fn handle(&mut self, ev: Event) {
        let n = self.peers.len();
        match ev {
            Event::Arrival => {
                let task = Task {
                    owner: self.arr.below(n),
                    work: self.arr.exp(self.cfg.mean_work),
                    arrived: self.now,
                    dispatched: self.now,
                    promised: 0.0,
                    auction: 0,
                    reached: 0.0,
                    started: 0.0,
                    finished: 0.0,
                };
                self.arrivals += 1;
                self.dispatch(task);
                if self.arrivals < self.cfg.tasks {
                    let total: f64 = self.peers.iter().map(|p| p.spec.speed).sum();
                    let rate = self.cfg.load * total / self.cfg.mean_work;
                    let gap = self.arr.exp(1.0 / rate);
                    self.at(gap, Event::Arrival);
                }
            }
            Event::Dispatch(task) => self.dispatch(task),
            Event::Call { task, peer } => {
                if self.peers[peer].up {
                    // The bidder counts the work awarded to it that it has
                    // heard of (queued, in service or on its way) and the
                    // work of its own open bids, so concurrent auctions do
                    // not all pile onto it; then it holds this bid's work
                    // until the owner awards or releases it.
                    let now = self.now;
                    let lease = BID_LEASE_TIMEOUTS * self.cfg.auction_timeout_s;
                    let transfer_s = self.transfer(task.owner, peer);
                    let s = &mut self.peers[peer];
                    let service_s = task.work / s.spec.speed;
                    let queue_s = ((s.assigned - s.unheard) / s.spec.speed).max(0.0) + s.book.held_s(now);
                    s.book.hold((task.owner, task.auction), service_s, now, lease);
                    let d = self.msg_delay(peer, task.owner);
                    self.at(d, Event::Bid { task, peer, quote: Quote { queue_s, service_s, transfer_s } });
                }
            }
            Event::Bid { task, peer, quote } => {
                self.messages += 1.0;
                let o = task.owner;
                let actions = self.scheds[o].on_bid(task.auction, peer as u64, quote, self.now);
                self.apply(o, actions);
            }
            Event::Deadline { owner } => {
                let actions = self.scheds[owner].on_tick(self.now);
                self.apply(owner, actions);
            }
            Event::Reach { mut task, peer, epoch } => {
                let s = &mut self.peers[peer];
                if !s.up || s.epoch != epoch {
                    s.assigned -= task.work;
                    self.redispatched += 1;
                    let d = self.cfg.detect_s;
                    self.at(d, Event::Dispatch(task));
                    return;
                }
                task.reached = self.now;
                s.queue.push_back(task);
                s.backlog += task.work;
                if s.queue.len() == 1 {
                    self.start_service(peer);
                }
            }
            Event::Done { peer, epoch } => {
                if self.peers[peer].epoch != epoch || !self.peers[peer].up {
                    return;
                }
                let s = &mut self.peers[peer];
                let Some(mut task) = s.queue.pop_front() else { return };
                task.finished = self.now;
                s.backlog -= task.work;
                s.assigned -= task.work;
                s.busy_s += self.now - s.started;
                let d = self.msg_delay(peer, task.owner);
                self.at(d, Event::Result { task, peer });
                self.start_service(peer);
            }
            Event::Result { task, peer } => {
                self.latencies.push(self.now - task.arrived);
                let parts = [
                    task.dispatched - task.arrived,
                    task.reached - task.dispatched,
                    task.started - task.reached,
                    task.finished - task.started,
                    self.now - task.finished,
                ];
                self.parts.push(parts);
                self.last_done = self.now;
                if self.policy == Policy::Bidding {
                    self.scheds[task.owner].on_outcome(peer as u64, task.promised, self.now - task.dispatched);
                }
            }
            Event::Heard { peer, key, awarded } => {
                self.peers[peer].book.release(&key);
                self.peers[peer].unheard -= awarded;
            }
            Event::Gossip { peer } => {
                if self.peers[peer].up {
                    let (queue_s, made) = (self.queue_s(peer), self.now);
                    self.at(self.cfg.gossip_delay_s, Event::Seen { peer, queue_s, made });
                    self.gossip += (n - 1) as f64;
                }
                if self.arrivals < self.cfg.tasks || self.latencies.len() < self.arrivals {
                    self.at(self.cfg.gossip_interval_s, Event::Gossip { peer });
                }
            }
            Event::Seen { peer, queue_s, made } => {
                if self.peers[peer].board.is_none_or(|(_, at)| at <= made) {
                    self.peers[peer].board = Some((queue_s, made));
                }
            }
            Event::Fail { peer } => {
                let s = &mut self.peers[peer];
                if s.queue.front().is_some() {
                    s.busy_s += self.now - s.started;
                }
                s.up = false;
                s.book.clear();
                s.epoch += 1;
                let lost: Vec<Task> = s.queue.drain(..).collect();
                s.backlog = 0.0;
                for t in lost {
                    self.peers[peer].assigned -= t.work;
                    self.redispatched += 1;
                    let d = self.cfg.detect_s;
                    self.at(d, Event::Dispatch(t));
                }
                let down = self.fail.exp(self.cfg.mean_down_s);
                self.at(down, Event::Recover { peer });
            }
            Event::Recover { peer } => {
                self.peers[peer].up = true;
                if self.arrivals < self.cfg.tasks {
                    let up = self.fail.exp(self.cfg.mean_up_s);
                    self.at(up, Event::Fail { peer });
                }
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `policy` on `cfg`. The same configuration gives the same metrics.
pub fn simulate(cfg: &SimConfig, policy: Policy) -> Metrics {
    let n = cfg.peers.len();
    let peers = cfg
        .peers
        .iter()
        .map(|&spec| PeerState {
            spec,
            up: true,
            epoch: 0,
            queue: VecDeque::new(),
            backlog: 0.0,
            assigned: 0.0,
            unheard: 0.0,
            book: BidBook::new(BID_BOOK_CAPACITY),
            busy_s: 0.0,
            started: 0.0,
            board: Some((0.0, 0.0)),
        })
        .collect();
    let sched_cfg = SchedConfig { auction_timeout_s: cfg.auction_timeout_s, ..SchedConfig::default() };
    let mut sim = Sim {
        cfg,
        policy,
        rng: Rng::new(cfg.seed ^ 0x9011C7),
        arr: Rng::new(cfg.seed),
        fail: Rng::new(cfg.seed ^ 0xFA11),
        now: 0.0,
        seq: 0,
        heap: BinaryHeap::new(),
        peers,
        scheds: vec![Scheduler::new(sched_cfg); n],
        pending: vec![Vec::new(); n],
        rr: (0..n).collect(),
        latencies: Vec::with_capacity(cfg.tasks),
        messages: 0.0,
        candidates_asked: 0.0,
        gossip: 0.0,
        redispatched: 0,
        arrivals: 0,
        last_done: 0.0,
        parts: Vec::new(),
    };
    // Failures, arrivals and gossip draw from separate streams so every policy
    // sees the same arrivals and the same failures.
    let mut phase = Rng::new(cfg.seed ^ 0x6055);
    for p in 0..n {
        if cfg.mean_up_s > 0.0 {
            let t = sim.fail.exp(cfg.mean_up_s);
            sim.at(t, Event::Fail { peer: p });
        }
        let t = phase.uniform() * cfg.gossip_interval_s;
        sim.at(t, Event::Gossip { peer: p });
    }
    sim.at(0.0, Event::Arrival);
    // Bound the run: every task completes unless the cluster is overloaded.
    let horizon = 50.0 * cfg.tasks as f64 * cfg.mean_work / (cfg.load * cfg.peers.iter().map(|p| p.speed).sum::<f64>());
    while let Some(Timed { at, ev, .. }) = sim.heap.pop() {
        if at > horizon || (sim.arrivals >= cfg.tasks && sim.latencies.len() >= cfg.tasks) {
            break;
        }
        sim.now = at;
        sim.handle(ev);
    }
    let mut order: Vec<usize> = (0..sim.latencies.len()).collect();
    order.sort_by(|&a, &b| sim.latencies[a].total_cmp(&sim.latencies[b]));
    let lat: Vec<f64> = order.iter().map(|&i| sim.latencies[i]).collect();
    let parts: Vec<[f64; 5]> = order.iter().map(|&i| sim.parts[i]).collect();
    let completed = lat.len();
    let span = sim.last_done.max(1e-9);
    let util: Vec<f64> = sim.peers.iter().map(|p| p.busy_s / span).collect();
    let mean_util = util.iter().sum::<f64>() / n as f64;
    let tasks = sim.arrivals.max(1) as f64;
    let per_task = sim.messages / tasks;
    let per_candidate = if policy == Policy::Bidding {
        sim.messages / sim.candidates_asked.max(1.0)
    } else {
        per_task
    };
    Metrics {
        mean_s: lat.iter().sum::<f64>() / completed.max(1) as f64,
        p50_s: percentile(&lat, 50.0),
        p99_s: percentile(&lat, 99.0),
        throughput: completed as f64 / span,
        load_variance: util.iter().map(|u| (u - mean_util).powi(2)).sum::<f64>() / n as f64,
        messages_per_task: per_task,
        messages_per_task_per_candidate: per_candidate,
        gossip_per_task: sim.gossip / tasks,
        completed,
        redispatched: sim.redispatched,
        breakdown: Breakdown::mean(&parts),
        tail_breakdown: Breakdown::mean(&parts[parts.len() - parts.len().div_ceil(100)..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_metrics() {
        let mut cfg = SimConfig::new(random_cluster(10, 3), 0.8, 3);
        cfg.tasks = 2000;
        for p in Policy::ALL {
            assert_eq!(simulate(&cfg, p), simulate(&cfg, p), "{p:?}");
        }
    }

    #[test]
    fn every_task_completes_despite_failures() {
        let mut cfg = SimConfig::new(random_cluster(10, 5), 0.5, 5);
        cfg.tasks = 3000;
        cfg.mean_up_s = 20.0;
        cfg.mean_down_s = 5.0;
        for p in Policy::ALL {
            let m = simulate(&cfg, p);
            assert_eq!(m.completed, cfg.tasks, "{p:?}");
            assert!(m.redispatched > 0 || p == Policy::Oracle || p == Policy::Greedy, "{p:?}: no failure hit");
        }
    }

    #[test]
    fn bidding_stays_within_three_messages_per_candidate() {
        let mut cfg = SimConfig::new(random_cluster(20, 9), 0.8, 9);
        cfg.tasks = 2000;
        let m = simulate(&cfg, Policy::Bidding);
        assert!(m.messages_per_task_per_candidate <= 3.0, "{m:?}");
    }
}
