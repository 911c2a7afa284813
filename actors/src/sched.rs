//! The sans-I/O scheduling core: gossiped load views, calls for bids, awards,
//! timeouts, and a defence against peers that underbid.
//!
//! A task's owner asks the candidate peers for bids. A bid is the bidder's
//! expected completion time: queue wait + service time (from its measured
//! speed) + transfer time of the task's activation over the link. The owner
//! awards the task to the lowest bid after adjusting every bid by what that
//! peer's past promises turned out to be worth (an exponentially weighted
//! ratio of actual to promised time), ties going to the lower peer id. It
//! closes as soon as no missing bid could win (a silent candidate's best case
//! counts the wait until its bid can arrive). An auction that has not heard
//! from every candidate by its deadline (the timeout, or sooner when the
//! round trips to all candidates are known) awards among the bids it has;
//! one with no bid at all falls back to the best choice by gossiped load.
//!
//! A bid is an offer the bidder holds: until it hears how the auction went,
//! it counts the task's work in the bids it makes to other owners (see
//! [`BidBook`]), so concurrent auctions do not all pile onto the peer that
//! looked idle when they asked. Every candidate hears the outcome: the
//! winner its award, the others a [`Action::Release`]. That is at most three
//! messages per candidate (call, bid, award or release).
//!
//! Driven as `handle(input, now) -> actions` (see quinn-proto): no clock, no
//! I/O, no randomness, so the same inputs always give the same schedule.

use std::collections::BTreeMap;

/// A peer, as the scheduler knows it.
pub type PeerId = u64;
/// An auction, unique per scheduler.
pub type AuctionId = u64;

/// What a peer gossips about itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    /// Seconds of work waiting in its queue when the report was made.
    pub queue_s: f64,
    /// Measured speed in work units per second.
    pub speed: f64,
    /// When the report was made (sender's time, seconds).
    pub sent_at: f64,
}

/// A task to place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskSpec {
    /// Work units (divided by a peer's speed gives its service time).
    pub work: f64,
}

/// A bid, broken down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quote {
    /// Expected wait in the bidder's queue.
    pub queue_s: f64,
    /// Expected compute time.
    pub service_s: f64,
    /// Expected transfer time of the input over the link to the bidder.
    pub transfer_s: f64,
}

impl Quote {
    /// The promised completion time.
    pub fn total(&self) -> f64 {
        self.queue_s + self.service_s + self.transfer_s
    }
}

/// How an award was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwardBasis {
    /// The only candidate.
    Single,
    /// Every candidate bid.
    AllBids,
    /// The candidates still silent could not win: even with an empty queue,
    /// their service and transfer time (from gossiped speed) exceed the best
    /// bid. Decided without waiting for them.
    Decided,
    /// The deadline passed; the bids that arrived decided.
    PartialBids,
    /// No bid arrived in time: best by gossiped load.
    Gossip,
}

/// What the scheduler asks its shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a call for bids for `auction` to `peer`.
    CallForBids {
        /// The auction.
        auction: AuctionId,
        /// Whom to ask.
        peer: PeerId,
    },
    /// Give the task of `auction` to `peer`.
    Award {
        /// The auction.
        auction: AuctionId,
        /// The winner.
        peer: PeerId,
        /// The winner's promise, adjusted by its record (seconds); infinite
        /// when nothing is known of it.
        expected_s: f64,
        /// The winner's own promise, before its record's adjustment: what
        /// [`Scheduler::on_outcome`] compares the task's time with (an
        /// adjusted promise there would learn only the square root of the
        /// peer's true ratio).
        promised_s: f64,
        /// How it was decided.
        basis: AwardBasis,
    },
    /// Tell `peer`, a candidate that did not win `auction`, that its bid is
    /// released (it was awarded to `winner`).
    Release {
        /// The auction.
        auction: AuctionId,
        /// The losing candidate.
        peer: PeerId,
        /// Who won.
        winner: PeerId,
    },
}

