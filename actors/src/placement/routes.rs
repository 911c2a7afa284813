//! Routes: every way the mesh serves a model at once. A peer that can hold
//! the whole model serves it alone (one hop, no activations on the wire)
//! unless a pipeline over peers is faster per token; peers too small to
//! hold it form pipelines among themselves; peers left over keep extra
//! copies of the busiest stages of those pipelines. Deterministic like
//! [`plan`]: the same candidates in any order give the same routes.

use super::{FETCH_AMORTIZE_TOKENS, FETCH_BYTES_PER_S, ModelCosts, PlacementError, PlacementPeer, Plan, Stage, plan, rank};

/// What one hop between stages costs per token (the activation's trip on a
/// local link, encoding included), in seconds: a pipeline must beat a
/// whole replica by this much per hop to be chosen over it.
pub const HOP_COST_S: f64 = 1e-3;

/// Most routes a layout holds; peers past them keep stage copies.
pub const MAX_ROUTES: usize = 16;

/// The routes serving a model, the preferred one first.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Each covers `0..L` with distinct peers; no peer is in two routes.
    pub routes: Vec<Plan>,
}

impl Layout {
    /// Seconds per token of one stream on route `i` (its stages in turn,
    /// plus the hops between them).
    pub fn latency(&self, i: usize) -> f64 {
        self.routes.get(i).map_or(f64::INFINITY, route_latency)
    }
}

fn route_latency(p: &Plan) -> f64 {
    p.stages.iter().map(|s| s.time).sum::<f64>() + HOP_COST_S * p.stages.len().saturating_sub(1) as f64
}

/// Seconds per token of `peer` serving the whole model (with the fetch of
/// what it lacks spread like [`plan`] does).
fn whole_time(m: &ModelCosts, peer: &PlacementPeer, l: usize) -> f64 {
    let fetch = peer.missing.as_ref().filter(|x| x.layer.len() == l).map_or(0, |x| {
        x.layer.iter().fold(x.first.saturating_add(x.last), |a, &b| a.saturating_add(b))
    });
    m.stage_work(0..l) / peer.speed + fetch as f64 / FETCH_BYTES_PER_S / FETCH_AMORTIZE_TOKENS
}

/// Computes the routes over `peers`. Each round takes, among the peers not
/// yet used, the whole replica with the lowest time per token, unless the
/// best pipeline over them is faster per token (stage times summed, hops
/// counted at [`HOP_COST_S`]); rounds go on while the peers left can carry
/// another route (at most [`MAX_ROUTES`]). Then the peers left over hold
/// copies of the pipelines' stages, slowest stages first. Fails only when no
/// route at all can be made.
pub fn layout(model: &ModelCosts, peers: &[PlacementPeer]) -> Result<Layout, PlacementError> {
    let l = model.layers();
    let mut left: Vec<&PlacementPeer> = peers.iter().filter(|p| p.speed.is_finite() && p.speed > 0.0).collect();
    left.sort_by(|a, b| rank(a, b));
    left.dedup_by(|a, b| a.id == b.id);
    let whole_bytes = model.stage_bytes(0..l);
    let work = model.stage_work(0..l);
    let mut routes: Vec<Plan> = Vec::new();
    while !left.is_empty() && routes.len() < MAX_ROUTES {
        // Ties go to the better-ranked peer (the earlier one).
        let replica = left
            .iter()
            .enumerate()
            .filter(|(_, p)| p.memory_bytes >= whole_bytes)
            .map(|(k, p)| (k, whole_time(model, p, l)))
            .fold(None, |best: Option<(usize, f64)>, (k, t)| match best {
                Some((_, bt)) if bt <= t => best,
                _ => Some((k, t)),
            });
        // No pipeline of two or more stages beats the fastest peer doing all
        // the work alone plus one hop: skip the search when a replica does.
        let fastest = left.iter().map(|p| p.speed).fold(0.0, f64::max);
        let floor = work / fastest + HOP_COST_S;
        let pick = match replica {
            Some((k, t)) if t <= floor => Err(k),
            _ => {
                let owned: Vec<PlacementPeer> = left.iter().map(|p| (*p).clone()).collect();
                match (plan(model, &owned, 0), replica) {
                    (Ok(p), Some((k, t))) if t <= route_latency(&p) => Err(k),
                    (Ok(p), _) => Ok(p),
                    (Err(_), Some((k, _))) => Err(k),
                    (Err(e), None) if routes.is_empty() => return Err(e),
                    (Err(_), None) => break,
                }
            }
        };
        let route = match pick {
            Ok(p) => p,
            Err(k) => {
                let p = left[k];
                let time = whole_time(model, p, l);
                Plan {
                    stages: vec![Stage { peer: p.id.clone(), start: 0, end: l, time, bytes: whole_bytes, replicas: Vec::new() }],
                    bottleneck: time,
                }
            }
        };
        left.retain(|p| !route.stages.iter().any(|s| s.peer == p.id));
        routes.push(route);
    }
    if routes.is_empty() {
        // Only reachable with no usable peer, or a model `plan` rejects.
        let owned: Vec<PlacementPeer> = left.iter().map(|p| (*p).clone()).collect();
        return plan(model, &owned, 0).map(|p| Layout { routes: vec![p] });
    }
    // Peers left over copy the pipelines' stages: the slowest first, each
    // stage one more copy per round.
    let mut stages: Vec<(usize, usize)> = routes
        .iter()
        .enumerate()
        .filter(|(_, r)| r.stages.len() > 1)
        .flat_map(|(i, r)| (0..r.stages.len()).map(move |k| (i, k)))
        .collect();
    stages.sort_by(|&(a, i), &(b, j)| routes[b].stages[j].time.total_cmp(&routes[a].stages[i].time).then((a, i).cmp(&(b, j))));
    let mut round = 0;
    while !left.is_empty() && !stages.is_empty() {
        let mut placed = false;
        for &(r, k) in &stages {
            let s = &mut routes[r].stages[k];
            if s.replicas.len() != round {
                continue;
            }
            if let Some(at) = left.iter().position(|p| p.memory_bytes >= s.bytes) {
                s.replicas.push(left.remove(at).id.clone());
                placed = true;
            }
        }
        if !placed {
            break;
        }
        round += 1;
    }
    Ok(Layout { routes })
}

