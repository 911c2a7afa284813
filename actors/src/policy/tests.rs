use super::*;
use proptest::prelude::*;

fn view(ids: &[(u8, f32)], model: ModelHash) -> Vec<PeerView> {
    ids.iter()
        .map(|&(i, g)| PeerView { peer: format!("peer{i:03}"), gflops: g, memory_bytes: 1 << 32, models: vec![model], shards: vec![], queued: 0, rtt_ms: None, partial: vec![] })
        .collect()
}

fn costs(layers: usize) -> ModelCosts {
    ModelCosts {
        layer_cost: vec![1e7; layers],
        layer_bytes: vec![1 << 20; layers],
        first_cost: 0.0,
        first_bytes: 1 << 20,
        last_cost: 3e7,
        last_bytes: 1 << 20,
        shared_bytes: 0,
    }
}

#[test]
fn bans_double_and_expire() {
    let t0 = Instant::now();
    let mut b = BanList::new(Duration::from_millis(100), Duration::from_secs(1));
    assert_eq!(b.ban("a", t0), Duration::from_millis(100));
    assert!(b.is_banned("a", t0 + Duration::from_millis(50)));
    assert!(!b.is_banned("a", t0 + Duration::from_millis(150)));
    assert_eq!(b.ban("a", t0 + Duration::from_millis(150)), Duration::from_millis(200));
    for _ in 0..10 {
        b.ban("a", t0 + Duration::from_millis(200));
    }
    assert_eq!(b.ban("a", t0 + Duration::from_millis(200)), Duration::from_secs(1));
    // Forgiven after a quiet spell as long as the longest ban.
    assert_eq!(b.ban("a", t0 + Duration::from_secs(5)), Duration::from_millis(100));
    assert_eq!(b.banned(t0 + Duration::from_secs(5)), vec!["a".to_string()]);
}

#[test]
fn a_full_route_is_asked_again_with_growing_pauses_until_the_bound() {
    let s = Duration::from_secs(1);
    assert_eq!(full_pause(Duration::ZERO, s, 0), Some(Duration::from_millis(20)));
    assert_eq!(full_pause(Duration::ZERO, s, 3), Some(Duration::from_millis(160)));
    assert_eq!(full_pause(Duration::ZERO, s, 40), Some(Duration::from_millis(640)));
    assert_eq!(full_pause(Duration::from_millis(900), s, 40), Some(Duration::from_millis(100)));
    assert_eq!(full_pause(s, s, 0), None);
    assert_eq!(full_pause(Duration::ZERO, Duration::ZERO, 0), None);
}

proptest! {
    #[test]
    fn ban_lengths_stay_within_bounds(times in proptest::collection::vec(0u64..5000, 1..30)) {
        let t0 = Instant::now();
        let mut b = BanList::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut times = times;
        times.sort();
        for t in times {
            let now = t0 + Duration::from_millis(t);
            let d = b.ban("p", now);
            prop_assert!(d >= Duration::from_millis(50) && d <= Duration::from_secs(2));
            prop_assert!(b.is_banned("p", now));
        }
    }

    #[test]
    fn routes_cover_every_layer_avoid_excluded_and_ignore_view_order(
        speeds in proptest::collection::vec(1f32..50.0, 1..7),
        layers in 1usize..40,
        exclude in proptest::collection::vec(any::<bool>(), 7),
        rot in 0usize..7,
    ) {
        let model = [3u8; 32];
        let ids: Vec<(u8, f32)> = speeds.iter().enumerate().map(|(i, &g)| (i as u8, g)).collect();
        let v = view(&ids, model);
        let excluded: Vec<PeerKey> = v.iter().zip(&exclude).filter(|(_, e)| **e).map(|(p, _)| p.peer.clone()).collect();
        let c = costs(layers);
        let cands = candidates(&v, &model, &excluded, 0);
        let r = route(&c, &cands);
        if cands.is_empty() {
            prop_assert!(r.is_err());
            return Ok(());
        }
        let r = r.unwrap();
        prop_assert_eq!(r[0].start, 0);
        prop_assert_eq!(r.last().unwrap().end, layers);
        for w in r.windows(2) {
            prop_assert_eq!(w[0].end, w[1].start);
        }
        for h in &r {
            prop_assert!(!excluded.contains(&h.peer));
            prop_assert!(h.start < h.end);
        }
        let mut rotated = v.clone();
        rotated.rotate_left(rot % v.len());
        let r2 = route(&c, &candidates(&rotated, &model, &excluded, 0)).unwrap();
        prop_assert_eq!(r, r2);
    }
}