/// Tuning of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedConfig {
    /// How long an auction waits for bids at most (seconds).
    pub auction_timeout_s: f64,
    /// When the round-trip time to every candidate is known, the auction
    /// waits only `rtt_factor` times the longest of them plus
    /// `rtt_margin_s` (within the timeout): a bid that late is presumed lost.
    pub rtt_factor: f64,
    /// See `rtt_factor` (seconds).
    pub rtt_margin_s: f64,
    /// Weight of the newest observation in a peer's promise record.
    pub trust_alpha: f64,
    /// Bounds of the actual/promised ratio a record may reach.
    pub trust_bounds: (f64, f64),
    /// Gossip older than this is ignored by the fallback (seconds).
    pub max_gossip_age_s: f64,
    /// A bid's compute time is raised to at least the task's work at this
    /// many times the bidder's gossiped speed: a peer cannot win by
    /// promising to be faster than it says it is by more than that.
    pub speed_slack: f64,
    /// The least any bid promises (seconds), so that even a zero bid is a
    /// promise whose breaking is recorded against the bidder.
    pub min_bid_s: f64,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            auction_timeout_s: 0.25,
            rtt_factor: 1.5,
            rtt_margin_s: 0.005,
            trust_alpha: 0.1,
            trust_bounds: (0.5, 20.0),
            max_gossip_age_s: 10.0,
            speed_slack: 4.0,
            min_bid_s: 0.001,
        }
    }
}

#[derive(Debug, Clone)]
struct Auction {
    task: TaskSpec,
    /// Candidates and the owner's estimate of the transfer time to each.
    candidates: Vec<(PeerId, f64)>,
    /// The share of the task's work a candidate must do, where it is not
    /// all of it (it holds part of the result already).
    shares: BTreeMap<PeerId, f64>,
    bids: BTreeMap<PeerId, Quote>,
    started: f64,
    deadline: f64,
}

impl Auction {
    /// The work `peer` must do for this auction's task.
    fn work(&self, peer: PeerId) -> f64 {
        self.task.work * self.shares.get(&peer).copied().unwrap_or(1.0)
    }
}

/// One owner's scheduler.
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    cfg: SchedConfig,
    views: BTreeMap<PeerId, (LoadReport, f64)>,
    /// Round-trip time to each peer, as the owner measured it.
    rtts: BTreeMap<PeerId, f64>,
    /// Per peer: EWMA of actual / promised completion time.
    record: BTreeMap<PeerId, f64>,
    auctions: BTreeMap<AuctionId, Auction>,
    next: AuctionId,
}

impl Scheduler {
    /// A scheduler with the given tuning.
    pub fn new(cfg: SchedConfig) -> Self {
        Scheduler { cfg, ..Default::default() }
    }

    /// Records a peer's gossiped load, received at `now`. Older reports than
    /// the one held are ignored.
    pub fn on_load_report(&mut self, peer: PeerId, report: LoadReport, now: f64) {
        let newer = self.views.get(&peer).is_none_or(|(r, _)| report.sent_at >= r.sent_at);
        if newer && report.speed > 0.0 && report.queue_s.is_finite() && report.queue_s >= 0.0 {
            self.views.insert(peer, (report, now));
        }
    }

    /// Records the round-trip time to a peer (seconds), from the owner's
    /// pings: a silent candidate's bid is not expected before it.
    pub fn on_rtt(&mut self, peer: PeerId, rtt_s: f64) {
        if rtt_s.is_finite() && rtt_s >= 0.0 {
            self.rtts.insert(peer, rtt_s);
        }
    }

    /// Forgets a peer (it left the mesh).
    pub fn forget(&mut self, peer: PeerId) {
        self.views.remove(&peer);
        self.rtts.remove(&peer);
    }

    /// The actual/promised ratio on record for `peer` (1 without a record).
    pub fn record(&self, peer: PeerId) -> f64 {
        self.record.get(&peer).copied().unwrap_or(1.0)
    }

