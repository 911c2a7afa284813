//! Many members in one process, over loopback TCP (mDNS off), joined
//! through two bootstrap peers: every member's view holds every other
//! (connected or not), every member but the bootstrap peers settles within
//! the maximum of connected peers, every member computes the same plan from its view, and a member
//! killed without a word leaves every view within the departure bound.
//!
//! `FOGMESH_SCALE_PEERS` sets the size (default 40, a few seconds of
//! setup); the 200-member run is `cargo test --release --test mesh_scale --
//! --ignored --nocapture`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

mod common;

use fogmesh::actors::placement::{ModelCosts, PlacementPeer};
use fogmesh::actors::policy;
use fogmesh::node::measure::SelfMeasurement;
use fogmesh::node::net::connections::{DEFAULT_MAX_PEERS, GRACE, PROBE_TIMEOUT};
use fogmesh::node::net::{self, Net, NetConfig, PeerInfo};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};

/// Memory and speed of member `i` (varied, so that the plan is a real
/// choice: pipelines of several members, replicas where one fits).
fn measurement(i: usize) -> SelfMeasurement {
    SelfMeasurement { cores: 2, memory_bytes: ((40 + (i * 37) % 200) as u64) << 20, gflops: 5.0 + (i * 13 % 17) as f32, version: "test".into() }
}

fn config(i: usize, bootstrap: Vec<Multiaddr>) -> NetConfig {
    let mut c = NetConfig::new(Keypair::generate_ed25519(), measurement(i));
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    c.bootstrap = bootstrap;
    c.mdns = false;
    c.models = vec![[7; 32]];
    c
}

/// Starts `n` members, the first two the bootstrap peers of the rest.
async fn start(n: usize) -> Vec<Net> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let boot: Vec<Multiaddr> = nodes.iter().take(2).map(|m: &Net| m.listen_addrs[0].clone()).collect();
        nodes.push(net::start(config(i, boot)).await.expect("member starts"));
    }
    nodes
}

/// The members of `n`'s view that sent their capabilities.
async fn members(n: &Net) -> Vec<PeerInfo> {
    n.handle.peers().await.unwrap().into_iter().filter(|p| p.gflops > 0.0).collect()
}

