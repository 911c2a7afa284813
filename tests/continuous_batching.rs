//! Continuous batching through real `fogmesh node` processes on loopback,
//! on the default model (needs it: `fogmesh fetch`):
//! - 32 concurrent sessions (greedy and seeded, prompts of mixed lengths)
//!   over 1 and over 3 peers each equal their single-process run, while
//!   passes carry several sessions at once;
//! - a ~2000-token prompt arriving while 8 sessions decode does not stall
//!   them: their longest gap between tokens stays within a bound derived
//!   from the prompt chunk, far below the prompt's own prefill time;
//! - a request sharing a long system prompt with an earlier one of the same
//!   owner reuses its keys and values on every stage (metrics) and gives the
//!   same tokens; another owner's request does not;
//! - a bound no stage could ever hold is cut to what it can: the session
//!   ends there ("length") with the solo run's first tokens;
//! - KV budget: sessions past it wait for room (or get 429 with
//!   `Retry-After` when told not to wait); none is evicted, none lost, and
//!   the caches stay within the budget.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fogmesh::models::LocalModel;
use fogmesh::node::api::types::{GenEvent, GenFlags};
use fogmesh::node::client::{generate_on, http_get};
use fogmesh::node::cluster::LocalCluster;

const BIN: &str = env!("CARGO_BIN_EXE_fogmesh");




/// A metric's value summed over its series in `/metrics`.
fn metric(http: &str, name: &str) -> f64 {
    let m = http_get(http, "/metrics").unwrap();
    m.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Prompts of mixed lengths, from a few tokens to a few hundred.
fn prompt(i: usize) -> String {
    let base = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is"][i % 4];
    match i % 8 {
        3 => format!("{} {base}", "In a quiet village by the sea, the fishermen rose early every day. ".repeat(12)),
        6 => format!("{} {base}", "Numbers: one two three four five six seven eight nine ten. ".repeat(4)),
        _ => base.to_string(),
    }
}

#[test]
fn thirty_two_concurrent_sessions_each_equal_their_solo_run_on_one_and_three_peers() {
    let Some(path) = model_path() else { return };
    let local = LocalModel::load(&path, None, 2).unwrap();
    let jobs: Vec<GenFlags> =
        (0..32).map(|i| raw_flags(&prompt(i), 12 + i % 5, if i % 2 == 0 { 0.0 } else { 0.8 }, 100 + i as u64)).collect();
    let want: Vec<Vec<u32>> = jobs.iter().map(|f| solo_tokens(&local, f)).collect();
    for (n, threads) in [(1, 2), (3, 1)] {
        let c = lossless_cluster(BIN, Some(&path), n, threads, &[]);
        let handles: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let (node, f) = (c.peers[i % n].http.clone(), f.clone());
                std::thread::spawn(move || generate_on(&node, &f, |_| {}).unwrap())
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap().done.tokens, want[i], "{n} peers, session {i}: {:?}", jobs[i]);
        }
        // Passes carried several sessions at once, on every stage.
        for p in &c.peers {
            let (sessions, passes) = (metric(&p.http, "fogmesh_stage_batch_sessions_sum"), metric(&p.http, "fogmesh_stage_batch_sessions_count"));
            assert!(passes > 0.0 && sessions / passes > 1.5, "{n} peers: {sessions} session steps in {passes} passes at {}", p.http);
        }
    }
}