    /// Learns from a finished task: `peer` promised `promised_s` and took
    /// `actual_s`. A peer that keeps underbidding sees its bids inflated.
    pub fn on_outcome(&mut self, peer: PeerId, promised_s: f64, actual_s: f64) {
        if !(promised_s > 0.0 && actual_s >= 0.0 && actual_s.is_finite()) {
            return;
        }
        let (lo, hi) = self.cfg.trust_bounds;
        let ratio = (actual_s / promised_s).clamp(lo, hi);
        let a = self.cfg.trust_alpha;
        let r = self.record.entry(peer).or_insert(1.0);
        *r = (1.0 - a) * *r + a * ratio;
    }

    /// The gossip-based estimate of the completion time at `peer`, if its
    /// view is fresh enough: the queue it reported, drained by the time since,
    /// plus service and transfer.
    pub fn gossip_estimate(&self, peer: PeerId, task: TaskSpec, transfer_s: f64, now: f64) -> Option<f64> {
        let (r, received) = self.views.get(&peer)?;
        let age = now - received;
        if age > self.cfg.max_gossip_age_s {
            return None;
        }
        let queue = (r.queue_s - (now - r.sent_at).max(0.0)).max(0.0);
        Some((queue + task.work / r.speed + transfer_s) * self.record(peer))
    }

    /// Opens an auction for `task` among `candidates` (peer and the owner's
    /// estimate of the transfer time to it). With one candidate the award is
    /// immediate; with none there is nothing to do.
    pub fn start(&mut self, task: TaskSpec, candidates: &[(PeerId, f64)], now: f64) -> (AuctionId, Vec<Action>) {
        self.start_shared(task, candidates, &[], now)
    }

    /// [`Scheduler::start`] where some candidates must do only a share of
    /// the task's work (`shares`: peer and share in (0, 1]; for instance a
    /// peer holding part of a prompt's keys and values already): their
    /// bids' floors, the bounds that close an auction early and their
    /// gossip estimates count only that share.
    pub fn start_shared(&mut self, task: TaskSpec, candidates: &[(PeerId, f64)], shares: &[(PeerId, f64)], now: f64) -> (AuctionId, Vec<Action>) {
        let id = self.next;
        self.next += 1;
        let mut cands: Vec<(PeerId, f64)> = Vec::with_capacity(candidates.len());
        for &(p, t) in candidates {
            if !cands.iter().any(|(q, _)| *q == p) {
                cands.push((p, t));
            }
        }
        match cands.as_slice() {
            [] => (id, Vec::new()),
            [(peer, transfer)] => {
                let share = shares.iter().find(|(p, _)| p == peer).map_or(1.0, |s| s.1.clamp(0.0, 1.0));
                let expected = self.gossip_estimate(*peer, TaskSpec { work: task.work * share }, *transfer, now).unwrap_or(f64::INFINITY);
                let promised_s = expected / self.record(*peer);
                (id, vec![Action::Award { auction: id, peer: *peer, expected_s: expected, promised_s, basis: AwardBasis::Single }])
            }
            _ => {
                let calls = cands.iter().map(|(p, _)| Action::CallForBids { auction: id, peer: *p }).collect();
                let wait = cands
                    .iter()
                    .map(|(p, _)| self.rtts.get(p).map_or(f64::INFINITY, |r| r * self.cfg.rtt_factor + self.cfg.rtt_margin_s))
                    .fold(0.0, f64::max);
                let deadline = now + wait.min(self.cfg.auction_timeout_s);
                let shares = shares.iter().filter(|s| s.1.is_finite()).map(|&(p, v)| (p, v.clamp(0.0, 1.0))).collect();
                self.auctions.insert(id, Auction { task, candidates: cands, shares, bids: BTreeMap::new(), started: now, deadline });
                (id, calls)
            }
        }
    }

