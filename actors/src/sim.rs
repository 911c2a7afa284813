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

use serde::Serialize;


mod cluster;
mod engine;

pub use engine::simulate;
pub use cluster::{Links, PeerSpec, Rng, classic_cluster, random_cluster, random_cluster_with};

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
