//! In-process mesh tests over loopback TCP (mDNS off: its multicast would
//! leave this host; the namespace test in `netns.rs` covers mDNS). Peers find
//! each other through a bootstrap peer and Kademlia.

use std::time::{Duration, Instant};

use fogmesh::node::measure::SelfMeasurement;
use fogmesh::node::net::{self, Net, NetConfig, NetError, keys};
use fogmesh::protocols::{Bid, ErrorCode, Message};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};

const TTL: Duration = Duration::from_secs(2);

fn config(secret: Option<&str>, bootstrap: Vec<Multiaddr>) -> NetConfig {
    let m = SelfMeasurement { cores: 2, memory_bytes: 1 << 30, gflops: 1.0, version: "test".into() };
    let mut c = NetConfig::new(Keypair::generate_ed25519(), m);
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    c.bootstrap = bootstrap;
    c.mdns = false;
    c.secret = secret.map(|s| keys::parse_secret(s).unwrap());
    c.peer_ttl = TTL;
    c.announce_interval = Duration::from_millis(300);
    c.ping_interval = Duration::from_millis(500);
    c.ping_timeout = Duration::from_secs(1);
    c
}

async fn start(secret: Option<&str>, bootstrap: Vec<Multiaddr>) -> Net {
    net::start(config(secret, bootstrap)).await.expect("node starts")
}

async fn view(n: &Net) -> Vec<PeerId> {
    n.handle.peers().await.unwrap().iter().map(|p| p.peer_id.parse().unwrap()).collect()
}

