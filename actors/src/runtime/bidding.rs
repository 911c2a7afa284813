//! Bidding: this peer's bids for other owners' hops (held in a bid book
//! until the owner decides), the auctions it runs for its own sessions'
//! hops, and its load report.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use fogmesh_protocols::{Award, Bid, CallForBids, LoadReport, Message, NodeId, ShardLoad};

use super::{Runtime, lock};
use crate::link::PeerKey;
use crate::sched::{Action as SchedAction, LoadReport as SchedLoadReport, Quote as SchedQuote, TaskSpec as SchedTask};

/// How much longer than a round trip a bid may take to come in before an
/// auction stops waiting for it: the bidder answers from a process busy
/// with forward passes, and the call crosses both peers' schedulers (on
/// loopback under 8 concurrent streams, bids took 5-25 ms where pings took
/// under 1 ms). Paid once per session and failover, not per token.
pub(crate) const BID_ANSWER_MARGIN: Duration = Duration::from_millis(30);

/// A bid holds its work at most this long, whatever the call's deadline.
pub(super) const MAX_BID_LEASE: Duration = Duration::from_secs(10);

impl Runtime {
    /// This peer's bid for running `c`'s layers for `owner`: its queue (the
    /// work waiting plus a token per session open on the shard) and
    /// compute time from the shard's measured speed (from its GFLOPS estimate
    /// and a load time when the range is not loaded). The queue counts the
    /// work of this peer's other open bids; this bid's own work is held until
    /// the owner's award or release arrives, or for twice the call's deadline.
    /// Transfer is the owner's to add.
    pub async fn bid(&self, owner: &str, c: &CallForBids) -> Option<Bid> {
        let m = self.0.model.get()?;
        let (start, end) = (c.start as usize, c.end as usize);
        if c.model != m.hash || start >= end || end > m.config.layers {
            return None;
        }
        let work = m.costs.stage_work(start..end);
        let estimate_ms = work / (f64::from(self.0.cfg.gflops.max(0.01)) * 1e9) * 1e3;
        let slot = self.shards().await.into_iter().find(|s| s.range == (start..end));
        let (per_token_ms, queue_ms) = match &slot {
            // The work waiting, and a token's worth per open session: each
            // shares the passes the new one would run in.
            Some(s) => {
                let us = s.us_per_token.load(Ordering::Relaxed);
                let per = if us > 0 { us as f64 / 1e3 } else { estimate_ms };
                (per, (s.queued.len() + s.active.load(Ordering::Relaxed)) as f64 * per)
            }
            // Not loaded: reading its weights comes first (~1 GB/s).
            None => (estimate_ms, m.costs.stage_bytes(start..end) as f64 / 1e6),
        };
        let service_ms = per_token_ms * f64::from(c.tokens.max(1));
        let now = self.0.started.elapsed().as_secs_f64();
        let lease_s = (2.0 * f64::from(c.deadline_ms) / 1e3).clamp(0.01, MAX_BID_LEASE.as_secs_f64());
        let held_ms = {
            let mut book = lock(&self.0.bids);
            let held = book.held_s(now) * 1e3;
            book.hold((owner.to_string(), c.auction), service_ms / 1e3, now, lease_s);
            held
        };
        let scale = if self.0.cfg.bid_scale.is_finite() && self.0.cfg.bid_scale > 0.0 { self.0.cfg.bid_scale } else { 1.0 };
        Some(Bid {
            auction: c.auction,
            peer: NodeId::from(self.0.local.as_str()),
            queue_ms: (queue_ms + held_ms) as f32 * scale,
            service_ms: service_ms as f32 * scale,
            transfer_ms: 0.0,
        })
    }

    fn sched_id(&self, peer: &str) -> Option<u64> {
        let mut ids = lock(&self.0.sched_ids);
        if let Some(i) = ids.iter().position(|p| p == peer) {
            return Some(i as u64);
        }
        if ids.len() >= 4096 {
            return None;
        }
        ids.push(peer.to_string());
        Some(ids.len() as u64 - 1)
    }