    /// A bid arrived. Bids from peers that were not asked, repeated bids,
    /// malformed bids and bids for closed auctions are ignored.
    pub fn on_bid(&mut self, auction: AuctionId, peer: PeerId, quote: Quote, now: f64) -> Vec<Action> {
        let Some(a) = self.auctions.get_mut(&auction) else { return Vec::new() };
        let valid = [quote.queue_s, quote.service_s, quote.transfer_s].iter().all(|v| v.is_finite() && *v >= 0.0);
        if !valid || !a.candidates.iter().any(|(p, _)| *p == peer) {
            return Vec::new();
        }
        let quote = floored(quote, a, peer, self.views.get(&peer).map(|(r, _)| r.speed), &self.cfg);
        a.bids.entry(peer).or_insert(quote);
        if a.bids.len() == a.candidates.len() {
            return self.close(auction, AwardBasis::AllBids, now);
        }
        // Close early when no silent candidate can beat the best bid, counting
        // the time its bid still needs to arrive: waiting for it delays the
        // task as much as a longer queue would.
        let a = &self.auctions[&auction];
        let best = a.bids.iter().map(|(p, q)| (q.total() * self.record(*p), *p)).min_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
        let beatable = a.candidates.iter().filter(|(p, _)| !a.bids.contains_key(p)).any(|&(p, transfer)| {
            match (self.views.get(&p), best) {
                // A lower bound of its adjusted bid: a queue drains at most
                // one second per second, so it holds at least what it
                // reported less the time since.
                (Some((r, _)), Some((b, _))) => {
                    let queue = (r.queue_s - (now - r.sent_at).max(0.0)).max(0.0);
                    let due = self.rtts.get(&p).map_or(0.0, |rtt| (a.started + rtt - now).max(0.0));
                    due + (queue + a.work(p) / r.speed + transfer) * self.record(p) <= b
                }
                _ => true,
            }
        });
        if !beatable {
            return self.close(auction, AwardBasis::Decided, now);
        }
        Vec::new()
    }

    /// Closes every auction whose deadline has passed.
    pub fn on_tick(&mut self, now: f64) -> Vec<Action> {
        let due: Vec<AuctionId> = self.auctions.iter().filter(|(_, a)| a.deadline <= now).map(|(id, _)| *id).collect();
        due.into_iter().flat_map(|id| self.close_now(id, now)).collect()
    }

    /// Closes auction `id` now, whatever its deadline: the shell stopped
    /// waiting for bids (every call failed or timed out). Decided as at the
    /// deadline: among the bids in, else by gossip.
    pub fn close_now(&mut self, id: AuctionId, now: f64) -> Vec<Action> {
        let Some(a) = self.auctions.get(&id) else { return Vec::new() };
        let basis = if a.bids.is_empty() { AwardBasis::Gossip } else { AwardBasis::PartialBids };
        self.close(id, basis, now)
    }

    /// The earliest open deadline, for the shell's timer.
    pub fn next_deadline(&self) -> Option<f64> {
        self.auctions.values().map(|a| a.deadline).min_by(f64::total_cmp)
    }

    /// When auction `id` stops waiting for bids, if it is open.
    pub fn deadline(&self, id: AuctionId) -> Option<f64> {
        self.auctions.get(&id).map(|a| a.deadline)
    }

    /// Open auctions.
    pub fn open_auctions(&self) -> usize {
        self.auctions.len()
    }