#[test]
fn peers_without_the_model_or_speed_are_not_candidates() {
    let model = [1u8; 32];
    let mut v = view(&[(1, 10.0), (2, 0.0)], model);
    v.push(PeerView { peer: "other".into(), gflops: 10.0, memory_bytes: 1 << 30, models: vec![[2u8; 32]], shards: vec![], queued: 0, rtt_ms: None, partial: vec![] });
    let c = candidates(&v, &model, &[], 1 << 20);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].memory_bytes, 1 << 20);
}

#[test]
fn a_newcomer_takes_only_idle_room_and_never_a_running_sessions() {
    let now = Instant::now() + Duration::from_secs(100);
    let ago = |ms| now - Duration::from_millis(ms);
    let h = |session, owner, bytes, ms| Held { session, owner, bytes, last_used: ago(ms) };
    let bounds = CacheBounds { ttl: Duration::from_secs(60), max_sessions: 64, budget_bytes: 1000, owner_share: 1.0 };
    // Running sessions (used within the last second) hold 900 of 1000 bytes:
    // a newcomer needing 200 waits, whoever owns what.
    let held = [h(1, "hog", 300, 50), h(2, "hog", 300, 40), h(3, "hog", 300, 30), h(4, "meek", 100, 90)];
    assert!(matches!(reserve(&held, "meek", 200, now, &bounds), Err(NoRoom::Now(m)) if m.contains("running sessions hold 1000")));
    assert_eq!(reserve(&held, "meek", 0, now, &bounds), Ok(vec![]));
    // An idle one (past IDLE_EVICT) gives its room, the oldest first; one
    // past the TTL always goes.
    let idle = IDLE_EVICT.as_millis() as u64 + 1000;
    let held = [h(1, "hog", 300, idle + 5), h(2, "hog", 300, idle), h(3, "hog", 300, 30), h(5, "x", 10, 61_000)];
    assert_eq!(reserve(&held, "meek", 200, now, &bounds), Ok(vec![5, 1]));
    // With a share of half the budget, an owner's own idle caches go first;
    // its running ones never do.
    let half = CacheBounds { owner_share: 0.5, ..bounds };
    let held = [h(1, "a", 200, idle), h(2, "a", 200, 40), h(3, "b", 100, 90)];
    assert_eq!(reserve(&held, "a", 200, now, &half), Ok(vec![1]));
    let held = [h(1, "a", 200, 50), h(2, "a", 200, 40), h(3, "b", 100, 90)];
    assert!(matches!(reserve(&held, "a", 200, now, &half), Err(NoRoom::Now(m)) if m.contains("this owner's running sessions")));
    assert!(matches!(reserve(&held, "a", 600, now, &half), Err(NoRoom::Never(m)) if m.contains("exceeds what one owner may hold")));
}

