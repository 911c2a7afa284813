//! Benchmarks of the distributed pipeline, each beside its comparison in the
//! same run (rounds interleaved; medians and ratios):
//! - decode tok/s: 3 peers on loopback (split; whole replicas) vs one process;
//! - whole replicas vs a split pipeline, 2 peers pinned to a core each, 8
//!   streams (`--only replicas`);
//! - three replicas, one 3x slower: p99 latency and tok/s of bursts of 8 and
//!   32 requests, hops chosen by bids vs round-robin vs least-queued
//!   (`--only hetero`);
//! - aggregate tok/s of 4 concurrent sessions: 2 peers pinned to one core
//!   each vs 1 peer on one core (`taskset`);
//! - time to first token of a 512-token prompt: 1 vs 3 stages;
//! - recovery after losing the middle stage with a 100-token history;
//! - streamed tokens/s through the OpenAI API (`/v1/completions`, SSE) vs
//!   `fogmesh run`'s stream on the same 3-peer mesh, both timed by the client
//!   from first to last token;
//! - 32 concurrent streaming chat clients on a 3-peer mesh: all complete,
//!   aggregate tokens/s and time to first token, beside one client alone;
//! - time from `cargo run --release -- demo` (crates already built) to the
//!   first answer token on its stdout;
//! - with `--llama-cpp DIR` (its `build/bin`): llama.cpp's RPC backend with 2
//!   `ggml-rpc-server`s on loopback vs a 2-peer fogmesh pipeline, same threads.
//!
//! `cargo build --release && cargo run --release --example mesh_bench -- --reps 5 [--llama-cpp DIR]`
//! (needs the default model: `fogmesh fetch`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fogmesh::node::api::types::{GenFlags, PlanView};
use fogmesh::models::Timings;
use fogmesh::node::cluster::{ClusterOptions, LocalCluster};
use fogmesh::node::client::generate_on;
use serde_json::Value;
use fogmesh::models::stats::median;

fn flags(prompt: &str, max: usize) -> GenFlags {
    GenFlags { prompt: prompt.into(), raw: true, max_tokens: max, temperature: 0.0, ..GenFlags::default() }
}

fn decode_rate(t: &Timings) -> f64 {
    t.decode_tokens as f64 / (t.decode_ms / 1e3)
}

/// One-process generation through the CLI: its timings.
fn one_process(exe: &Path, f: &GenFlags, threads: usize) -> Result<Timings> {
    let out = Command::new(exe)
        .args(["generate", "--raw", "--temperature", "0", "--json", "--threads", &threads.to_string()])
        .args(["--max-tokens", &f.max_tokens.to_string(), "--prompt", &f.prompt])
        .output()?;
    if !out.status.success() {
        bail!("generate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(serde_json::from_value(v["timings"].clone())?)
}

/// How the peers of a benchmark mesh hold the model.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// Each offers 95 % of the file (71 % for weights): nobody holds the
    /// whole model, so the peers form one pipeline (any two carry it).
    Split,
    /// Each offers what the host has: every peer holds a whole replica.
    Replicas,
}

fn options(exe: &Path, model: &Path, peers: usize, threads: usize, pin: Option<Vec<usize>>, layout: Layout) -> ClusterOptions {
    let mut o = ClusterOptions::new(exe, Some(model.to_path_buf()), peers);
    o.threads = threads;
    o.pin = pin;
    o.log = std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into());
    if layout == Layout::Split && peers > 1 {
        o.max_memory = Some(std::fs::metadata(model).map_or(0, |m| m.len()) * 95 / 100);
    }
    o
}

fn mesh(exe: &Path, model: &Path, peers: usize, threads: usize, pin: Option<Vec<usize>>) -> Result<LocalCluster> {
    start(&options(exe, model, peers, threads, pin, Layout::Split))
}

fn start(o: &ClusterOptions) -> Result<LocalCluster> {
    let peers = o.peers;
    let c = LocalCluster::start(o)?;
    c.wait_plan(peers, Duration::from_secs(60))?;
    // Warm-up (page cache, connections, streams).
    generate_on(&c.peers[0].http, &flags("Hello", 8), |_| {})?;
    Ok(c)
}

