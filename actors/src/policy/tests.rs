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

proptest! {
    #[test]
    fn evictions_leave_room_drop_every_expired_cache_and_take_the_oldest_first(
        ages in proptest::collection::vec(0u64..1000, 0..40),
        ttl_ms in 1u64..1200,
        max in 0usize..20,
    ) {
        let now = Instant::now() + Duration::from_secs(10);
        let caches: Vec<(u64, Instant)> =
            ages.iter().enumerate().map(|(i, &a)| (i as u64, now - Duration::from_millis(a))).collect();
        let ttl = Duration::from_millis(ttl_ms);
        let out = evictions(&caches, now, ttl, max);
        let kept: Vec<&(u64, Instant)> = caches.iter().filter(|(k, _)| !out.contains(k)).collect();
        // Room for one more, within the bound.
        prop_assert!(kept.len() < max.max(1));
        // Nothing expired is kept; nothing is evicted twice.
        prop_assert!(kept.iter().all(|(_, t)| now.duration_since(*t) <= ttl));
        let mut dedup = out.clone();
        dedup.sort_unstable();
        dedup.dedup();
        prop_assert_eq!(dedup.len(), out.len());
        // No kept cache is older than a live (unexpired) one that was evicted.
        for (k, t) in caches.iter().filter(|(k, t)| out.contains(k) && now.duration_since(*t) <= ttl) {
            prop_assert!(kept.iter().all(|(k2, t2)| (*t2, *k2) > (*t, *k)));
        }
        // Evicting only what is needed: one fewer eviction would not leave room.
        let expired = caches.iter().filter(|(_, t)| now.duration_since(*t) > ttl).count();
        prop_assert!(out.len() == expired || caches.len() - out.len() + 1 == max.max(1));
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