proptest! {
    #[test]
    fn reservations_leave_room_drop_expired_caches_and_never_take_a_running_one(
        caches in proptest::collection::vec((0u64..60_000, 0usize..4, 0usize..400), 0..40),
        ttl_ms in 1u64..120_000,
        max in 0usize..20,
        budget in 1usize..4000,
        share in 0.1f64..1.0,
        newcomer in 0usize..4,
        bytes in 0usize..600,
    ) {
        const OWNERS: [&str; 4] = ["a", "b", "c", "d"];
        let now = Instant::now() + Duration::from_secs(200);
        let held: Vec<Held<'_>> = caches
            .iter()
            .enumerate()
            .map(|(i, &(age, o, b))| Held { session: i as u64, owner: OWNERS[o], bytes: b, last_used: now - Duration::from_millis(age) })
            .collect();
        let bounds = CacheBounds { ttl: Duration::from_millis(ttl_ms), max_sessions: max, budget_bytes: budget, owner_share: share };
        let me = OWNERS[newcomer];
        let idle = |h: &Held<'_>, d: Duration| now.duration_since(h.last_used) > d;
        let out = match reserve(&held, me, bytes, now, &bounds) {
            Ok(out) => out,
            Err(NoRoom::Never(_)) => {
                prop_assert!(bytes > bounds.owner_bytes(), "never only past one owner's share");
                return Ok(());
            }
            Err(NoRoom::Now(_)) => {
                // Refused only when even dropping every idle cache would not do.
                let running: Vec<&Held<'_>> = held.iter().filter(|h| !idle(h, bounds.ttl.min(IDLE_EVICT))).collect();
                let total: usize = running.iter().map(|h| h.bytes).sum();
                let mine: usize = running.iter().filter(|h| h.owner == me).map(|h| h.bytes).sum();
                prop_assert!(running.len() >= max.max(1) || total + bytes > budget || mine + bytes > bounds.owner_bytes());
                return Ok(());
            }
        };
        let kept: Vec<&Held<'_>> = held.iter().filter(|h| !out.contains(&h.session)).collect();
        // Room for one more: the count, the budget and the owner's share.
        prop_assert!(kept.len() < max.max(1));
        prop_assert!(kept.iter().map(|h| h.bytes).sum::<usize>() + bytes <= budget);
        prop_assert!(kept.iter().filter(|h| h.owner == me).map(|h| h.bytes).sum::<usize>() + bytes <= bounds.owner_bytes());
        // Nothing expired is kept; nothing running is dropped; nothing twice.
        prop_assert!(kept.iter().all(|h| !idle(h, bounds.ttl)));
        prop_assert!(held.iter().filter(|h| out.contains(&h.session)).all(|h| idle(h, bounds.ttl) || idle(h, IDLE_EVICT)));
        let mut dedup = out.clone();
        dedup.sort_unstable();
        dedup.dedup();
        prop_assert_eq!(dedup.len(), out.len());
    }

    #[test]
    fn late_steps_wait_a_bounded_number_of_times_and_never_blame_this_peer(
        n_hops in 1usize..6,
        dead_mask in proptest::collection::vec(any::<bool>(), 6),
        busy in any::<bool>(),
        busy_waits in 0u32..40,
        stalls in 0u32..4,
    ) {
        let route: Vec<Hop> = (0..n_hops).map(|i| Hop { peer: format!("p{i}"), start: i, end: i + 1 }).collect();
        let local = "p0";
        let dead: Vec<PeerKey> =
            route.iter().zip(&dead_mask).filter(|(_, d)| **d).map(|(h, _)| h.peer.clone()).collect();
        match late_step("late", dead.clone(), busy, busy_waits, stalls, &route, local) {
            LateStep::WaitBusy => prop_assert!(dead.is_empty() && busy && busy_waits < MAX_BUSY_WAITS),
            LateStep::WaitSlow => prop_assert!(dead.is_empty() && stalls < MAX_STALLS),
            LateStep::FailOver(culprits, _) => {
                prop_assert!(!culprits.iter().any(|c| c == local));
                if dead.is_empty() {
                    prop_assert!(busy_waits >= MAX_BUSY_WAITS || !busy);
                    prop_assert!(stalls >= MAX_STALLS);
                    prop_assert_eq!(culprits.len(), n_hops - 1);
                } else {
                    prop_assert!(culprits.iter().all(|c| dead.contains(c)));
                }
            }
        }
    }

    #[test]
    fn standby_ranges_are_what_a_lost_peer_would_give_this_one(
        speeds in proptest::collection::vec(1f32..50.0, 2..6),
        layers in 2usize..30,
        me in 0usize..6,
    ) {
        let model = [4u8; 32];
        let ids: Vec<(u8, f32)> = speeds.iter().enumerate().map(|(i, &g)| (i as u8, g)).collect();
        let mut v = view(&ids, model);
        // Room for about half the model each: pipelines, not replicas.
        for p in &mut v {
            p.memory_bytes = ((layers as u64 / 2 + 2) << 20).max(3 << 20);
        }
        let me = v[me % v.len()].peer.clone();
        let c = costs(layers);
        let cands = candidates(&v, &model, &[], 0);
        let plan = assignment(&c, &cands, &me).unwrap();
        let standby = standby_ranges(&c, &cands, &plan, &me);
        for (i, r) in standby.iter().enumerate() {
            prop_assert!(!plan.mine.contains(r));
            prop_assert!(!standby[..i].contains(r));
            // Each comes from the layout without one other peer of a route.
            let found = plan.routes.iter().flatten().filter(|h| h.peer != me).any(|lost| {
                let rest = candidates(&v, &model, std::slice::from_ref(&lost.peer), 0);
                assignment(&c, &rest, &me).is_ok_and(|alt| alt.mine.contains(r))
            });
            prop_assert!(found);
        }
    }
}