#[test]
fn a_long_prompt_arriving_does_not_stall_sessions_that_decode() {
    let Some(path) = model_path() else { return };
    let c = lossless_cluster(BIN, Some(&path), 1, 2, &[]);
    let node = c.peers[0].http.clone();
    let started = Instant::now();
    // Eight sessions decoding: each records when each piece of text came.
    let decoders: Vec<_> = (0..8)
        .map(|i| {
            let (node, f) = (node.clone(), raw_flags(["Once upon a time", "The history of", "In the year", "My favourite"][i % 4], 400, 0.8, i as u64));
            std::thread::spawn(move || {
                let mut times = Vec::new();
                generate_on(&node, &f, |_| times.push(Instant::now())).unwrap();
                times
            })
        })
        .collect();
    // Once they are all under way, a prompt of about 2000 tokens comes.
    while metric(&node, "fogmesh_stage_tokens_total") < 8.0 * 12.0 {
        assert!(started.elapsed() < Duration::from_secs(60), "the decoders never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    let long = raw_flags(&"The quick brown fox jumps over the lazy dog while the cat sleeps. ".repeat(140), 1, 0.0, 0);
    let t0 = Instant::now();
    let r = generate_on(&node, &long, |_| {}).unwrap();
    let prefill = t0.elapsed();
    let chunks = r.done.prompt_tokens.len().div_ceil(64);
    assert!(r.done.prompt_tokens.len() >= 1800, "{} prompt tokens", r.done.prompt_tokens.len());
    // Unbatched, a decoder would wait out the whole prefill; batched, about
    // one chunk's pass at a time. Allow four chunks' worth and some noise.
    let bound = prefill * 4 / chunks as u32 + Duration::from_millis(300);
    let mut spanned = 0;
    for (i, d) in decoders.into_iter().enumerate() {
        let times = d.join().unwrap();
        // The window: the prefill, or as much of it as the decoder lived.
        let Some(&last) = times.last() else { continue };
        let end = (t0 + prefill).min(last);
        if end <= t0 {
            continue;
        }
        if last > t0 + prefill {
            spanned += 1;
        }
        let mut edges = vec![t0];
        edges.extend(times.iter().copied().filter(|t| *t > t0 && *t <= end));
        edges.push(end);
        let worst = edges.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(worst <= bound, "decoder {i}: a gap of {worst:?} while a {chunks}-chunk prompt took {prefill:?} (bound {bound:?})");
    }
    assert!(spanned >= 4, "only {spanned} decoders were still going during the whole prefill");
    eprintln!("prefill of {chunks} chunks took {prefill:?}; bound on a decoder's gap {bound:?}");
}

#[test]
fn a_shared_system_prompt_is_reused_on_every_stage_with_the_same_tokens() {
    let Some(path) = model_path() else { return };
    let local = LocalModel::load(&path, None, 2).unwrap();
    let system = "You are a careful assistant. Answer in full sentences, cite what you know, and say when you are unsure. ".repeat(6);
    let jobs: Vec<GenFlags> = ["What is the capital of France?", "Name three rivers in Europe."]
        .iter()
        .enumerate()
        .map(|(i, q)| raw_flags(&format!("{system}\nQuestion: {q}\nAnswer:"), 16, if i == 0 { 0.0 } else { 0.7 }, 7))
        .collect();
    let c = lossless_cluster(BIN, Some(&path), 3, 1, &[]);
    let entry = &c.peers[0].http;
    for f in &jobs {
        assert_eq!(generate_on(entry, f, |_| {}).unwrap().done.tokens, solo_tokens(&local, f));
    }
    // The second request's shared part came from every stage's prefix cache.
    let shared = local.tokenizer().encode(&system).unwrap().len();
    let reused = metric(entry, "fogmesh_prefix_tokens_reused_total");
    assert!(reused >= shared as f64 - 2.0, "{reused} tokens reused of a {shared}-token shared prompt");
    for p in &c.peers {
        assert!(metric(&p.http, "fogmesh_prefix_hits_total") >= 1.0, "no prefix hit at {}", p.http);
        assert!(metric(&p.http, "fogmesh_prefix_cache_bytes") > 0.0);
    }
    // Another owner (a request entering at another peer) is not served the
    // first owner's prefixes: what is cached is nobody else's business.
    let second = &c.peers[1].http;
    assert_eq!(generate_on(second, &jobs[1], |_| {}).unwrap().done.tokens, solo_tokens(&local, &jobs[1]));
    assert_eq!(metric(second, "fogmesh_prefix_tokens_reused_total"), 0.0);
    // A request sharing nothing reuses nothing more, and is still right.
    let other = raw_flags("Completely different words here", 8, 0.0, 0);
    assert_eq!(generate_on(entry, &other, |_| {}).unwrap().done.tokens, solo_tokens(&local, &other));
    assert_eq!(metric(entry, "fogmesh_prefix_tokens_reused_total"), reused);
}

#[test]
fn past_the_kv_budget_sessions_wait_or_get_429_and_none_is_evicted() {
    let Some(path) = model_path() else { return };
    let local = LocalModel::load(&path, None, 2).unwrap();
    let jobs: Vec<GenFlags> = (0..8).map(|i| raw_flags(&prompt(i % 3), 24, 0.0, i as u64)).collect();
    let want: Vec<Vec<u32>> = jobs.iter().map(|f| solo_tokens(&local, f)).collect();
    // Each session reserves about 30 tokens x 46 KiB; the budget holds three.
    let budget: f64 = 4.5 * 1024.0 * 1024.0;
    let run = |c: &LocalCluster| -> Vec<Result<Vec<u32>, String>> {
        let node = c.peers[0].http.clone();
        let handles: Vec<_> = jobs
            .iter()
            .map(|f| {
                let (node, f) = (node.clone(), f.clone());
                std::thread::spawn(move || post(&node, &f))
            })
            .collect();
        // Meanwhile the caches never pass the budget.
        let mut peak: f64 = 0.0;
        while !handles.iter().all(|h| h.is_finished()) {
            peak = peak.max(metric(&node, "fogmesh_kv_cache_bytes"));
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(peak <= budget, "KV caches held {peak} bytes, past the budget of {budget}");
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    // Waiting: every session runs in its turn, with its solo tokens.
    let c = lossless_cluster(BIN, Some(&path), 1, 2, &["--kv-budget", "4.5MiB"]);
    for (i, r) in run(&c).into_iter().enumerate() {
        assert_eq!(r.unwrap(), want[i], "session {i}");
    }
    drop(c);
    // Not waiting: those that found no room get 429 with Retry-After; the
    // others finish with their solo tokens; none fails another way.
    let c = lossless_cluster(BIN, Some(&path), 1, 2, &["--kv-budget", "4.5MiB", "--queue-wait-secs", "0"]);
    let out = run(&c);
    let refused = out.iter().filter(|r| r.is_err()).count();
    assert!(refused >= 1, "{out:?}");
    for (i, r) in out.iter().enumerate() {
        match r {
            Ok(t) => assert_eq!(t, &want[i], "session {i}"),
            Err(e) => assert!(e.starts_with("429 retry-after=Some(") && e.contains("no room"), "session {i}: {e}"),
        }
    }
}

#[test]
fn a_bound_past_what_a_stage_can_ever_hold_is_cut_to_it() {
    let Some(path) = model_path() else { return };
    let local = LocalModel::load(&path, None, 2).unwrap();
    // 2 MiB of KV holds ~45 positions of SmolLM2 (46 KiB each): a session
    // asking for 120 gets 45 and ends there with its first tokens.
    let c = lossless_cluster(BIN, Some(&path), 1, 2, &["--kv-budget", "2MiB"]);
    let f = raw_flags("Once upon a time", 120, 0.0, 0);
    let r = generate_on(&c.peers[0].http, &f, |_| {}).unwrap();
    let prompt = f.prompt_tokens(local.tokenizer()).unwrap().len();
    let room = (2 << 20) / (30 * 2 * 192 * 4);
    assert_eq!(r.done.finish_reason, fogmesh::models::FinishReason::Length);
    assert_eq!(r.done.tokens.len(), room - prompt, "{:?}", r.done);
    assert_eq!(r.done.tokens, solo_tokens(&local, &f)[..room - prompt]);
}

/// Posts `f` to the node's generate endpoint: its tokens, or the refusal
/// with its status and `Retry-After`.
fn post(node: &str, f: &GenFlags) -> Result<Vec<u32>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let resp = agent
        .post(&format!("http://{node}/v1/fogmesh/generate"))
        .header("content-type", "application/json")
        .send(serde_json::to_string(f).unwrap().as_bytes())
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_string());
    let body = resp.into_body().read_to_string().map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status} retry-after={retry:?} {body}"));
    }
    for line in body.lines() {
        if let Ok(GenEvent::Done(d)) = serde_json::from_str::<GenEvent>(line) {
            return Ok(d.tokens);
        }
    }
    Err(format!("no result in {body}"))
}