#[cfg(test)]
mod tests {
    use super::super::Missing;
    use super::*;
    use proptest::prelude::*;

    fn m(layers: usize) -> ModelCosts {
        ModelCosts {
            layer_cost: vec![1.0; layers],
            layer_bytes: vec![10; layers],
            first_cost: 0.0,
            first_bytes: 20,
            last_cost: 2.0,
            last_bytes: 20,
            shared_bytes: 0,
        }
    }

    fn peer(id: &str, speed: f64, memory_bytes: u64) -> PlacementPeer {
        PlacementPeer { id: id.into(), speed, memory_bytes, missing: None }
    }

    fn shape(l: &Layout) -> Vec<Vec<(&str, usize, usize)>> {
        l.routes.iter().map(|r| r.stages.iter().map(|s| (s.peer.as_str(), s.start, s.end)).collect()).collect()
    }

    #[test]
    fn peers_that_hold_the_model_serve_whole_replicas() {
        let model = m(10); // 140 bytes, 12 units of work
        let peers = [peer("a", 1.0, 1000), peer("b", 1.0, 1000), peer("c", 1.0, 1000)];
        let l = layout(&model, &peers).unwrap();
        assert_eq!(shape(&l), vec![vec![("a", 0, 10)], vec![("b", 0, 10)], vec![("c", 0, 10)]]);
        assert_eq!(l.latency(0), 12.0);
    }

    #[test]
    fn small_peers_form_a_pipeline_beside_a_replica() {
        let model = m(10);
        let peers = [peer("big", 1.0, 1000), peer("s1", 1.0, 90), peer("s2", 1.0, 90), peer("tiny", 1.0, 45)];
        let l = layout(&model, &peers).unwrap();
        let s = shape(&l);
        assert_eq!(s[0], vec![("big", 0, 10)]);
        assert_eq!(s.len(), 2, "{s:?}");
        // s1, s2 and tiny can carry 225 bytes: a pipeline over them.
        let second: Vec<&str> = s[1].iter().map(|h| h.0).collect();
        assert!(second.contains(&"s1") && second.contains(&"s2"), "{s:?}");
    }

    #[test]
    fn a_pipeline_of_fast_small_peers_beats_a_slow_replica() {
        let model = m(10);
        // The slow peer takes 12 s per token alone; the two fast ones 2 s each way.
        let peers = [peer("slow", 1.0, 1000), peer("f1", 10.0, 90), peer("f2", 10.0, 90)];
        let l = layout(&model, &peers).unwrap();
        let s = shape(&l);
        assert_eq!(s[0].len(), 2, "{s:?}");
        assert!(s[0].iter().all(|h| h.0 != "slow"), "{s:?}");
        assert_eq!(s[1], vec![("slow", 0, 10)]);
        assert!(l.latency(0) < l.latency(1));
    }

