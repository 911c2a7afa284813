//! Properties of the scheduling core.

use proptest::prelude::*;

use super::*;

fn quote(total: f64) -> Quote {
    Quote { queue_s: total / 2.0, service_s: total / 2.0, transfer_s: 0.0 }
}

fn award(actions: &[Action]) -> Option<(PeerId, AwardBasis)> {
    actions.iter().find_map(|a| match a {
        Action::Award { peer, basis, .. } => Some((*peer, *basis)),
        _ => None,
    })
}

#[test]
fn lowest_bid_wins_and_ties_go_to_the_lower_id() {
    let mut s = Scheduler::new(SchedConfig::default());
    let (id, calls) = s.start(TaskSpec { work: 1.0 }, &[(3, 0.0), (1, 0.0), (2, 0.0)], 0.0);
    assert_eq!(calls.len(), 3);
    assert!(s.on_bid(id, 3, quote(1.0), 0.01).is_empty());
    assert!(s.on_bid(id, 1, quote(2.0), 0.01).is_empty());
    assert_eq!(award(&s.on_bid(id, 2, quote(1.0), 0.01)), Some((2, AwardBasis::AllBids)));
    assert_eq!(s.open_auctions(), 0);
}

#[test]
fn single_candidate_is_awarded_without_an_auction() {
    let mut s = Scheduler::new(SchedConfig::default());
    let (_, actions) = s.start(TaskSpec { work: 1.0 }, &[(5, 0.0), (5, 0.0)], 0.0);
    assert_eq!(award(&actions), Some((5, AwardBasis::Single)));
    assert_eq!(s.start(TaskSpec { work: 1.0 }, &[], 0.0).1, vec![]);
}