    /// Bids this peer made whose auctions it has not heard the end of.
    pub fn open_bids(&self) -> usize {
        let now = self.0.started.elapsed().as_secs_f64();
        let mut book = lock(&self.0.bids);
        book.held_s(now);
        book.len()
    }

    /// Runs an auction among `candidates` (the first is the planned peer) for
    /// layers `range` of a `tokens`-token task: calls for bids, awards the
    /// lowest expected completion (adjusted by each peer's record), or by the
    /// scheduler's fallback when bids do not come in time. `cached` names a
    /// candidate holding that many of the tokens already (this owner's
    /// earlier turns): its service counts only the rest. Returns the winner
    /// and its own promise in seconds (before its record's adjustment).
    pub async fn auction(&self, candidates: &[PeerKey], range: Range<usize>, tokens: usize, cached: Option<(&str, usize)>) -> Option<(PeerKey, f64)> {
        let model = self.0.model.get()?;
        let ids: Vec<u64> = candidates.iter().map(|p| self.sched_id(p)).collect::<Option<_>>()?;
        let cached_id = cached.and_then(|(p, n)| Some((ids[candidates.iter().position(|c| c == p)?], n)));
        let now = || self.0.started.elapsed().as_secs_f64();
        let task = SchedTask { work: tokens as f64 };
        let pairs: Vec<(u64, f64)> = ids.iter().map(|&i| (i, 0.0)).collect();
        // The gossiped load of each candidate, for the scheduler's fallback
        // when no bid comes in time: its speed on this range (tokens/s from
        // its GFLOPS) and its waiting stage requests at that speed. The view
        // is the latest gossip, so it counts as fresh.
        let work = model.costs.stage_work(range.clone());
        let view = self.view().await;
        {
            let mut sched = lock(&self.0.sched);
            for (p, &id) in candidates.iter().zip(&ids) {
                let Some(v) = view.iter().find(|v| v.peer == *p) else { continue };
                let speed = f64::from(v.gflops) * 1e9 / work.max(1.0);
                let report = SchedLoadReport { queue_s: f64::from(v.queued) / speed.max(1e-9), speed, sent_at: now() };
                sched.on_load_report(id, report, now());
                if let Some(rtt) = v.rtt_ms {
                    sched.on_rtt(id, f64::from(rtt) / 1e3);
                }
            }
        }
        // A holder of part of the task computes only the rest.
        let shares: Vec<(u64, f64)> =
            cached_id.map(|(c, n)| (c, tokens.saturating_sub(n).max(1) as f64 / tokens.max(1) as f64)).into_iter().collect();
        let (auction, actions) = lock(&self.0.sched).start_shared(task, &pairs, &shares, now());
        // No bid and no gossip about any candidate: the plan's own peer keeps
        // the hop.
        let planned = ids[0];
        let award = |actions: &[SchedAction]| {
            actions.iter().find_map(|a| match *a {
                SchedAction::Award { auction: a, peer, expected_s, promised_s, .. } if a == auction && expected_s.is_finite() => {
                    Some((peer, promised_s))
                }
                SchedAction::Award { auction: a, .. } if a == auction => Some((planned, f64::INFINITY)),
                _ => None,
            })
        };
        let mut basis = basis_of(&actions);
        let mut won = award(&actions);
        let mut decided = Vec::new();
        if won.is_none() {
            let timeout = self.0.cfg.bid_timeout;
            let calls = actions.into_iter().filter_map(|a| match a {
                SchedAction::CallForBids { peer, .. } => Some(peer),
                _ => None,
            });
            let calls = calls.map(|id| {
                let peer = candidates[ids.iter().position(|&i| i == id).unwrap_or(0)].clone();
                let msg = Message::CallForBids(CallForBids {
                    auction,
                    session: 0,
                    model: model.hash,
                    start: range.start as u32,
                    end: range.end as u32,
                    tokens: tokens as u32,
                    activation_bytes: (tokens * model.config.hidden * 4) as u64,
                    deadline_ms: timeout.as_millis() as u32,
                });
                async move { (id, tokio::time::timeout(timeout, self.call(&peer, msg)).await) }
            });
            // Bids are taken as they come; the scheduler closes the auction
            // as soon as no missing bid could win, or at its deadline (the
            // timeout, or sooner where every candidate's round trip is known).
            let mut calls: futures::stream::FuturesUnordered<_> = calls.collect();
            let wait = lock(&self.0.sched).deadline(auction).map_or(0.0, |d| (d - now()).max(0.0));
            let deadline = tokio::time::sleep(Duration::from_secs_f64(wait));
            tokio::pin!(deadline);
            while won.is_none() {
                let (id, r) = tokio::select! {
                    next = calls.next() => match next {
                        Some(answer) => answer,
                        None => break,
                    },
                    () = &mut deadline => break,
                };
                if let Ok(Ok(Message::Bid(b))) = r {
                    // The share of the task the bidder must compute (its
                    // bid counts all of it: it does not know what it keeps).
                    let rest = shares.iter().find(|s| s.0 == id).map_or(1.0, |s| s.1);
                    tracing::debug!(auction, bidder = id, queue_ms = b.queue_ms, service_ms = b.service_ms, share = rest, "bid in");
                    let q = SchedQuote {
                        queue_s: f64::from(b.queue_ms) / 1e3,
                        service_s: f64::from(b.service_ms) / 1e3 * rest,
                        transfer_s: f64::from(b.transfer_ms) / 1e3,
                    };
                    let actions = lock(&self.0.sched).on_bid(auction, id, q, now());
                    if let Some(w) = award(&actions) {
                        won = Some(w);
                        decided = actions;
                    }
                }
            }
            if won.is_none() {
                // The deadline has passed, or every call has failed: this
                // auction (not the other sessions' ones) closes on what it has.
                decided = lock(&self.0.sched).close_now(auction, now());
                won = award(&decided);
            }
        }
        let (id, promised) = won?;
        basis = basis.or_else(|| basis_of(&decided));
        tracing::debug!(auction, winner = id, promised_s = promised, ?basis, "auction decided");
        let winner = lock(&self.0.sched_ids).get(id as usize).cloned()?;
        // Every candidate asked hears the outcome, so the losers' bids stop
        // counting against their other offers (the winner's too: the session
        // opening on it brings the work itself). Sent in the background; a
        // lost one lapses at the bid's lease.
        let told: Vec<PeerKey> = decided
            .iter()
            .filter_map(|a| match *a {
                SchedAction::Release { peer, .. } | SchedAction::Award { peer, .. } => {
                    candidates.get(ids.iter().position(|&i| i == peer)?).cloned()
                }
                _ => None,
            })
            .collect();
        for peer in told {
            let (rt, msg) = (self.clone(), Message::Award(Award { auction, peer: NodeId::from(winner.as_str()) }));
            tokio::spawn(async move {
                let _ = tokio::time::timeout(MAX_BID_LEASE, rt.call(&peer, msg)).await;
            });
        }
        Some((winner, promised))
    }

    /// Tells the scheduler how a promise turned out.
    pub fn auction_outcome(&self, peer: &str, promised_s: f64, actual_s: f64) {
        if let Some(id) = self.sched_id(peer) {
            lock(&self.0.sched).on_outcome(id, promised_s, actual_s);
        }
    }

    /// This peer's load, as gossiped and as answered to probes.
    pub async fn load_report(&self) -> LoadReport {
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let hash = self.0.model.get().map_or([0; 32], |m| m.hash);
        let shards = self
            .shards()
            .await
            .iter()
            .map(|s| ShardLoad {
                model: hash,
                start: s.range.start as u32,
                end: s.range.end as u32,
                queue_depth: s.queued.len() as u32,
                tokens_per_s: s.tokens_per_s(),
            })
            .collect();
        LoadReport { peer: NodeId::from(self.0.local.as_str()), timestamp_ms: now_ms, shards }
    }

}

/// On what an auction's award was decided (for the debug trace).
fn basis_of(actions: &[SchedAction]) -> Option<crate::sched::AwardBasis> {
    actions.iter().find_map(|a| match a {
        SchedAction::Award { basis, .. } => Some(*basis),
        _ => None,
    })
}