    #[test]
    fn a_replica_that_would_fetch_everything_loses_to_one_that_holds_it() {
        let model = m(4);
        let lacking = Missing { layer: vec![1 << 40; 4], first: 0, last: 0 };
        let mut a = peer("a", 1.0, 1000);
        a.missing = Some(std::sync::Arc::new(lacking));
        let l = layout(&model, &[a, peer("b", 1.0, 1000)]).unwrap();
        assert_eq!(shape(&l)[0], vec![("b", 0, 4)]);
    }

    #[test]
    fn leftover_peers_copy_the_slowest_stages() {
        let model = m(10);
        // a and b split the model; c is too slow to help them and too small
        // to serve alone: it copies the slower stage.
        let peers = [peer("a", 10.0, 90), peer("b", 10.0, 90), peer("c", 0.1, 90)];
        let l = layout(&model, &peers).unwrap();
        assert_eq!(l.routes.len(), 1, "{l:?}");
        let r = &l.routes[0];
        let slowest = r.stages.iter().map(|s| s.time).fold(0.0, f64::max);
        let copied: Vec<&Stage> = r.stages.iter().filter(|s| !s.replicas.is_empty()).collect();
        assert_eq!(copied.len(), 1, "{l:?}");
        assert_eq!(copied[0].replicas, vec!["c".to_string()]);
        assert_eq!(copied[0].time, slowest);
    }

    #[test]
    fn a_tied_embedding_counts_once_in_a_whole_replica() {
        let mut model = m(10); // 100 bytes of layers, 20 + 20 of extras
        model.shared_bytes = 20;
        assert_eq!(model.stage_bytes(0..10), 120);
        assert_eq!(model.stage_bytes(0..5), 70);
        assert_eq!(model.stage_bytes(5..10), 70);
        let l = layout(&model, &[peer("a", 1.0, 120), peer("b", 1.0, 119)]).unwrap();
        assert_eq!(shape(&l)[0], vec![("a", 0, 10)]);
    }

    #[test]
    fn no_route_is_an_error() {
        assert_eq!(layout(&m(4), &[]), Err(PlacementError::NoPeers));
        assert!(matches!(layout(&m(4), &[peer("a", 1.0, 10)]), Err(PlacementError::DoesNotFit { .. })));
    }

    fn arb() -> impl Strategy<Value = (ModelCosts, Vec<PlacementPeer>)> {
        (2usize..12, proptest::collection::vec((1u32..6, 20u64..200), 1..9)).prop_map(|(layers, ps)| {
            let peers = ps.iter().enumerate().map(|(i, &(s, mem))| peer(&format!("p{i}"), f64::from(s), mem)).collect();
            (m(layers), peers)
        })
    }

    proptest! {
        #[test]
        fn routes_are_disjoint_cover_the_model_and_fit(((model, peers), seed) in (arb(), any::<u64>())) {
            let Ok(l) = layout(&model, &peers) else {
                // Only when not even one pipeline over everyone fits.
                prop_assert!(plan(&model, &peers, 0).is_err());
                return Ok(());
            };
            let mut seen: Vec<&str> = Vec::new();
            for r in &l.routes {
                prop_assert_eq!(r.stages.first().unwrap().start, 0);
                prop_assert_eq!(r.stages.last().unwrap().end, model.layer_cost.len());
                for w in r.stages.windows(2) {
                    prop_assert_eq!(w[0].end, w[1].start);
                }
                for s in &r.stages {
                    for id in std::iter::once(&s.peer).chain(&s.replicas) {
                        let p = peers.iter().find(|p| &p.id == id).unwrap();
                        prop_assert!(p.memory_bytes >= s.bytes);
                        prop_assert!(!seen.contains(&id.as_str()), "{} used twice", id);
                        seen.push(id);
                    }
                }
            }
            // The first route is no slower for one stream than any replica.
            let whole = model.stage_bytes(0..model.layer_cost.len());
            for p in peers.iter().filter(|p| p.memory_bytes >= whole) {
                prop_assert!(l.latency(0) <= model.stage_work(0..model.layer_cost.len()) / p.speed + 1e-9);
            }
            // Same candidates in another order: the same layout.
            let mut shuffled = peers.clone();
            let n = shuffled.len();
            for i in 0..n {
                shuffled.swap(i, (seed as usize).wrapping_mul(i + 7) % n);
            }
            prop_assert_eq!(layout(&model, &shuffled).unwrap(), l);
        }
    }
}