proptest! {
    #[test]
    fn never_awards_to_a_peer_that_did_not_bid(
        n in 2usize..10,
        bids in proptest::collection::vec((0u64..20, 0.0f64..10.0), 0..20),
        timeout in 0.01f64..1.0,
    ) {
        let mut s = Scheduler::new(SchedConfig { auction_timeout_s: timeout, ..Default::default() });
        let cands: Vec<(PeerId, f64)> = (0..n as u64).map(|p| (p, 0.0)).collect();
        let (id, _) = s.start(TaskSpec { work: 1.0 }, &cands, 0.0);
        let mut bidders = std::collections::BTreeSet::new();
        let mut actions = Vec::new();
        for (peer, total) in bids {
            if (peer as usize) < n {
                bidders.insert(peer);
            }
            actions.extend(s.on_bid(id, peer, quote(total), 0.0));
        }
        actions.extend(s.on_tick(timeout));
        let awards: Vec<_> = actions.iter().filter_map(|a| match a { Action::Award { peer, basis, .. } => Some((*peer, *basis)), _ => None }).collect();
        prop_assert_eq!(awards.len(), 1, "exactly one award");
        let (peer, basis) = awards[0];
        // Every other candidate hears that its bid is released, once.
        let released: Vec<PeerId> = actions.iter().filter_map(|a| match a {
            Action::Release { auction, peer: p, winner } if *auction == id && *winner == peer => Some(*p),
            _ => None,
        }).collect();
        let others: Vec<PeerId> = (0..n as u64).filter(|p| *p != peer).collect();
        prop_assert_eq!(released, others);
        if basis == AwardBasis::Gossip {
            prop_assert!(bidders.is_empty());
        } else {
            prop_assert!(bidders.contains(&peer), "awarded {} which did not bid", peer);
        }
    }

    #[test]
    fn a_timed_out_auction_falls_back_to_the_best_gossiped_peer(
        loads in proptest::collection::vec((0.0f64..5.0, 0.5f64..10.0), 2..8),
        work in 0.1f64..5.0,
    ) {
        let mut s = Scheduler::new(SchedConfig::default());
        for (p, (q, speed)) in loads.iter().enumerate() {
            s.on_load_report(p as u64, LoadReport { queue_s: *q, speed: *speed, sent_at: 0.0 }, 0.0);
        }
        let cands: Vec<(PeerId, f64)> = (0..loads.len() as u64).map(|p| (p, 0.0)).collect();
        let (_, _) = s.start(TaskSpec { work }, &cands, 0.0);
        let got = award(&s.on_tick(1.0));
        let est = |p: usize| (loads[p].0 - 1.0).max(0.0) + work / loads[p].1;
        let best = (0..loads.len()).min_by(|&a, &b| est(a).total_cmp(&est(b)).then(a.cmp(&b))).unwrap();
        prop_assert_eq!(got, Some((best as u64, AwardBasis::Gossip)));
    }

    #[test]
    fn the_same_inputs_give_the_same_schedule(seed in any::<u64>()) {
        let run = || {
            let mut s = Scheduler::new(SchedConfig::default());
            let mut x = seed | 1;
            let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
            let mut out = Vec::new();
            for t in 0..50 {
                let now = t as f64 * 0.01;
                let cands: Vec<(PeerId, f64)> = (0..4).map(|_| (next() % 6, 0.0)).collect();
                let (id, _) = s.start(TaskSpec { work: 1.0 }, &cands, now);
                for _ in 0..3 {
                    out.extend(s.on_bid(id, next() % 6, quote((next() % 100) as f64 / 10.0), now));
                }
                out.extend(s.on_tick(now));
                s.on_outcome(next() % 6, 1.0, (next() % 30) as f64 / 10.0);
            }
            out
        };
        prop_assert_eq!(run(), run());
    }

    #[test]
    fn an_underbidders_share_of_awards_falls_over_time(factor in 2.0f64..6.0, honest in 1.0f64..2.0) {
        // Peer 0 is 1.5x slower than peer 1 but promises 1/factor of its true
        // time, so it wins every early auction. Once its record of broken
        // promises catches up, its bids are inflated back to the truth and
        // the honest, faster peer wins.
        let liar_true = 1.5 * honest;
        let mut s = Scheduler::new(SchedConfig::default());
        let (mut wins_early, mut wins_late) = (0, 0);
        for round in 0..200 {
            let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(0, 0.0), (1, 0.0)], round as f64);
            s.on_bid(id, 0, quote(liar_true / factor), round as f64);
            let a = award(&s.on_bid(id, 1, quote(honest), round as f64)).unwrap();
            if a.0 == 0 {
                s.on_outcome(0, liar_true / factor, liar_true);
                if round < 10 {
                    wins_early += 1;
                } else if round >= 100 {
                    wins_late += 1;
                }
            } else {
                s.on_outcome(1, honest, honest);
            }
        }
        prop_assert!(wins_early >= 1, "the underbid never won");
        prop_assert_eq!(wins_late, 0, "the underbidder still wins late auctions");
    }
}

#[test]
fn a_zero_bid_is_floored_at_the_bidders_own_speed_and_its_broken_promises_count() {
    // Peer 0 says (by gossip) it does the work in 1 s, then bids 0; peer 1
    // bids an honest 0.2 s. The zero bid counts as 1 s / speed_slack (0.25 s), never
    // as nothing.
    let cfg = SchedConfig::default();
    let mut s = Scheduler::new(cfg.clone());
    s.on_load_report(0, LoadReport { queue_s: 0.0, speed: 1.0, sent_at: 0.0 }, 0.0);
    let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(0, 0.0), (1, 0.0)], 0.0);
    s.on_bid(id, 0, Quote { queue_s: 0.0, service_s: 0.0, transfer_s: 0.0 }, 0.0);
    let a = s.on_bid(id, 1, quote(0.2), 0.0);
    assert_eq!(award(&a), Some((1, AwardBasis::AllBids)), "a zero bid does not beat an honest 0.2 s");
    // Without gossip the floor is min_bid_s: the zero bid wins, but as a
    // promise of more than nothing, so when it takes 1 s its record grows
    // and its next bids are inflated until it loses.
    let mut s = Scheduler::new(cfg.clone());
    let mut liar_wins = 0;
    for round in 0..60 {
        let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(0, 0.0), (1, 0.0)], f64::from(round));
        s.on_bid(id, 0, Quote { queue_s: 0.0, service_s: 0.0, transfer_s: 0.0 }, f64::from(round));
        let actions = s.on_bid(id, 1, quote(0.01), f64::from(round));
        let promised = actions.iter().find_map(|a| match a {
            Action::Award { peer: 0, promised_s, .. } => Some(*promised_s),
            _ => None,
        });
        if let Some(p) = promised {
            assert!(p >= cfg.min_bid_s, "a zero bid promises at least the floor: {p}");
            liar_wins += 1;
            s.on_outcome(0, p, 1.0);
        } else {
            s.on_outcome(1, 0.01, 0.01);
        }
    }
    assert!(s.record(0) > 5.0, "the broken promises are on record: {}", s.record(0));
    assert!(liar_wins < 30, "the zero bidder keeps winning: {liar_wins} of 60");
}