/// Waits until every node sees exactly all the others (with their gossiped
/// capabilities), or panics after `limit`; returns the time it took.
async fn wait_full_view(nodes: &[&Net], limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let mut full = true;
        for n in nodes {
            let mut want: Vec<PeerId> =
                nodes.iter().map(|m| m.handle.local_peer_id()).filter(|p| *p != n.handle.local_peer_id()).collect();
            want.sort();
            let peers = n.handle.peers().await.unwrap();
            let mut got: Vec<PeerId> = peers.iter().map(|p| p.peer_id.parse().unwrap()).collect();
            got.sort();
            full &= got == want && peers.iter().all(|p| p.cores == 2 && p.version == "test");
        }
        if full {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "no full view after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn first_addr(n: &Net) -> Multiaddr {
    n.listen_addrs[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_form_a_full_view() {
    let a = start(None, vec![]).await;
    let b = start(None, vec![first_addr(&a)]).await;
    let took = wait_full_view(&[&a, &b], Duration::from_secs(10)).await;
    eprintln!("2 peers: full view in {took:?}");
    let p = &a.handle.peers().await.unwrap()[0];
    assert!(p.rtt_ms.is_some_and(|r| r > 0.0 && r < 1000.0), "rtt {:?}", p.rtt_ms);
    assert!(p.connections >= 1);
    let s = b.handle.status().await.unwrap();
    assert_eq!(s.peer_id, b.handle.local_peer_id().to_string());
    assert!(!s.mdns && !s.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_peers_form_a_full_view_and_a_stopped_peer_leaves_within_the_bound() {
    let seed = start(None, vec![]).await;
    let mut nodes = vec![];
    for _ in 0..4 {
        nodes.push(start(None, vec![first_addr(&seed)]).await);
    }
    let all: Vec<&Net> = std::iter::once(&seed).chain(nodes.iter()).collect();
    let took = wait_full_view(&all, Duration::from_secs(20)).await;
    eprintln!("5 peers: full view in {took:?}");

    // Stop one (not the seed): every other peer drops it within the bound.
    let gone = nodes.pop().unwrap();
    let gone_id = gone.handle.local_peer_id();
    let bound = config(None, vec![]).departure_bound();
    gone.handle.shutdown().await;
    gone.task.join().await;
    let t0 = Instant::now();
    let rest: Vec<&Net> = std::iter::once(&seed).chain(nodes.iter()).collect();
    loop {
        let mut still = 0;
        for n in &rest {
            still += view(n).await.contains(&gone_id) as usize;
        }
        if still == 0 {
            break;
        }
        assert!(t0.elapsed() < bound, "stopped peer still in {still} views after {:?}", t0.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("stopped peer left every view after {:?} (bound {bound:?})", t0.elapsed());
    // The rest still see each other.
    wait_full_view(&rest, Duration::from_secs(5)).await;
    // The stopped node's handle reports that it stopped, not a panic.
    assert!(matches!(gone.handle.peers().await, Err(NetError::Stopped)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_secret_never_appears() {
    let s1 = "11".repeat(32);
    let s2 = "22".repeat(32);
    let a = start(Some(&s1), vec![]).await;
    let b = start(Some(&s1), vec![first_addr(&a)]).await;
    let stranger = start(Some(&s2), vec![first_addr(&a), first_addr(&b)]).await;
    let open = start(None, vec![first_addr(&a)]).await;
    wait_full_view(&[&a, &b], Duration::from_secs(10)).await;
    // Let the strangers retry their bootstrap dials for a while.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for n in [&a, &b] {
        let v = view(n).await;
        assert!(!v.contains(&stranger.handle.local_peer_id()));
        assert!(!v.contains(&open.handle.local_peer_id()));
        assert_eq!(n.handle.status().await.unwrap().connections, 1, "only the a-b connection");
    }
    for n in [&stranger, &open] {
        assert!(view(n).await.is_empty());
        assert_eq!(n.handle.status().await.unwrap().connections, 0);
    }
    // QUIC cannot carry the secret: asking for it is a clear error.
    let mut c = config(Some(&s1), vec![]);
    c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    let e = net::start(c).await.err().expect("refused");
    assert!(e.to_string().contains("QUIC"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_requests_round_trip_and_overload_is_answered_busy() {
    let mut c = config(None, vec![]);
    c.inbound_capacity = 1;
    let mut server = net::start(c).await.unwrap();
    let client = start(None, vec![first_addr(&server)]).await;
    wait_full_view(&[&server, &client], Duration::from_secs(10)).await;
    let sid = server.handle.local_peer_id();
    let bid = |n: u64| Message::Bid(Bid { auction: n, peer: "12D3KooWbidder".into(), queue_ms: 1.0, service_ms: 2.0, transfer_ms: 3.0 });

    // An echo server answers one request.
    let h = client.handle.clone();
    let req = tokio::spawn(async move { h.request(sid, bid(1)).await });
    let inbound = tokio::time::timeout(Duration::from_secs(5), server.inbound.recv()).await.unwrap().unwrap();
    assert_eq!(inbound.peer, client.handle.local_peer_id());
    assert_eq!(inbound.message, bid(1));
    inbound.respond(bid(2));
    assert_eq!(req.await.unwrap().unwrap(), bid(2));

    // With the one-slot queue taken, the next request is answered BUSY at once.
    let h = client.handle.clone();
    let held = tokio::spawn(async move { h.request(sid, bid(3)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    match client.handle.request(sid, bid(4)).await.unwrap() {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::Busy),
        other => panic!("expected BUSY, got {other:?}"),
    }
    // A request dropped unanswered comes back as an error, not a hang.
    drop(server.inbound.recv().await.unwrap());
    match held.await.unwrap().unwrap() {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::Internal),
        other => panic!("expected INTERNAL, got {other:?}"),
    }
    // A node that serves nothing answers NOT_SERVED.
    drop(server.inbound);
    match client.handle.request(sid, bid(5)).await.unwrap() {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::NotServed),
        other => panic!("expected NOT_SERVED, got {other:?}"),
    }
    // A request to a peer nobody knows fails with an error.
    let e = client.handle.request(PeerId::random(), bid(6)).await.unwrap_err();
    assert!(matches!(e, NetError::Request { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_streams_carry_frames_both_ways() {
    let server = start(None, vec![]).await;
    let client = start(None, vec![first_addr(&server)]).await;
    wait_full_view(&[&server, &client], Duration::from_secs(10)).await;
    let sid = server.handle.local_peer_id();
    // Nobody accepts stage streams yet: opening one is a clear error.
    let e = client.handle.open_stage_stream(sid).await.unwrap_err();
    assert!(e.to_string().contains("stage stream"), "{e}");

    let mut incoming = server.handle.accept_stage_streams().expect("first acceptor");
    assert!(server.handle.accept_stage_streams().is_none(), "only one acceptor");
    tokio::spawn(async move {
        while let Some(mut s) = incoming.next().await {
            tokio::spawn(async move {
                while let Ok(Message::Bid(mut b)) = s.recv().await {
                    b.auction += 1000;
                    s.send(&Message::Bid(b)).await.unwrap();
                }
            });
        }
    });
    let mut s = client.handle.open_stage_stream(sid).await.unwrap();
    assert_eq!(s.peer(), sid);
    for i in 0..20u64 {
        let b = Bid { auction: i, peer: Default::default(), queue_ms: 0.0, service_ms: 0.0, transfer_ms: 0.0 };
        s.send(&Message::Bid(b)).await.unwrap();
    }
    for i in 0..20u64 {
        match s.recv().await.unwrap() {
            Message::Bid(b) => assert_eq!(b.auction, i + 1000),
            other => panic!("{other:?}"),
        }
    }
    // The server ends the stream on a message it does not expect; the client
    // sees an error, not a hang.
    s.send(&Message::Error(fogmesh::protocols::ErrorFrame { request: 0, code: fogmesh::protocols::ErrorCode::Malformed, message: "x".into() })).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), s.recv()).await.unwrap().is_err());
}

/// Two peers that find each other at the same moment dial each other at
/// once. With libp2p's default of dialing from the listening port, TCP merged
/// the two dials into one connection with two initiators and both noise
/// handshakes failed: the namespace benchmark hit it about once in 40 mDNS
/// pairings. On loopback the race is too narrow to reproduce reliably (this
/// test passed without the fix), so it is a smoke test; the namespace runs
/// are the evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_connect() {
    for _ in 0..8 {
        let a = start(Some(&"33".repeat(32)), vec![]).await;
        let b = start(Some(&"33".repeat(32)), vec![]).await;
        let (ra, rb) = tokio::join!(a.handle.dial(first_addr(&b)), b.handle.dial(first_addr(&a)));
        ra.unwrap();
        rb.unwrap();
        wait_full_view(&[&a, &b], Duration::from_secs(10)).await;
    }
}

/// A peer cannot pin unbounded stage streams on a node: past four from one
/// peer, each new stream is dropped at once (it sees the stream end), while
/// the first four stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_at_most_four_stage_streams_per_peer() {
    let node = fogmesh::Mesh::builder()
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .measurement(SelfMeasurement { cores: 2, memory_bytes: 1 << 30, gflops: 1.0, version: "test".into() })
        .start()
        .await
        .unwrap();
    let client = start(None, vec![]).await;
    client.handle.dial(node.listen_addrs()[0].clone()).await.unwrap();
    let id = node.peer_id();
    let until = Instant::now() + Duration::from_secs(10);
    while !view(&client).await.contains(&id) {
        assert!(Instant::now() < until, "the client never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut held = Vec::new();
    let mut dropped = 0;
    for _ in 0..6 {
        let mut s = client.handle.open_stage_stream(id).await.unwrap();
        // A close for a session nobody serves: delivered and ignored, so an
        // accepted stream stays silent and open.
        let _ = s.send(&Message::SessionClose(fogmesh::protocols::SessionClose { session: 1 })).await;
        match tokio::time::timeout(Duration::from_millis(1500), s.recv()).await {
            Err(_) => held.push(s),
            Ok(Err(_)) => dropped += 1,
            Ok(Ok(m)) => panic!("unexpected answer {m:?}"),
        }
    }
    assert_eq!((held.len(), dropped), (4, 2));
    node.shutdown().await;
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()).unwrap();
    kb * 1024
}

/// A peer holding the secret floods a `fogmesh node` process with stage
/// streams, each a frame header claiming 16 MiB and then 1 MiB of payload
/// that stalls there: the node takes 4 of them (the rest are closed), its
/// resident memory grows by less than 32 MiB (64 streams' payloads would
/// be 64 MiB), and it keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_huge_frame_headers_stays_within_a_memory_bound() {
    use fogmesh::node::cluster::{ClusterOptions, LocalCluster};
    use fogmesh::protocols::{Limits, StageInput, StageRequest, encode_message};
    use futures::AsyncWriteExt;
    let c = LocalCluster::start(&ClusterOptions::new(env!("CARGO_BIN_EXE_fogmesh"), None, 1)).unwrap();
    let victim = &c.peers[0];
    let pid = c.pid(0).unwrap();
    let status: fogmesh::node::api::types::NodeStatus =
        serde_json::from_str(&fogmesh::node::client::http_get(&victim.http, "/status").unwrap()).unwrap();
    let addr: Multiaddr = status.listen_addrs.iter().find(|a| a.contains("/tcp/")).unwrap().parse().unwrap();
    let id: PeerId = victim.peer_id.parse().unwrap();
    let attacker = start(None, vec![]).await;
    attacker.handle.dial(addr).await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !view(&attacker).await.contains(&id) {
        assert!(Instant::now() < until, "the attacker never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A real frame of 16 MiB, cut after its header and 1 MiB.
    let limits = Limits::default();
    let big = Message::StageRequest(StageRequest {
        request: 1,
        session: 1,
        step: 0,
        stage: 1,
        position: 0,
        sample: false,
        input: StageInput::Activation(vec![7; limits.max_frame - 4096]),
    });
    let mut frame = Vec::new();
    encode_message(&big, &limits, &mut frame).unwrap();
    let head = &frame[..(1 << 20) + 16];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(pid);
    let mut held = Vec::new();
    for _ in 0..64 {
        let Ok(s) = attacker.handle.open_stage_stream(id).await else { continue };
        let mut io = s.into_inner();
        if tokio::time::timeout(Duration::from_secs(3), io.write_all(head)).await.is_ok_and(|r| r.is_ok()) {
            let _ = tokio::time::timeout(Duration::from_secs(1), io.flush()).await;
        }
        held.push(io);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss(pid);
    let grew = after.saturating_sub(before);
    eprintln!("victim RSS {} MiB -> {} MiB under 64 streams of 16 MiB headers with 1 MiB each", before >> 20, after >> 20);
    assert!(grew < 32 << 20, "the victim's memory grew by {} MiB", grew >> 20);
    let health = fogmesh::node::client::http_get(&victim.http, "/health").unwrap();
    assert!(health.contains("ok"), "{health}");
    drop(held);
    attacker.handle.shutdown().await;
}

/// `--max-memory` is the whole offer: three quarters of it for weights,
/// which placement never plans past. With each peer offering 60 % of the
/// model file (45 % for weights), two peers cannot hold the model and say
/// so; offering 75 % (56 %), three peers hold it in a pipeline over all of
/// them. (Needs the default model.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_never_plans_past_the_memory_a_peer_offers() {
    let model = fogmesh::models::default_model_path();
    if !model.exists() {
        assert!(std::env::var_os("CI").is_none(), "this test needs the default model (fogmesh fetch)");
        eprintln!("SKIPPED: needs the default model");
        return;
    }
    let file = std::fs::metadata(&model).unwrap().len();
    let peer = |offer: u64, boot: Option<Multiaddr>| {
        let mut b = fogmesh::Mesh::builder()
            .mdns(false)
            .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .model(model.clone())
            .threads(1)
            .max_memory(offer)
            .measurement(SelfMeasurement { cores: 2, memory_bytes: 1 << 34, gflops: 10.0, version: "test".into() });
        if let Some(a) = boot {
            b = b.bootstrap(a);
        }
        b.start()
    };
    // Two peers at 60 %: no plan fits.
    let a = peer(file * 60 / 100, None).await.unwrap();
    let b = peer(file * 60 / 100, Some(a.listen_addrs()[0].clone())).await.unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    let err = loop {
        let view = a.runtime().view().await;
        if view.iter().filter(|v| v.gflops > 0.0).count() >= 2 {
            break a.runtime().route(&[]).await.unwrap_err().to_string();
        }
        assert!(Instant::now() < until, "the two peers never met");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(err.contains("does not fit"), "{err}");
    b.shutdown().await;
    a.shutdown().await;
    // Three peers at 75 %: a pipeline over all three.
    let a = peer(file * 75 / 100, None).await.unwrap();
    let b = peer(file * 75 / 100, Some(a.listen_addrs()[0].clone())).await.unwrap();
    let c = peer(file * 75 / 100, Some(a.listen_addrs()[0].clone())).await.unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    let route = loop {
        if let Ok(r) = a.runtime().route(&[]).await {
            if r.len() == 3 {
                break r;
            }
        }
        assert!(Instant::now() < until, "no 3-stage plan");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("75 % of the file on each of three peers: {route:?}");
    for m in [c, b, a] {
        m.shutdown().await;
    }
}
