//! The event loop of the simulator: arrivals, dispatch by each policy,
//! service, failures and gossip, in time order.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use super::*;
use crate::sched::{Action, BidBook, LoadReport, Quote, SchedConfig, Scheduler, TaskSpec};

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
                Action::Award { auction, peer, promised_s, .. } => {
                    self.messages += 1.0;
                    let Some(i) = self.pending[owner].iter().position(|(id, _)| *id == auction) else { continue };
                    let (_, task) = self.pending[owner].swap_remove(i);
                    let p = peer as usize;
                    let promised = if promised_s.is_finite() { promised_s } else { self.gossip_estimate(owner, p, task.work) };
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