#[test]
fn malformed_and_unsolicited_bids_are_ignored() {
    let mut s = Scheduler::new(SchedConfig::default());
    let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(1, 0.0), (2, 0.0)], 0.0);
    assert!(s.on_bid(id, 9, quote(0.0), 0.0).is_empty());
    assert!(s.on_bid(id, 1, Quote { queue_s: f64::NAN, service_s: 0.0, transfer_s: 0.0 }, 0.0).is_empty());
    assert!(s.on_bid(id, 1, quote(-1.0), 0.0).is_empty());
    assert!(s.on_bid(id + 7, 1, quote(1.0), 0.0).is_empty());
    assert_eq!(award(&s.on_bid(id, 2, quote(3.0), 0.0)), None);
    assert_eq!(award(&s.on_tick(1.0)), Some((2, AwardBasis::PartialBids)));
}


proptest! {
    #[test]
    fn closing_early_picks_the_same_winner_as_waiting_for_every_bid(
        peers in proptest::collection::vec((0.5f64..20.0, 0.0f64..0.05, 0.0f64..3.0), 2..8),
        order in any::<u64>(),
        work in 0.1f64..4.0,
    ) {
        // Each peer: speed, transfer, queue now. Each gossiped a queue at
        // time 0 that has drained by at most the time since (0.4 s), so the
        // bids are at least the lower bound the scheduler derives from
        // gossip.
        let mut s = Scheduler::new(SchedConfig::default());
        for (p, (speed, _, queue)) in peers.iter().enumerate() {
            let gossiped = queue + 0.4 * ((p * 7 % 5) as f64 / 4.0);
            s.on_load_report(p as u64, LoadReport { queue_s: gossiped, speed: *speed, sent_at: 0.0 }, 0.0);
        }
        let cands: Vec<(PeerId, f64)> = peers.iter().enumerate().map(|(p, (_, t, _))| (p as u64, *t)).collect();
        let (id, _) = s.start(TaskSpec { work }, &cands, 0.0);
        let mut idx: Vec<usize> = (0..peers.len()).collect();
        let mut x = order | 1;
        for i in (1..idx.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            idx.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut got = None;
        for &p in &idx {
            let (speed, transfer, queue) = peers[p];
            let q = Quote { queue_s: queue, service_s: work / speed, transfer_s: transfer };
            if let Some(a) = award(&s.on_bid(id, p as u64, q, 0.4)) {
                got = Some(a.0);
                break;
            }
        }
        let total = |p: usize| peers[p].2 + work / peers[p].0 + peers[p].1;
        let want = (0..peers.len()).min_by(|&a, &b| total(a).total_cmp(&total(b)).then(a.cmp(&b))).unwrap();
        prop_assert_eq!(got, Some(want as u64));
    }
}

proptest! {
    #[test]
    fn a_bid_book_holds_exactly_the_open_unexpired_bids(
        ops in proptest::collection::vec((0u8..3, 0u64..12, 0.0f64..2.0, 0.01f64..1.0), 0..80),
    ) {
        // Against a model: a map of key -> (seconds, until), time moving on.
        let cap = 8;
        let mut book = BidBook::new(cap);
        let mut model: std::collections::BTreeMap<u64, (f64, f64)> = Default::default();
        let mut now = 0.0;
        for (op, key, secs, lease) in ops {
            now += 0.05;
            // Lapsed holds go when the book is next asked for a sum or a
            // hold; a release in between still finds them.
            match op {
                0 => {
                    model.retain(|_, (_, until)| *until > now);
                    if model.len() >= cap && !model.contains_key(&key) {
                        let first = *model.iter().min_by(|a, b| a.1.1.total_cmp(&b.1.1)).unwrap().0;
                        model.remove(&first);
                    }
                    model.insert(key, (secs, now + lease));
                    book.hold(key, secs, now, lease);
                }
                1 => prop_assert_eq!(book.release(&key), model.remove(&key).is_some()),
                _ => {}
            }
            model.retain(|_, (_, until)| *until > now);
            let want: f64 = model.values().map(|(s, _)| s).sum();
            prop_assert!((book.held_s(now) - want).abs() < 1e-9);
            prop_assert!(book.len() <= cap);
        }
    }
}

#[test]
fn a_bid_book_ignores_nonsense_and_forgets_on_clear() {
    let mut book = BidBook::new(4);
    book.hold(1, f64::NAN, 0.0, 1.0);
    book.hold(2, -1.0, 0.0, 1.0);
    book.hold(3, f64::INFINITY, 0.0, 1.0);
    assert!(book.is_empty());
    book.hold(4, 0.5, 0.0, 1.0);
    book.hold(4, 0.25, 0.0, 1.0);
    assert_eq!(book.held_s(0.5), 0.25);
    assert_eq!(book.held_s(1.0), 0.0, "the lease ran out");
    book.hold(5, 0.5, 1.0, 1.0);
    book.clear();
    assert_eq!(book.held_s(1.0), 0.0);
}

#[test]
fn an_auction_waits_only_as_long_as_its_candidates_round_trips() {
    let cfg = SchedConfig::default();
    let mut s = Scheduler::new(cfg);
    s.on_rtt(1, 0.010);
    s.on_rtt(2, 0.020);
    let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(1, 0.0), (2, 0.0)], 1.0);
    let want = 1.0 + 0.020 * cfg.rtt_factor + cfg.rtt_margin_s;
    assert!((s.deadline(id).unwrap() - want).abs() < 1e-12);
    assert_eq!(award(&s.on_tick(want - 1e-6)), None);
    assert_eq!(award(&s.on_tick(want)), Some((1, AwardBasis::Gossip)));
    // A candidate whose round trip is unknown: the full timeout.
    let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(1, 0.0), (3, 0.0)], 2.0);
    assert_eq!(s.deadline(id), Some(2.0 + cfg.auction_timeout_s));
}