/// Streams `/v1/completions` (greedy, raw prompt): (tokens, seconds from the
/// first streamed token to the last, seconds to the first).
fn api_stream(http: &str, path: &str, body: &Value) -> Result<(usize, f64, f64)> {
    use std::io::BufRead;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let t0 = Instant::now();
    let resp = agent.post(&format!("http://{http}{path}")).header("content-type", "application/json").send(body.to_string().as_bytes())?;
    anyhow::ensure!(resp.status().is_success(), "{path}: {}", resp.status());
    let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
    let (mut first, mut last, mut n) = (None, t0, 0);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("{path}: the stream ended without [DONE]");
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        anyhow::ensure!(v.get("error").is_none(), "{path}: {v}");
        let c = &v["choices"][0];
        if c["text"].as_str().or(c["delta"]["content"].as_str()).is_some_and(|t| !t.is_empty()) {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            n += 1;
        }
    }
    let first = first.context("no token streamed")?;
    Ok((n, last.duration_since(first).as_secs_f64(), first.duration_since(t0).as_secs_f64()))
}

/// Whether the demo's stdout holds a piece of the answer: it starts after
/// the echoed prompt ("> …" and a blank line).
fn answer_started(out: &[u8]) -> bool {
    let Some(i) = out.windows(2).position(|w| w == b"> ") else { return false };
    let rest = &out[i..];
    rest.windows(2).position(|w| w == b"\n\n").is_some_and(|j| rest.len() > j + 2)
}

/// Tokens/s from the first streamed piece to the last.
fn stream_rate(n: usize, secs: f64) -> f64 {
    n.saturating_sub(1) as f64 / secs.max(1e-9)
}

/// `n` requests of `max` tokens sent to `http` at once: each one's
/// latency (seconds, sent to done), the aggregate tokens/s, and how many
/// requests each peer served.
fn burst(http: &str, n: usize, max: usize) -> Result<(Vec<f64>, f64, std::collections::BTreeMap<String, usize>)> {
    let t = Instant::now();
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let http = http.to_string();
            let f = flags(["Once upon a time", "The history of computing", "In a small village", "Rust is a language"][i % 4], max);
            std::thread::spawn(move || {
                let t = Instant::now();
                generate_on(&http, &f, |_| {}).map(|r| (t.elapsed().as_secs_f64(), r.done.tokens.len(), r.done.route))
            })
        })
        .collect();
    let (mut lat, mut tokens, mut served) = (Vec::new(), 0, std::collections::BTreeMap::new());
    for h in hs {
        let (l, n, route) = h.join().map_err(|_| anyhow::anyhow!("session thread panicked"))??;
        lat.push(l);
        tokens += n;
        for hop in route {
            *served.entry(hop.peer).or_insert(0) += 1;
        }
    }
    Ok((lat, tokens as f64 / t.elapsed().as_secs_f64(), served))
}

/// The `q` quantile of `xs` (nearest rank).
fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1).copied().unwrap_or(f64::NAN)
}

/// Aggregate tokens/s of `n` concurrent sessions through `http`.
fn concurrent(http: &str, n: usize, max: usize) -> Result<f64> {
    let t = Instant::now();
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let http = http.to_string();
            let f = flags(["Once upon a time", "The history of computing", "In a small village", "Rust is a language"][i % 4], max);
            std::thread::spawn(move || generate_on(&http, &f, |_| {}).map(|r| r.done.tokens.len()))
        })
        .collect();
    let mut tokens = 0;
    for h in hs {
        tokens += h.join().map_err(|_| anyhow::anyhow!("session thread panicked"))??;
    }
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