/// Waits until the sampled members each list all `want` others; returns
/// the time it took.
async fn wait_views(nodes: &[Net], sample: &[usize], want: &BTreeSet<PeerId>, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let (mut missing, mut without_caps) = (0, 0);
        for &i in sample {
            let me = nodes[i].handle.local_peer_id();
            let view = nodes[i].handle.peers().await.unwrap();
            let got: BTreeSet<PeerId> = members(&nodes[i]).await.iter().map(|p| p.peer_id.parse().unwrap()).collect();
            let lacking: Vec<&PeerId> = want.iter().filter(|p| **p != me && !got.contains(p)).collect();
            missing += lacking.len();
            without_caps += lacking.iter().filter(|p| view.iter().any(|v| v.peer_id == p.to_string())).count();
            assert!(got.iter().all(|p| want.contains(p)), "member {i} lists a stranger");
        }
        if missing == 0 {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{missing} members still missing from the sampled views after {limit:?} ({without_caps} of them in the view without their capabilities)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The plan member `i` computes from its view of a 30-layer model of 450 MB.
async fn plan(nodes: &[Net], i: usize) -> Vec<Vec<policy::Hop>> {
    let costs = ModelCosts {
        layer_cost: vec![1e9; 30],
        layer_bytes: vec![15 << 20; 30],
        first_cost: 0.0,
        first_bytes: 0,
        last_cost: 2e9,
        last_bytes: 0,
        shared_bytes: 0,
    };
    let me = measurement(i);
    let mut peers = vec![PlacementPeer {
        id: nodes[i].handle.local_peer_id().to_string(),
        speed: f64::from(me.gflops) * 1e9,
        memory_bytes: me.memory_bytes,
        missing: None,
    }];
    for p in members(&nodes[i]).await {
        peers.push(PlacementPeer { id: p.peer_id, speed: f64::from(p.gflops) * 1e9, memory_bytes: p.memory_bytes, missing: None });
    }
    policy::routes(&costs, &peers).expect("a plan")
}

/// One mesh at a time: they measure time and connections.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Gossip payload bytes received so far, summed over `nodes`.
async fn gossip_rx(nodes: &[Net]) -> u64 {
    let mut sum = 0;
    for m in nodes {
        sum += m.handle.status().await.unwrap().gossip_rx_bytes;
    }
    sum
}

async fn scale(n: usize) {
    let _one = ONE_AT_A_TIME.lock().await;
    let t0 = Instant::now();
    let mut nodes = start(n).await;
    eprintln!("{n} members started in {:?}", t0.elapsed());
    let all: BTreeSet<PeerId> = nodes.iter().map(|m| m.handle.local_peer_id()).collect();
    let sample = [0, n / 2, n - 1];
    let took = wait_views(&nodes, &sample, &all, Duration::from_secs(120)).await;
    eprintln!("{n} members: sampled views full {took:?} after the last start");
    // Every member's view, not only the sample's.
    let every: Vec<usize> = (0..n).collect();
    wait_views(&nodes, &every, &all, Duration::from_secs(60)).await;

    // Connections settle: every member but the two bootstrap peers within
    // the maximum, once trims may run (each joiner's DHT bootstrap lookups
    // connect it to most of the mesh for a while).
    let until = Instant::now() + GRACE + Duration::from_secs(150);
    let settling = Instant::now();
    loop {
        let mut counts = Vec::with_capacity(n);
        for m in &nodes {
            counts.push(m.handle.status().await.unwrap().connected_peers as usize);
        }
        let over: Vec<(usize, usize)> = counts.iter().copied().enumerate().skip(2).filter(|(_, c)| *c > DEFAULT_MAX_PEERS).collect();
        if over.is_empty() {
            counts.sort();
            eprintln!(
                "connected peers per member after {:?}: min {} median {} 90th {} max {}",
                settling.elapsed(),
                counts[0],
                counts[n / 2],
                counts[n * 9 / 10 - 1],
                counts[n - 1]
            );
            break;
        }
        assert!(Instant::now() < until, "members (index, connected peers) above {DEFAULT_MAX_PEERS}: {over:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The gossip a member receives once settled (payload, each message
    // once), for BENCHMARKS.md: a figure, not a target of this test.
    let window = Duration::from_secs(10);
    let before = gossip_rx(&nodes).await;
    tokio::time::sleep(window).await;
    let received = gossip_rx(&nodes).await.saturating_sub(before);
    eprintln!("gossip received per member: {:.0} B/s", received as f64 / n as f64 / window.as_secs_f64());

    // The same plan everywhere.
    let first = plan(&nodes, 0).await;
    assert!(first.len() > 1, "a plan over several routes: {first:?}");
    for &i in &sample[1..] {
        assert_eq!(plan(&nodes, i).await, first, "member {i} plans otherwise");
    }

    // Kill one member (its task aborted: no farewell, its sockets just
    // close): it leaves every view within the departure bound.
    // (A loss is probed once a link has lived PROBE_AFTER; long past here.)
    let victim = nodes.remove(n / 3);
    let gone = victim.handle.local_peer_id();
    victim.task.abort();
    let bound = PROBE_TIMEOUT + Duration::from_secs(5);
    let t1 = Instant::now();
    loop {
        let mut still = 0;
        for m in &nodes {
            still += m.handle.peers().await.unwrap().iter().any(|p| p.peer_id == gone.to_string()) as usize;
        }
        if still == 0 {
            break;
        }
        assert!(t1.elapsed() < bound, "the killed member is still in {still} views after {:?}", t1.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("the killed member left every view after {:?}", t1.elapsed());
    for m in &nodes {
        m.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_of_dozens_in_one_process() {
    let n = std::env::var("FOGMESH_SCALE_PEERS").ok().and_then(|v| v.parse().ok()).unwrap_or(40usize);
    scale(n.max(6)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "200 members, about two minutes, run with --release; does not pass yet: 2 to 16 members' capabilities missing from the sampled views after 120 s, the process's 2 cores saturated (BENCHMARKS.md)"]
async fn a_mesh_of_two_hundred_in_one_process() {
    scale(200).await;
}


/// Three members serving the default model (75 % of the file each: a
/// 3-stage pipeline) among 24 bare ones, each model peer keeping at most
/// two connections of its own: the stages are reached on demand, through
/// addresses learnt by gossip, and the tokens are the single-process ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_crosses_stages_this_node_was_not_connected_to() {
    use fogmesh::actors::links::ActivationPolicy;
    use fogmesh::actors::SessionEvent;
    use fogmesh::models::{LocalModel, SamplingParams};
    let Some(model) = common::model_path() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let file = std::fs::metadata(&model).unwrap().len();
    let bare = start(24).await;
    let boot = bare[0].listen_addrs[0].clone();
    let mut peers = Vec::new();
    for _ in 0..3 {
        let m = fogmesh::Mesh::builder()
            .mdns(false)
            .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .bootstrap(boot.clone())
            .model(model.clone())
            .threads(1)
            .max_memory(file * 75 / 100)
            .activations(ActivationPolicy::Lossless)
            .peer_bounds(2, 4)
            .measurement(SelfMeasurement { cores: 2, memory_bytes: 1 << 34, gflops: 10.0, version: "test".into() })
            .start()
            .await
            .unwrap();
        peers.push(m);
    }
    let until = Instant::now() + Duration::from_secs(60);
    let route = loop {
        if let Ok(r) = peers[0].runtime().route(&[]).await {
            if r.len() == 3 {
                break r;
            }
        }
        assert!(Instant::now() < until, "no 3-stage plan");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let connected: Vec<String> = peers[0].net().peers().await.unwrap().into_iter().filter(|p| p.connections > 0).map(|p| p.peer_id).collect();
    let linked = route.iter().filter(|h| connected.contains(&h.peer)).count();
    eprintln!("route {route:?}; the entry was connected to {linked} of its other hops beforehand");
    let prompt = vec![1u32, 504, 3575, 282, 4649];
    let want = LocalModel::load(&model, None, 2).unwrap().generate(prompt.clone(), 12, SamplingParams::greedy(), vec![], 0, |_| {}).unwrap().tokens;
    let req = fogmesh::GenerateRequest { prompt, max_tokens: 12, sampling: SamplingParams::greedy(), stop: vec![] };
    let mut h = peers[0].generate(req).await.unwrap();
    let got = loop {
        match tokio::time::timeout(Duration::from_secs(120), h.events.recv()).await.expect("no hang") {
            Some(SessionEvent::Done { generation, route, .. }) => {
                assert_eq!(route.len(), 3, "{route:?}");
                break generation.tokens;
            }
            Some(SessionEvent::Error(e)) => panic!("generation failed: {e}"),
            Some(_) => {}
            None => panic!("no done event"),
        }
    };
    assert_eq!(got, want, "the pipeline's tokens are the single-process ones");
    for m in peers {
        m.shutdown().await;
    }
    for n in &bare {
        n.handle.shutdown().await;
    }
}