#[test]
fn waiting_for_a_far_candidate_counts_against_it() {
    // Peer 2 is faster and idle by gossip, but its bid needs 0.2 s to come
    // back: peer 1's bid of 0.1 s wins at once rather than after the wait.
    let mut s = Scheduler::new(SchedConfig::default());
    s.on_load_report(1, LoadReport { queue_s: 0.0, speed: 10.0, sent_at: 0.0 }, 0.0);
    s.on_load_report(2, LoadReport { queue_s: 0.0, speed: 20.0, sent_at: 0.0 }, 0.0);
    s.on_rtt(1, 0.002);
    s.on_rtt(2, 0.200);
    let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(1, 0.0), (2, 0.0)], 0.0);
    let q = Quote { queue_s: 0.0, service_s: 0.1, transfer_s: 0.0 };
    assert_eq!(award(&s.on_bid(id, 1, q, 0.002)), Some((1, AwardBasis::Decided)));
    // Without the round trip known, its 0.05 s of service could still win.
    let mut s = Scheduler::new(SchedConfig::default());
    s.on_load_report(2, LoadReport { queue_s: 0.0, speed: 20.0, sent_at: 0.0 }, 0.0);
    let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(1, 0.0), (2, 0.0)], 0.0);
    assert_eq!(award(&s.on_bid(id, 1, q, 0.002)), None);
}

#[test]
fn closing_one_auction_leaves_the_others_open() {
    let mut s = Scheduler::new(SchedConfig::default());
    let (a, _) = s.start(TaskSpec { work: 1.0 }, &[(1, 0.0), (2, 0.0)], 0.0);
    let (b, _) = s.start(TaskSpec { work: 1.0 }, &[(1, 0.0), (2, 0.0)], 0.0);
    s.on_bid(a, 2, quote(1.0), 0.01);
    let closed = s.close_now(a, 0.02);
    assert_eq!(award(&closed), Some((2, AwardBasis::PartialBids)));
    assert!(closed.iter().all(|x| matches!(x, Action::Award { auction, .. } | Action::Release { auction, .. } if *auction == a)));
    assert_eq!(s.open_auctions(), 1);
    assert!(s.close_now(a, 0.03).is_empty(), "already closed");
    assert_eq!(award(&s.on_bid(b, 1, quote(1.0), 0.03)), None);
    assert_eq!(award(&s.on_bid(b, 2, quote(2.0), 0.03)), Some((1, AwardBasis::AllBids)));
}

