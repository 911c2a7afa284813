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
