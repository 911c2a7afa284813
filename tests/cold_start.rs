//! Cold start on loopback: `fogmesh node` processes without the model file
//! (`--model sha256:HEX`, each with a home of its own, so the catalogue's
//! copy is not found) fetch only their layers' chunks from the peers that
//! hold them (needs the default model: `fogmesh fetch`):
//! - one holder and three fetchers, memory capped so that the model must be
//!   split: a generation entered at the last fetcher goes through at least
//!   three hosts with the single-process tokens; each fetcher fetched less
//!   than the file (its metrics);
//! - a holder that damages every chunk it sends is banned for the model and
//!   the chunks come from the honest one; same tokens;
//! - the only holder killed mid-fetch and started again: the fetch resumes
//!   where it stopped (nothing fetched twice); the fetcher started again
//!   serves from its chunk cache, fetching nothing;
//! - bad input: an unknown model hash, a manifest that does not match the
//!   model, a cache directory that cannot be written: clear errors in
//!   `/status`, and the node keeps running.
//!
//! The same with network namespaces and rate-limited links is the cold-start
//! benchmark (BENCHMARKS.md).

mod common;

use std::time::{Duration, Instant};

use common::*;
use fogmesh::actors::weights::WeightsStatus;
use fogmesh::models::LocalModel;
use fogmesh::node::api::types::NodeStatus;
use fogmesh::node::client::{generate_on, http_get};
use fogmesh::node::cluster::{ClusterOptions, LocalCluster};

const BIN: &str = env!("CARGO_BIN_EXE_fogmesh");

fn sha(path: &std::path::Path) -> String {
    fogmesh::protocols::hex(&fogmesh::protocols::sha256(&std::fs::read(path).unwrap()))
}

fn weights(http: &str) -> WeightsStatus {
    let st: NodeStatus = serde_json::from_str(&http_get(http, "/status").unwrap()).unwrap();
    st.weights.unwrap_or_default()
}

fn metric(http: &str, name: &str) -> u64 {
    let text = http_get(http, "/metrics").unwrap();
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0) as u64
}

