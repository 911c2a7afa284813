//! Stage-traffic transport benchmark on loopback: libp2p request-response
//! (one new yamux stream per request: the node's RPC protocol) against a
//! long-lived libp2p-stream stream carrying the same frames (the node's stage
//! protocol), for 4 KB and 300 KB messages (a decode token and a prefill
//! chunk of a 576-wide model).
//!
//! `cargo run --release --example stage_bench -- [--iters N] [--json]`
//!
//! Both peers run in this process on loopback TCP + noise + yamux; each
//! figure is the median of `iters` sequential echo round trips (request and
//! echoed reply of the same size), and the throughput of 16 requests kept in
//! flight with an 8-byte reply (16
//! requests ahead of their replies on the one stream).

use std::time::{Duration, Instant};

use fogmesh::node::measure::SelfMeasurement;
use fogmesh::node::net::{self, Net, NetConfig};
use fogmesh::protocols::{Message, StageInput, StageRequest};
use futures::StreamExt;
use libp2p::PeerId;
use fogmesh::models::stats::median;

fn message(bytes: usize) -> Message {
    Message::StageRequest(StageRequest {
        request: 1,
        session: 1,
        step: 0,
        stage: 0,
        position: 0,
        sample: false,
        input: StageInput::Activation(vec![0x5a; bytes]),
    })
}

async fn node(bootstrap: Vec<libp2p::Multiaddr>) -> Net {
    let m = SelfMeasurement { cores: 1, memory_bytes: 0, gflops: 0.0, version: "bench".into() };
    let mut c = NetConfig::new(libp2p::identity::Keypair::generate_ed25519(), m);
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    c.bootstrap = bootstrap;
    c.mdns = false;
    net::start(c).await.expect("start")
}

struct Row {
    transport: &'static str,
    bytes: usize,
    rtt_ms: f64,
    pipelined_mb_s: f64,
}

async fn bench_rr(client: &Net, server: PeerId, bytes: usize, iters: usize) -> Row {
    let msg = message(bytes);
    let mut rtts = vec![];
    for _ in 0..iters {
        let t = Instant::now();
        client.handle.request(server, msg.clone()).await.unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Pipelined: 16 in flight, small replies (the server answers a short
    // message when the request is large: see `serve_rr`).
    let total = iters * 2;
    let t = Instant::now();
    let mut inflight = futures::stream::iter((0..total).map(|_| {
        let h = client.handle.clone();
        let m = message(bytes + 1);
        async move { h.request(server, m).await.unwrap() }
    }))
    .buffer_unordered(16);
    while inflight.next().await.is_some() {}
    let mb_s = (total * bytes) as f64 / t.elapsed().as_secs_f64() / 1e6;
    Row { transport: "request-response", bytes, rtt_ms: median(&rtts), pipelined_mb_s: mb_s }
}

/// Echoes requests; a request whose payload length is odd gets a tiny reply.
fn serve_rr(mut server: Net) -> Net {
    let mut inbound = std::mem::replace(&mut server.inbound, tokio::sync::mpsc::channel(1).1);
    tokio::spawn(async move {
        while let Some(req) = inbound.recv().await {
            let small = matches!(&req.message, Message::StageRequest(r) if matches!(&r.input, StageInput::Activation(a) if a.len() % 2 == 1));
            let reply = if small { message(8) } else { req.message.clone() };
            req.respond(reply);
        }
    });
    server
}

async fn bench_stream(client: &Net, server: PeerId, bytes: usize, iters: usize) -> Row {
    let mut s = client.handle.open_stage_stream(server).await.expect("open stream");
    let msg = message(bytes);
    let mut rtts = vec![];
    for _ in 0..iters {
        let t = Instant::now();
        s.send(&msg).await.unwrap();
        s.recv().await.unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Pipelined over one stream: 16 requests ahead of the replies.
    let total = iters * 2;
    let small = message(bytes + 1);
    let t = Instant::now();
    let mut sent = 0;
    let mut received = 0;
    while received < total {
        while sent < total && sent - received < 16 {
            s.send(&small).await.unwrap();
            sent += 1;
        }
        s.recv().await.unwrap();
        received += 1;
    }
    let mb_s = (total * bytes) as f64 / t.elapsed().as_secs_f64() / 1e6;
    Row { transport: "stream", bytes, rtt_ms: median(&rtts), pipelined_mb_s: mb_s }
}

fn serve_stream(server: &Net) {
    let mut incoming = server.handle.accept_stage_streams().expect("accept");
    tokio::spawn(async move {
        while let Some(mut s) = incoming.next().await {
            tokio::spawn(async move {
                while let Ok(m) = s.recv().await {
                    let small = matches!(&m, Message::StageRequest(r) if matches!(&r.input, StageInput::Activation(a) if a.len() % 2 == 1));
                    let reply = if small { message(8) } else { m };
                    if s.send(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--iters N"))
        .unwrap_or(200);
    let json = args.iter().any(|a| a == "--json");
    let server = node(vec![]).await;
    let client = node(vec![server.listen_addrs[0].clone()]).await;
    let sid = server.handle.local_peer_id();
    while client.handle.peers().await.unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serve_stream(&server);
    let _server = serve_rr(server);
    let mut rows = vec![];
    for bytes in [4 << 10, 300 << 10] {
        // Warm up both paths, then alternate them so drift hits both alike.
        bench_rr(&client, sid, bytes, 20).await;
        bench_stream(&client, sid, bytes, 20).await;
        for _ in 0..3 {
            rows.push(bench_rr(&client, sid, bytes, iters).await);
            rows.push(bench_stream(&client, sid, bytes, iters).await);
        }
    }
    let mut out = vec![];
    for transport in ["request-response", "stream"] {
        for bytes in [4 << 10, 300 << 10] {
            let mut sel: Vec<&Row> = rows.iter().filter(|r| r.transport == transport && r.bytes == bytes).collect();
            sel.sort_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms));
            let rtt = sel[sel.len() / 2].rtt_ms;
            let mbs: Vec<f64> = sel.iter().map(|r| r.pipelined_mb_s).collect();
            let mb_s = median(&mbs);
            out.push((transport, bytes, rtt, mb_s));
        }
    }
    if json {
        let v: Vec<_> = out
            .iter()
            .map(|(t, b, r, m)| serde_json::json!({"transport": t, "bytes": b, "rtt_ms": r, "pipelined_mb_s": m}))
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        println!("| transport | message | median echo RTT (ms) | pipelined MB/s (16 in flight) |");
        println!("|---|---|---|---|");
        for (t, b, r, m) in out {
            println!("| {t} | {} KB | {r:.3} | {m:.0} |", b >> 10);
        }
    }
}