    /// Awards `id` and releases every other candidate.
    fn close(&mut self, id: AuctionId, basis: AwardBasis, now: f64) -> Vec<Action> {
        let Some(a) = self.auctions.remove(&id) else { return Vec::new() };
        let best = |it: &mut dyn Iterator<Item = (PeerId, f64)>| {
            it.filter(|(_, v)| v.is_finite()).min_by(|x, y| x.1.total_cmp(&y.1).then(x.0.cmp(&y.0)))
        };
        let chosen = if basis == AwardBasis::Gossip {
            best(&mut a.candidates.iter().filter_map(|&(p, t)| self.gossip_estimate(p, TaskSpec { work: a.work(p) }, t, now).map(|e| (p, e))))
                // Nothing known at all: the first candidate, deterministically.
                .or_else(|| a.candidates.iter().map(|(p, _)| *p).min().map(|p| (p, f64::INFINITY)))
        } else {
            best(&mut a.bids.iter().map(|(p, q)| (*p, q.total() * self.record(*p))))
        };
        let Some((winner, expected_s)) = chosen else { return Vec::new() };
        let promised_s = expected_s / self.record(winner);
        let mut out = vec![Action::Award { auction: id, peer: winner, expected_s, promised_s, basis }];
        out.extend(
            a.candidates.iter().filter(|(p, _)| *p != winner).map(|&(peer, _)| Action::Release { auction: id, peer, winner }),
        );
        out
    }
}

/// `q` from `peer` in auction `a`, raised to what the owner knows it
/// cannot beat: compute at `speed_slack` times its gossiped speed, the
/// owner's own estimate of the transfer, and `min_bid_s` in all.
fn floored(q: Quote, a: &Auction, peer: PeerId, speed: Option<f64>, cfg: &SchedConfig) -> Quote {
    let service = speed.filter(|v| *v > 0.0).map_or(0.0, |v| a.work(peer) / (v * cfg.speed_slack));
    let transfer = a.candidates.iter().find(|(p, _)| *p == peer).map_or(0.0, |c| c.1);
    let mut q = Quote { queue_s: q.queue_s, service_s: q.service_s.max(service), transfer_s: q.transfer_s.max(transfer) };
    if q.total() < cfg.min_bid_s {
        q.service_s += cfg.min_bid_s - q.total();
    }
    q
}

/// A bidder's open bids. Each holds the seconds of work it offered until the
/// owner awards or releases it, or until its lease runs out (an owner that
/// never answers cannot pin the bidder's quotes). Bounded: past `capacity`
/// holds, the one whose lease ends first is dropped.
#[derive(Debug, Clone)]
pub struct BidBook<K: Ord> {
    holds: BTreeMap<K, (f64, f64)>,
    capacity: usize,
}

impl<K: Ord + Clone> BidBook<K> {
    /// An empty book of at most `capacity` open bids.
    pub fn new(capacity: usize) -> Self {
        BidBook { holds: BTreeMap::new(), capacity: capacity.max(1) }
    }

    /// Seconds of work held by open bids at `now` (lapsed ones are dropped).
    pub fn held_s(&mut self, now: f64) -> f64 {
        self.holds.retain(|_, (_, until)| *until > now);
        self.holds.values().map(|(s, _)| s).sum()
    }

    /// Holds `seconds` for the bid `key` until `now + lease_s`. A second hold
    /// for the same key replaces the first.
    pub fn hold(&mut self, key: K, seconds: f64, now: f64, lease_s: f64) {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return;
        }
        self.holds.retain(|_, (_, until)| *until > now);
        if self.holds.len() >= self.capacity && !self.holds.contains_key(&key) {
            let first = self.holds.iter().min_by(|a, b| a.1.1.total_cmp(&b.1.1)).map(|(k, _)| k.clone());
            if let Some(k) = first {
                self.holds.remove(&k);
            }
        }
        self.holds.insert(key, (seconds, now + lease_s));
    }

    /// The owner decided (an award or a release): the bid no longer holds.
    /// Returns whether it was held.
    pub fn release(&mut self, key: &K) -> bool {
        self.holds.remove(key).is_some()
    }

    /// Open bids.
    pub fn len(&self) -> usize {
        self.holds.len()
    }

    /// Whether no bid is open.
    pub fn is_empty(&self) -> bool {
        self.holds.is_empty()
    }

    /// Forgets every bid (the bidder restarted).
    pub fn clear(&mut self) {
        self.holds.clear();
    }
}

#[cfg(test)]
mod tests;