/// Waits until `ok` holds for peer `http`'s weights, or fails with them.
fn wait_weights(http: &str, what: &str, wait: Duration, ok: impl Fn(&WeightsStatus) -> bool) -> WeightsStatus {
    let until = Instant::now() + wait;
    loop {
        let w = weights(http);
        if ok(&w) {
            return w;
        }
        assert!(Instant::now() < until, "{what} not seen after {wait:?}: {w:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Peer `i` of a cluster: the file (`holds`), or the model by hash with a
/// home of its own.
fn setup(o: &mut ClusterOptions, dir: &std::path::Path, hash: &str, holds: &[bool], extra: &[&[&str]], env: &[&[(&str, &str)]]) {
    for (i, &h) in holds.iter().enumerate() {
        let mut args: Vec<String> = extra.get(i).map(|e| e.iter().map(|s| s.to_string()).collect()).unwrap_or_default();
        let mut vars: Vec<(String, String)> = env.get(i).map(|e| e.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap_or_default();
        if !h {
            if !args.iter().any(|a| a == "--model") {
                args.extend(["--model".to_string(), format!("sha256:{hash}")]);
            }
            let home = dir.join(format!("home{i}"));
            std::fs::create_dir_all(&home).unwrap();
            vars.push(("FOGMESH_HOME".into(), home.display().to_string()));
        }
        o.peer_args.push(args);
        o.peer_env.push(vars);
    }
}

#[test]
fn hosts_without_the_file_fetch_their_layers_from_peers_and_give_the_same_tokens() {
    let Some(path) = model_path() else { return };
    let hash = sha(&path);
    let file = std::fs::metadata(&path).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let mut o = ClusterOptions::new(BIN, Some(path.clone()), 4);
    o.activations = Some("lossless".into());
    // 80 % of the file offered (60 % for weights): no host holds it all.
    o.max_memory = Some(file * 8 / 10);
    setup(&mut o, dir.path(), &hash, &[true, false, false, false], &[], &[]);
    let c = LocalCluster::start(&o).unwrap();
    let plan = c.wait_plan(4, Duration::from_secs(90)).unwrap();
    assert_eq!(plan.route.len(), 4, "{plan:?}");
    let local = LocalModel::load(&path, None, 1).unwrap();
    let f = raw_flags("The capital of France is", 24, 0.0, 0);
    let run = generate_on(&c.peers[3].http, &f, |_| {}).unwrap();
    assert_eq!(run.done.tokens, solo_tokens(&local, &f));
    let hosts: std::collections::BTreeSet<&str> = run.done.route.iter().map(|h| h.peer.as_str()).collect();
    assert!(hosts.len() >= 3, "{:?}", run.done.route);
    for i in 1..4 {
        let fetched = metric(&c.peers[i].http, "fogmesh_weight_bytes_fetched_total");
        let w = weights(&c.peers[i].http);
        assert!(fetched > 0 && fetched < file, "peer {i} fetched {fetched} of {file} bytes");
        assert_eq!(fetched, w.fetched_bytes);
        let f = w.fetch.unwrap();
        assert_eq!(f.state, "ready");
        assert_eq!(f.bytes_held, fetched, "nothing fetched twice");
        assert_eq!(f.rejected, 0);
        eprintln!("peer {i}: fetched {:.1} MiB of {:.1} MiB from {} peers", fetched as f64 / 1048576.0, file as f64 / 1048576.0, f.peers);
    }
    assert!(metric(&c.peers[0].http, "fogmesh_weight_bytes_served_total") > 0);
}

#[test]
fn a_peer_serving_damaged_chunks_is_banned_and_the_chunks_come_from_another() {
    let Some(path) = model_path() else { return };
    let hash = sha(&path);
    let file = std::fs::metadata(&path).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let mut o = ClusterOptions::new(BIN, Some(path.clone()), 3);
    o.activations = Some("lossless".into());
    o.max_memory = Some(file * 8 / 10);
    setup(&mut o, dir.path(), &hash, &[true, true, false], &[], &[&[], &[("FOGMESH_TEST_CORRUPT_CHUNKS", "1")]]);
    let c = LocalCluster::start(&o).unwrap();
    c.wait_plan(3, Duration::from_secs(90)).unwrap();
    let w = weights(&c.peers[2].http);
    assert_eq!(w.banned, vec![c.peers[1].peer_id.clone()], "{w:?}");
    assert!(w.fetch.as_ref().unwrap().rejected >= 1);
    assert_eq!(w.fetch.as_ref().unwrap().bytes_held, w.fetched_bytes, "a damaged chunk is never kept");
    let local = LocalModel::load(&path, None, 1).unwrap();
    let f = raw_flags("Once upon a time", 16, 0.0, 0);
    assert_eq!(generate_on(&c.peers[2].http, &f, |_| {}).unwrap().done.tokens, solo_tokens(&local, &f));
}

#[test]
fn a_fetch_resumes_where_it_stopped_when_its_only_holder_comes_back() {
    let Some(path) = model_path() else { return };
    let hash = sha(&path);
    let file = std::fs::metadata(&path).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let mut o = ClusterOptions::new(BIN, Some(path.clone()), 2);
    o.activations = Some("lossless".into());
    // 75 % of the file for weights: a split over both.
    o.max_memory = Some(file);
    // The holder uploads at 8 MiB/s: the fetch takes seconds. Both
    // announce a fixed speed: a probe on a busy host reads it as slow, and
    // the cut would move with each start's reading.
    setup(&mut o, dir.path(), &hash, &[true, false], &[&["--upload-rate", "8MiB", "--gflops", "40"], &["--gflops", "40"]], &[]);
    let mut c = LocalCluster::start(&o).unwrap();
    let fetcher = c.peers[1].http.clone();
    let before = wait_weights(&fetcher, "a fetch under way", Duration::from_secs(60), |w| {
        w.fetch.as_ref().is_some_and(|f| f.state == "fetching" && f.bytes_done > 4 << 20)
    });
    c.kill(0);
    let stopped = weights(&fetcher).fetched_bytes;
    assert!(stopped >= before.fetched_bytes);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(weights(&fetcher).fetch.unwrap().state, "fetching", "the fetch waits for a holder");
    c.restart(0).unwrap();
    let done = wait_weights(&fetcher, "the fetch done", Duration::from_secs(90), |w| w.fetch.as_ref().is_some_and(|f| f.state == "ready"));
    let f = done.fetch.unwrap();
    assert_eq!(f.bytes_held, done.fetched_bytes, "no chunk fetched twice");
    assert!(done.fetched_bytes > stopped, "the rest came after the restart");
    c.wait_plan(2, Duration::from_secs(60)).unwrap();
    let local = LocalModel::load(&path, None, 1).unwrap();
    let f = raw_flags("def fibonacci(n):", 12, 0.0, 0);
    assert_eq!(generate_on(&fetcher, &f, |_| {}).unwrap().done.tokens, solo_tokens(&local, &f));
    // The fetcher started again finds its chunks in its cache and serves
    // its layers having fetched nothing (the same speeds give the same
    // cut; the chunks it holds keep it there).
    c.restart(1).unwrap();
    c.wait_plan(2, Duration::from_secs(60)).unwrap();
    let again = weights(&c.peers[1].http);
    assert_eq!(again.fetched_bytes, 0, "{again:?}");
    assert!(again.cache_bytes >= done.fetched_bytes);
    assert_eq!(generate_on(&c.peers[1].http, &f, |_| {}).unwrap().done.tokens, solo_tokens(&local, &f));
}

#[test]
fn an_unknown_model_a_false_manifest_and_an_unwritable_cache_are_clear_errors() {
    let Some(path) = model_path() else { return };
    let hash = sha(&path);
    let dir = tempfile::tempdir().unwrap();
    let mut o = ClusterOptions::new(BIN, Some(path.clone()), 4);
    let unknown = format!("sha256:{}", "0".repeat(64));
    setup(
        &mut o,
        dir.path(),
        &hash,
        &[true, false, false, false],
        &[&[], &[], &["--model", &unknown], &["--chunk-dir", "/proc/fogmesh-chunks"]],
        // The holder sends a manifest that is not the model's.
        &[&[("FOGMESH_TEST_CORRUPT_CHUNKS", "manifest")]],
    );
    let c = LocalCluster::start(&o).unwrap();
    let false_manifest = wait_weights(&c.peers[1].http, "the false manifest refused", Duration::from_secs(30), |w| {
        w.fetch.as_ref().and_then(|f| f.error.as_deref()).is_some_and(|e| e.contains("does not match"))
    });
    assert_eq!(false_manifest.banned, vec![c.peers[0].peer_id.clone()]);
    assert_eq!(false_manifest.fetched_bytes, 0, "nothing fetched against a false manifest");
    let unwritable = wait_weights(&c.peers[3].http, "the cache error", Duration::from_secs(30), |w| w.fetch.as_ref().is_some_and(|f| f.state == "failed"));
    let e = unwritable.fetch.unwrap().error.unwrap();
    assert!(e.contains("/proc/fogmesh-chunks") && e.contains("not writable"), "{e}");
    let none = wait_weights(&c.peers[2].http, "the unknown model", Duration::from_secs(40), |w| {
        w.fetch.as_ref().and_then(|f| f.error.as_deref()).is_some_and(|e| e.contains("no peer in the mesh holds model"))
    });
    assert_eq!(none.fetch.unwrap().state, "waiting");
    // All of them still answer.
    for p in &c.peers {
        assert!(http_get(&p.http, "/health").unwrap().contains(r#""status":"ok""#));
    }
}
