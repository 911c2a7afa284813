use super::*;
use proptest::prelude::*;

fn view(ids: &[(u8, f32)], model: ModelHash) -> Vec<PeerView> {
    ids.iter()
        .map(|&(i, g)| PeerView { peer: format!("peer{i:03}"), gflops: g, memory_bytes: 1 << 32, models: vec![model], shards: vec![], queued: 0, rtt_ms: None })
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
    v.push(PeerView { peer: "other".into(), gflops: 10.0, memory_bytes: 1 << 30, models: vec![[2u8; 32]], shards: vec![], queued: 0, rtt_ms: None });
    let c = candidates(&v, &model, &[], 1 << 20);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].memory_bytes, 1 << 20);
}

#[test]
fn a_newcomer_takes_room_from_the_biggest_owner_and_an_owner_past_its_share_from_itself() {
    let now = Instant::now();
    let ago = |ms| now - Duration::from_millis(ms);
    let h = |session, owner, bytes, ms| Held { session, owner, bytes, last_used: ago(ms) };
    let bounds = CacheBounds { ttl: Duration::from_secs(60), max_sessions: 64, budget_bytes: 1000, owner_share: 1.0 };
    // "hog" holds 900 of 1000 bytes, "meek" 100: meek's next 200 bytes come
    // out of hog's oldest caches, not meek's own.
    let held = [h(1, "hog", 300, 50), h(2, "hog", 300, 40), h(3, "hog", 300, 30), h(4, "meek", 100, 90)];
    assert_eq!(admit(&held, "meek", 200, now, &bounds), Ok(vec![1]));
    // hog asking for more evicts its own.
    assert_eq!(admit(&held, "hog", 200, now, &bounds), Ok(vec![1]));
    // With a share of half the budget, an owner competes with itself first.
    let half = CacheBounds { owner_share: 0.5, ..bounds };
    let held = [h(1, "a", 200, 50), h(2, "a", 200, 40), h(3, "b", 100, 90)];
    assert_eq!(admit(&held, "a", 200, now, &half), Ok(vec![1]));
    assert!(admit(&held, "a", 600, now, &half).unwrap_err().contains("exceeds what one owner may hold"));
}

proptest! {
    #[test]
    fn admission_leaves_room_drops_expired_caches_and_takes_from_the_biggest_owner(
        caches in proptest::collection::vec((0u64..1000, 0usize..4, 0usize..400), 0..40),
        ttl_ms in 1u64..1200,
        max in 0usize..20,
        budget in 1usize..4000,
        share in 0.1f64..1.0,
        newcomer in 0usize..4,
        bytes in 0usize..600,
    ) {
        const OWNERS: [&str; 4] = ["a", "b", "c", "d"];
        let now = Instant::now() + Duration::from_secs(10);
        let held: Vec<Held<'_>> = caches
            .iter()
            .enumerate()
            .map(|(i, &(age, o, b))| Held { session: i as u64, owner: OWNERS[o], bytes: b, last_used: now - Duration::from_millis(age) })
            .collect();
        let bounds = CacheBounds { ttl: Duration::from_millis(ttl_ms), max_sessions: max, budget_bytes: budget, owner_share: share };
        let me = OWNERS[newcomer];
        let Ok(out) = admit(&held, me, bytes, now, &bounds) else {
            prop_assert!(bytes > bounds.owner_bytes(), "refused only past one owner's share");
            return Ok(());
        };
        let kept: Vec<&Held<'_>> = held.iter().filter(|h| !out.contains(&h.session)).collect();
        // Room for one more: the count, the budget and the owner's share.
        prop_assert!(kept.len() < max.max(1));
        prop_assert!(kept.iter().map(|h| h.bytes).sum::<usize>() + bytes <= budget);
        prop_assert!(kept.iter().filter(|h| h.owner == me).map(|h| h.bytes).sum::<usize>() + bytes <= bounds.owner_bytes());
        // Nothing expired is kept; nothing is evicted twice.
        prop_assert!(kept.iter().all(|h| now.duration_since(h.last_used) <= bounds.ttl));
        let mut dedup = out.clone();
        dedup.sort_unstable();
        dedup.dedup();
        prop_assert_eq!(dedup.len(), out.len());
        // Within an owner, no kept live cache is older than an evicted live one.
        for e in held.iter().filter(|h| out.contains(&h.session) && now.duration_since(h.last_used) <= bounds.ttl) {
            prop_assert!(kept.iter().filter(|k| k.owner == e.owner).all(|k| (k.last_used, k.session) > (e.last_used, e.session)));
        }
        // No owner holding less than the newcomer (with its request) loses
        // a live cache to it.
        let mine = kept.iter().filter(|h| h.owner == me).map(|h| h.bytes).sum::<usize>() + bytes;
        for o in OWNERS.iter().filter(|o| **o != me) {
            let live = |h: &Held<'_>| h.owner == *o && now.duration_since(h.last_used) <= bounds.ttl;
            let before: usize = held.iter().filter(|h| live(h)).map(|h| h.bytes).sum();
            let after: usize = kept.iter().filter(|h| live(h)).map(|h| h.bytes).sum();
            // It lost a live cache only while holding at least what the
            // newcomer held with its request (which only falls meanwhile),
            // or once the newcomer had no cache left to give up.
            let newcomer_emptied = !kept.iter().any(|h| h.owner == me);
            prop_assert!(after == before || before >= mine || newcomer_emptied, "owner {} lost caches while holding {} against the newcomer's {}", o, before, mine);
        }
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
        let v = view(&ids, model);
        let me = v[me % v.len()].peer.clone();
        let c = costs(layers);
        let cands = candidates(&v, &model, &[], 0);
        let plan = route(&c, &cands).unwrap();
        let standby = standby_ranges(&c, &cands, &plan, &me);
        let mine: Vec<Range<usize>> = plan.iter().filter(|h| h.peer == me).map(|h| h.start..h.end).collect();
        for (i, r) in standby.iter().enumerate() {
            prop_assert!(!mine.contains(r));
            prop_assert!(!standby[..i].contains(r));
            // Each comes from the plan without one other peer of the plan.
            let found = plan.iter().filter(|h| h.peer != me).any(|lost| {
                let rest = candidates(&v, &model, std::slice::from_ref(&lost.peer), 0);
                route(&c, &rest).is_ok_and(|alt| alt.iter().any(|h| h.peer == me && (h.start..h.end) == *r))
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