#[test]
fn stage_errors_end_the_generation_only_when_the_model_or_this_peer_failed() {
    let me = "me";
    assert_eq!(
        stage_trouble(ErrorCode::Model, "p1", "nan".into(), me),
        Err(SessionError::Stage { peer: "p1".into(), reason: "nan".into() })
    );
    assert_eq!(stage_trouble(ErrorCode::Malformed, me, "bad".into(), me), Err(SessionError::LocalStage("bad".into())));
    assert_eq!(stage_trouble(ErrorCode::Malformed, "p1", "bad".into(), me), Ok(Trouble::Culprits(vec!["p1".into()], "bad".into())));
    assert_eq!(stage_trouble(ErrorCode::UnknownSession, "p1", "gone".into(), me), Ok(Trouble::Rebuild("gone".into())));
    assert_eq!(stage_trouble(ErrorCode::Busy, "", "late".into(), me), Ok(Trouble::Unknown("late".into())));
}

/// A step's deadline grows with the round trips of its route's hops.
#[test]
fn deadlines_follow_the_routes_round_trips() {
    let d = Deadlines::default();
    let ms = |x: u64| Some(Duration::from_millis(x));
    assert_eq!(d.step_over(1, &[]), d.step(1));
    assert_eq!(d.step_over(1, &[None, None]), d.step(1));
    assert_eq!(d.step_over(1, &[ms(100), None, ms(300)]), d.step(1) + Duration::from_millis(800));
    // A wild figure is bounded.
    assert_eq!(d.step_over(1, &[Some(Duration::from_secs(1000))]), d.step(1) + Duration::from_secs(120));
}

#[test]
fn a_session_takes_the_route_gossip_expects_done_soonest() {
    let model = [5u8; 32];
    let mut v = view(&[(1, 10.0), (2, 10.0), (3, 30.0)], model);
    let c = costs(4);
    let whole = |p: &str| vec![Hop { peer: p.into(), start: 0, end: 4 }];
    let routes = vec![whole("peer001"), whole("peer002"), whole("peer003")];
    // The fastest peer wins while nobody is queued.
    assert_eq!(choose_route(&routes, &v, &c), 2);
    // Four steps waiting there (5x its time) lose to an idle peer a third as fast.
    v[2].queued = 4;
    assert_eq!(choose_route(&routes, &v, &c), 0);
    // Ties go to the earlier route; a peer gossip does not know never wins.
    v[2].queued = 0;
    v[2].gflops = 10.0;
    assert_eq!(choose_route(&routes, &v, &c), 0);
    let unknown = vec![whole("stranger"), whole("peer002")];
    assert_eq!(choose_route(&unknown, &v, &c), 1);
    // A two-hop pipeline pays its hop.
    let split = vec![Hop { peer: "peer001".into(), start: 0, end: 2 }, Hop { peer: "peer003".into(), start: 2, end: 4 }];
    assert_eq!(choose_route(&[split, whole("peer002")], &v, &c), 1);
}

#[test]
fn baselines_take_holders_in_turn_or_by_fewest_queued() {
    let model = [6u8; 32];
    let mut v = view(&[(1, 10.0), (2, 10.0), (3, 10.0)], model);
    let c: Vec<PeerKey> = vec!["peer003".into(), "peer001".into(), "peer002".into()];
    let picks: Vec<&str> = (0..4).map(|t| c[baseline_choice(HopChoice::RoundRobin, &c, &v, t).unwrap()].as_str()).collect();
    assert_eq!(picks, ["peer001", "peer002", "peer003", "peer001"]);
    v[0].queued = 3;
    v[2].queued = 1;
    assert_eq!(baseline_choice(HopChoice::LeastQueued, &c, &v, 0), Some(2), "peer002 has nothing queued");
    assert_eq!(baseline_choice(HopChoice::Bids, &c, &v, 0), None);
    assert_eq!(baseline_choice(HopChoice::RoundRobin, &[], &v, 0), None);
    assert_eq!("least-queued".parse::<HopChoice>(), Ok(HopChoice::LeastQueued));
    assert!("fastest".parse::<HopChoice>().is_err());
}