struct Rpc(Vec<Child>);
impl Drop for Rpc {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// llama.cpp's RPC backend: 2 rpc-servers (1 thread each) and llama-bench's
/// decode test through them; tok/s.
fn llama_rpc(dir: &Path, model: &Path, reps: usize) -> Result<f64> {
    let mut servers = Rpc(Vec::new());
    for port in [50152, 50153] {
        servers.0.push(
            Command::new(dir.join("ggml-rpc-server"))
                .args(["-H", "127.0.0.1", "-p", &port.to_string(), "-t", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("ggml-rpc-server")?,
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let out = Command::new(dir.join("llama-bench"))
        .arg("-m")
        .arg(model)
        .args(["--rpc", "127.0.0.1:50152,127.0.0.1:50153", "-ngl", "99", "-p", "0", "-n", "64", "-t", "1"])
        .args(["-r", &reps.to_string(), "-o", "json"])
        .output()?;
    if !out.status.success() {
        bail!("llama-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v[0]["avg_ts"].as_f64().context("llama-bench JSON without avg_ts")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let reps: usize = arg("--reps").map_or(Ok(5), |s| s.parse())?;
    let llama: Option<PathBuf> = arg("--llama-cpp").map(PathBuf::from);
    let only = arg("--only");
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    let exe = std::env::current_exe()?.parent().and_then(Path::parent).context("target dir")?.join("fogmesh");
    anyhow::ensure!(exe.exists(), "build the binary first: cargo build --release");
    let model = fogmesh::models::default_model_path();
    anyhow::ensure!(model.exists(), "the default model is missing: fogmesh fetch");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("host: {cores} cores, kernel {}; medians of {reps}", fogmesh::models::kernel_name());
    let story = flags("Once upon a time", 128);

    if want("decode") {
        let m3 = mesh(&exe, &model, 3, 1, None)?;
        let (mut p1, mut p2, mut d3) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            p1.push(decode_rate(&one_process(&exe, &story, 1)?));
            p2.push(decode_rate(&one_process(&exe, &story, cores)?));
            d3.push(decode_rate(&generate_on(&m3.peers[0].http, &story, |_| {})?.done.timings));
        }
        let (p1, p2, d3) = (median(&p1), median(&p2), median(&d3));
        println!("decode tok/s: one process 1 thread {p1:.1}, {cores} threads {p2:.1}; 3 peers split (1 thread each) {d3:.1}");
        println!("  ratio 3-peer / one process: {:.2}x (1 thread), {:.2}x ({cores} threads)", d3 / p1, d3 / p2);
        drop(m3);
        // Peers that each hold the model: a request runs on one replica.
        let r3 = start(&options(&exe, &model, 3, 1, None, Layout::Replicas))?;
        let n1 = start(&options(&exe, &model, 1, 1, None, Layout::Replicas))?;
        let (mut p1, mut d3, mut d1, mut local) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for _ in 0..reps {
            p1.push(decode_rate(&one_process(&exe, &story, 1)?));
            let r = generate_on(&r3.peers[0].http, &story, |_| {})?;
            anyhow::ensure!(r.done.route.len() == 1, "not a whole replica: {:?}", r.done.route);
            local += usize::from(r.done.route[0].peer == r3.peers[0].peer_id);
            d3.push(decode_rate(&r.done.timings));
            d1.push(decode_rate(&generate_on(&n1.peers[0].http, &story, |_| {})?.done.timings));
        }
        let (p1, d3, d1) = (median(&p1), median(&d3), median(&d1));
        println!(
            "decode tok/s: one process 1 thread {p1:.1}; one node (1 thread) {d1:.1} ({:.2}x); 3 peers holding whole replicas (1 thread each) {d3:.1} ({:.2}x; {local} of {reps} on the entry node's own replica)",
            d1 / p1,
            d3 / p1
        );
    }

    if want("replicas") && cores >= 2 {
        // Two peers pinned to a core each, 8 streams: whole replicas vs
        // today's always-split plan, rounds interleaved.
        let rep = start(&options(&exe, &model, 2, 1, Some(vec![0, 1]), Layout::Replicas))?;
        let split = start(&options(&exe, &model, 2, 1, Some(vec![0, 1]), Layout::Split))?;
        let (mut a, mut b, mut on_entry) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let (_, tps, served) = burst(&rep.peers[0].http, 8, 64)?;
            a.push(tps);
            on_entry.push(served.get(&rep.peers[0].peer_id).copied().unwrap_or(0));
            b.push(burst(&split.peers[0].http, 8, 64)?.1);
        }
        let (a, b) = (median(&a), median(&b));
        println!(
            "8 streams on 2 peers pinned to a core each, aggregate tok/s: whole replicas {a:.1} (on the entry's replica: {on_entry:?} of 8); split pipeline {b:.1}; ratio {:.2}x",
            a / b
        );
    }

    if want("hetero") {
        // Three replicas, the third 3x slower (a compute throttle): request
        // latency and throughput under bursts of 8 and 32 requests, by how
        // hops are chosen; one mesh per choice, the same bursts.
        for streams in [8usize, 32] {
            let mut rows = Vec::new();
            for how in ["bids", "round-robin", "least-queued"] {
                let mut o = options(&exe, &model, 3, 1, None, Layout::Replicas);
                o.extra = vec!["--hop-choice".into(), how.into()];
                o.peer_env = vec![vec![], vec![], vec![("FOGMESH_TEST_SLOWDOWN".into(), "3".into())]];
                let c = start(&o)?;
                let slow = c.peers[2].peer_id.clone();
                let (mut p99, mut agg, mut slow_share) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..reps.min(3) {
                    let (lat, tps, served) = burst(&c.peers[0].http, streams, 32)?;
                    p99.push(quantile(&lat, 0.99));
                    agg.push(tps);
                    slow_share.push(served.get(&slow).copied().unwrap_or(0) as f64 / streams as f64);
                }
                rows.push((how, median(&p99), median(&agg), median(&slow_share)));
            }
            let rr = rows.iter().find(|r| r.0 == "round-robin").map_or(f64::NAN, |r| r.1);
            for (how, p99, agg, share) in &rows {
                println!(
                    "hetero, {streams} requests at once (peer 3 3x slower): {how:<12} p99 {p99:.2} s ({:.2}x round-robin), {agg:.1} tok/s, slow peer served {:.0} %",
                    p99 / rr,
                    share * 100.0
                );
            }
        }
    }

    if want("ttft") {
        let long = flags(&"The quick brown fox jumps over the lazy dog near the river bank. ".repeat(37), 1);
        let m1 = mesh(&exe, &model, 1, cores, None)?;
        let m3 = mesh(&exe, &model, 3, 1, None)?;
        let (mut t1, mut t3, mut n) = (Vec::new(), Vec::new(), 0);
        for _ in 0..reps {
            let r = generate_on(&m1.peers[0].http, &long, |_| {})?;
            n = r.done.prompt_tokens.len();
            t1.push(r.done.timings.prefill_ms);
            t3.push(generate_on(&m3.peers[0].http, &long, |_| {})?.done.timings.prefill_ms);
        }
        let (t1, t3) = (median(&t1), median(&t3));
        println!("time to first token, {n}-token prompt: 1 stage ({cores} threads) {t1:.0} ms; 3 stages (1 thread each) {t3:.0} ms; ratio {:.2}x", t3 / t1);
    }

    if want("pinned") && cores >= 2 {
        let one = mesh(&exe, &model, 1, 1, Some(vec![0]))?;
        let two = mesh(&exe, &model, 2, 1, Some(vec![0, 1]))?;
        let (mut a1, mut a2) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            a1.push(concurrent(&one.peers[0].http, 4, 64)?);
            a2.push(concurrent(&two.peers[0].http, 4, 64)?);
        }
        let (a1, a2) = (median(&a1), median(&a2));
        println!("4 concurrent sessions, aggregate tok/s: 1 peer on 1 core {a1:.1}; 2 peers pinned to 1 core each {a2:.1}; ratio {:.2}x", a2 / a1);
    }

    if want("recovery") {
        let mut gaps = Vec::new();
        for _ in 0..reps {
            let mut c = mesh(&exe, &model, 3, 1, None)?;
            let plan: PlanView = serde_json::from_str(&fogmesh::node::client::http_get(&c.peers[0].http, "/plan")?)?;
            let middle = plan.route.get(1).map(|h| h.peer.clone()).unwrap_or_default();
            let idx = c.index_of(&middle).context("middle peer")?;
            // The session's own node must survive: use another one.
            let entry = (idx + 1) % c.peers.len();
            let (r, gap) = c.generate_killing(entry, idx, 100, &flags("Once upon a time", 160))?;
            anyhow::ensure!(r.done.failovers >= 1, "no failover happened");
            gaps.push(gap.context("no token after the kill")?.as_secs_f64() * 1e3);
        }
        println!("recovery after losing the middle stage at token 100: median {:.0} ms (all: {gaps:.0?})", median(&gaps));
    }

    if want("api") {
        let m3 = mesh(&exe, &model, 3, 1, None)?;
        let http = m3.peers[0].http.clone();
        let body = serde_json::json!({ "model": "SmolLM2-135M-Instruct.Q4_1", "prompt": story.prompt, "max_tokens": story.max_tokens,
                                       "temperature": 0, "stream": true });
        let (mut api, mut run) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let (n, secs, _) = api_stream(&http, "/v1/completions", &body)?;
            api.push(stream_rate(n, secs));
            let (mut first, mut last, mut k) = (None, Instant::now(), 0usize);
            generate_on(&http, &story, |t| {
                if !t.is_empty() {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    k += 1;
                }
            })?;
            run.push(stream_rate(k, last.duration_since(first.context("no token")?).as_secs_f64()));
        }
        let (a, r) = (median(&api), median(&run));
        println!("streamed tok/s on a 3-peer mesh: OpenAI API (SSE) {a:.1}; fogmesh run {r:.1}; ratio {:.2}x", a / r);
    }

    if want("streams") {
        let m3 = mesh(&exe, &model, 3, 1, None)?;
        let chat = |i: usize| {
            serde_json::json!({ "model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{ "role": "user", "content": format!("Tell me about the number {i}.") }],
                                "max_tokens": 32, "temperature": 0, "stream": true })
        };
        let mut runs = Vec::new();
        for _ in 0..reps.min(3) {
            let (n1, s1, f1) = api_stream(&m3.peers[0].http, "/v1/chat/completions", &chat(0))?;
            let t = Instant::now();
            let hs: Vec<_> = (0..32)
                .map(|i| {
                    let http = m3.peers[i % 3].http.clone();
                    let body = chat(i);
                    std::thread::spawn(move || api_stream(&http, "/v1/chat/completions", &body))
                })
                .collect();
            let mut done = Vec::new();
            for h in hs {
                done.push(h.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
            }
            let wall = t.elapsed().as_secs_f64();
            let tokens: usize = done.iter().map(|d| d.0).sum();
            let ttft: Vec<f64> = done.iter().map(|d| d.2 * 1e3).collect();
            runs.push((done.len(), tokens as f64 / wall, median(&ttft), ttft.iter().cloned().fold(0.0, f64::max), wall, stream_rate(n1, s1), f1 * 1e3));
        }
        for (k, agg, ttft_med, ttft_max, wall, one, one_ttft) in &runs {
            println!(
                "32 concurrent streaming clients: {k}/32 completed in {wall:.1} s, aggregate {agg:.1} tok/s, first token median {ttft_med:.0} ms / max {ttft_max:.0} ms; one client alone {one:.1} tok/s, first token {one_ttft:.0} ms; aggregate/alone {:.2}x",
                agg / one
            );
        }
    }

    if want("demo") {
        // The README's main command, the crates already built: how long a new
        // user waits for the first word of the answer.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut times = Vec::new();
        for _ in 0..reps.min(3) {
            let t = Instant::now();
            let mut child = Command::new(env!("CARGO"))
                .args(["run", "--release", "-q", "--", "demo", "--max-tokens", "16"])
                .current_dir(root)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let mut out = child.stdout.take().context("stdout")?;
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            let mut first = None;
            loop {
                use std::io::Read;
                let n = out.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if first.is_none() && answer_started(&seen) {
                    first = Some(t.elapsed().as_secs_f64());
                }
            }
            let status = child.wait()?;
            anyhow::ensure!(status.success(), "the demo failed:\n{}", String::from_utf8_lossy(&seen));
            times.push(first.context("no answer in the demo's output")?);
        }
        println!("`cargo run --release -- demo` to the first answer token: median {:.1} s (all: {times:.1?})", median(&times));
    }

    if let Some(dir) = llama.filter(|_| want("llama")) {
        let m2 = mesh(&exe, &model, 2, 1, None)?;
        let story64 = flags("Once upon a time", 64);
        let (mut f, mut l) = (Vec::new(), Vec::new());
        for _ in 0..reps.min(3) {
            f.push(decode_rate(&generate_on(&m2.peers[0].http, &story64, |_| {})?.done.timings));
            l.push(llama_rpc(&dir, &model, 3)?);
        }
        let (f, l) = (median(&f), median(&l));
        println!("decode tok/s over 2 peers on loopback (1 thread each): fogmesh {f:.1}; llama.cpp RPC (2 rpc-servers) {l:.1}; ratio {:.2}x", f / l);
    }
    Ok(())
}