#[test]
fn a_candidate_holding_part_of_the_task_is_floored_and_bounded_by_its_share() {
    // Both peers do the whole task in 1 s by gossip; peer 0 holds 80 % of
    // it already (share 0.2).
    let mut s = Scheduler::new(SchedConfig::default());
    for p in [0, 1] {
        s.on_load_report(p, LoadReport { queue_s: 0.0, speed: 1.0, sent_at: 0.0 }, 0.0);
    }
    let q = |service_s: f64| Quote { queue_s: 0.0, service_s, transfer_s: 0.0 };
    // Peer 1 bids 0.5 s first: the holder could still beat it (its best
    // case is 0.2 s), so the auction waits for it; its 0.06 s quote stands
    // (the floor is 0.2 s / speed_slack, not 1 s / speed_slack) and wins.
    let (id, _) = s.start_shared(TaskSpec { work: 1.0 }, &[(0, 0.0), (1, 0.0)], &[(0, 0.2)], 0.0);
    assert!(s.on_bid(id, 1, q(0.5), 0.0).is_empty(), "the holder is waited for");
    let a = s.on_bid(id, 0, q(0.06), 0.0);
    let expected = a.iter().find_map(|x| match x {
        Action::Award { peer: 0, expected_s, .. } => Some(*expected_s),
        _ => None,
    });
    assert!(expected.is_some_and(|e| (e - 0.06).abs() < 1e-9), "{a:?}");
    // Without the share, peer 1's 0.5 s closes the auction at once (peer 0
    // needs 1 s at best), and a 0.06 s quote would be floored at 0.25 s.
    let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(0, 0.0), (1, 0.0)], 0.0);
    assert_eq!(award(&s.on_bid(id, 1, q(0.5), 0.0)), Some((1, AwardBasis::Decided)));
    // By gossip alone, the holder's estimate counts its share (a tie would
    // go to the lower id).
    let (id, _) = s.start_shared(TaskSpec { work: 1.0 }, &[(0, 0.0), (1, 0.0)], &[(1, 0.2)], 0.0);
    assert_eq!(award(&s.close_now(id, 0.0)), Some((1, AwardBasis::Gossip)));
}

#[test]
fn a_record_learns_the_whole_ratio_of_a_peer_that_keeps_taking_four_times_its_promise() {
    // Peer 0 always bids 0.1 s and takes 0.4 s; peer 1 bids 1 s. Judged by
    // its own promises, peer 0's record nears 4, the whole ratio (judged by
    // the adjusted ones it would stop near 2, the square root), and its
    // adjusted expectation nears the truth: 0.4 s, still the better offer.
    let mut s = Scheduler::new(SchedConfig::default());
    let mut last = 0.0;
    for round in 0..80 {
        let now = f64::from(round);
        let (id, _) = s.start(TaskSpec { work: 1.0 }, &[(0, 0.0), (1, 0.0)], now);
        s.on_bid(id, 0, Quote { queue_s: 0.0, service_s: 0.1, transfer_s: 0.0 }, now);
        let a = s.on_bid(id, 1, quote(1.0), now);
        let (expected, promised) = a
            .iter()
            .find_map(|x| match x {
                Action::Award { peer: 0, expected_s, promised_s, .. } => Some((*expected_s, *promised_s)),
                _ => None,
            })
            .expect("peer 0 stays the better bid");
        assert!((promised - 0.1).abs() < 1e-9, "its own promise: {promised}");
        s.on_outcome(0, promised, 0.4);
        last = expected;
    }
    assert!((s.record(0) - 4.0).abs() < 0.05, "record {}", s.record(0));
    assert!((last - 0.4).abs() < 0.01, "the adjusted expectation nears the truth: {last}");
}
