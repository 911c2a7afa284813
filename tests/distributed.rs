//! The mesh as separate `fogmesh node` processes on loopback (127.0.0.1
//! only, no mDNS), on the real model (needs it: `fogmesh fetch`):
//! - greedy output over 3 peers equals the single-process output on the
//!   reference prompts, through `fogmesh run --json` (with the route);
//! - 8 concurrent sessions over 3 peers each equal their single-process output;
//! - killing the peer that holds the middle range mid-generation: the
//!   generation completes with the same tokens (prints the recovery time);
//! - clear errors: a prompt past the context, a node without a model, a
//!   missing model file, no node at the address.

mod common;

use std::process::Command;

use common::*;
use fogmesh::models::LocalModel;
use fogmesh::node::api::types::{Dashboard, GenEvent, GenFlags, Incident, PlanView};
use fogmesh::node::client::{generate_on, http_get};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_fogmesh");

fn get<T: serde::de::DeserializeOwned>(http: &str, path: &str) -> T {
    serde_json::from_str(&http_get(http, path).unwrap()).unwrap()
}




fn tokens(v: &Value) -> Vec<u32> {
    v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

#[test]
fn three_processes_equal_one_process_and_serve_eight_sessions_at_once() {
    let Some(path) = model_path() else { return };
    let local = LocalModel::load(&path, None, 1).unwrap();
    let c = lossless_cluster(BIN, Some(&path), 3, 1, &[]);
    // Greedy, through the CLI, on the reference prompts.
    for p in reference()["prompts"].as_array().unwrap() {
        let prompt = p["prompt"].as_str().unwrap();
        let f = raw_flags(prompt, 32, 0.0, 0);
        let out = Command::new(BIN)
            .args(["run", "--node", &c.peers[0].http, "--raw", "--temperature", "0", "--max-tokens", "32", "--json", "--prompt", prompt])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(tokens(&v), solo_tokens(&local, &f), "prompt {prompt:?}");
        let route = v["route"].as_array().unwrap();
        assert_eq!(route.len(), 3);
        assert_eq!(route[0]["layers"][0], 0);
        assert_eq!(route[2]["layers"][1], 30);
        assert!(route[0]["peer"].is_string());
    }
    // 8 concurrent sessions, through all three nodes, greedy and seeded.
    let prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is"];
    let jobs: Vec<(String, GenFlags)> = (0..8)
        .map(|i| (c.peers[i % 3].http.clone(), raw_flags(prompts[i % 4], 24, if i % 2 == 0 { 0.0 } else { 0.8 }, i as u64)))
        .collect();
    let handles: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|(node, f)| std::thread::spawn(move || generate_on(&node, &f, |_| {}).unwrap()))
        .collect();
    for (h, (_, f)) in handles.into_iter().zip(&jobs) {
        let r = h.join().unwrap();
        assert_eq!(r.done.tokens, solo_tokens(&local, f), "{f:?}");
    }
}

/// Three processes that each can hold the model (no `--max-memory`): the
/// plan is three whole replicas, every request runs on one of them in a
/// single hop, concurrent requests use more than one, and the tokens are
/// the single-process ones.
#[test]
fn three_processes_that_each_hold_the_model_serve_whole_replicas() {
    let Some(path) = model_path() else { return };
    let local = LocalModel::load(&path, None, 1).unwrap();
    let o = fogmesh::node::cluster::ClusterOptions::new(BIN, Some(path.clone()), 3);
    let c = fogmesh::node::cluster::LocalCluster::start(&o).unwrap();
    let plan = c.wait_plan(3, std::time::Duration::from_secs(60)).unwrap();
    assert_eq!(plan.routes.len(), 3, "{plan:?}");
    assert!(plan.routes.iter().all(|r| r.len() == 1 && r[0].layers == [0, 30]), "{plan:?}");
    let prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is"];
    let jobs: Vec<GenFlags> = (0..8).map(|i| raw_flags(prompts[i % 4], 16, 0.0, 0)).collect();
    let entry = c.peers[0].http.clone();
    // The entry learns which peers hold a range by gossip (a second or so
    // after they load it): a round may find no other holder to ask yet.
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_secs(2));
        let handles: Vec<_> = jobs
            .iter()
            .cloned()
            .map(|f| {
                let entry = entry.clone();
                std::thread::spawn(move || generate_on(&entry, &f, |_| {}).unwrap())
            })
            .collect();
        served.clear();
        for (h, f) in handles.into_iter().zip(&jobs) {
            let r = h.join().unwrap();
            assert_eq!(r.done.tokens, solo_tokens(&local, f), "{f:?}");
            assert_eq!(r.done.route.len(), 1, "one hop: {:?}", r.done.route);
            served.insert(r.done.route[0].peer.clone());
        }
        if served.len() >= 2 {
            break;
        }
    }
    assert!(served.len() >= 2, "8 concurrent requests all ran on {served:?}, three rounds running");
}

#[test]
fn killing_the_middle_peer_mid_generation_keeps_every_token() {
    let Some(path) = model_path() else { return };
    let local = LocalModel::load(&path, None, 1).unwrap();
    let mut c = lossless_cluster(BIN, Some(&path), 3, 1, &[]);
    let plan: PlanView = get(&c.peers[0].http, "/plan");
    let middle = plan.route[1].peer.clone();
    let idx = c.index_of(&middle).unwrap();
    // The session's own node (the entry) must survive: use another one.
    let f = GenFlags { max_tokens: 160, ..raw_flags("Once upon a time", 160, 0.7, 42) };
    let want = solo_tokens(&local, &f);
    let (r, gap) = c.generate_killing((idx + 1) % 3, idx, 100, &f).unwrap();
    assert_eq!(r.done.tokens, want, "same tokens after losing the middle stage");
    assert!(r.done.failovers >= 1);
    assert!(r.done.route.iter().all(|h| h.peer != middle), "the dead peer is out of the route");
    // The entry node's dashboard, its status view and its metrics show it.
    let entry = &c.peers[(idx + 1) % 3].http;
    let d: Dashboard = get(entry, "/v1/fogmesh/dashboard");
    let failed = d.incidents.iter().any(|i| matches!(i, Incident::Failover { banned, .. } if banned.first() == Some(&middle)));
    assert!(failed, "{d:?}");
    assert!(d.incidents.iter().any(|i| matches!(i, Incident::Recovered { .. })), "{d:?}");
    let view = fogmesh::node::cli::status::status_view(entry, &d, None);
    assert!(view.contains("recent failovers:") && view.contains("recovered in"), "{view}");
    let m = http_get(entry, "/metrics").unwrap();
    assert!(m.contains("fogmesh_failovers_total") && m.contains("fogmesh_failover_recovery_seconds_count"), "{m}");
    println!(
        "recovery: {:?} from the kill to the next token; session's own measure {:?}",
        gap,
        r.incidents
            .iter()
            .filter_map(|i| match i {
                GenEvent::Recovered { recovery_ms, .. } => Some(*recovery_ms),
                _ => None,
            })
            .collect::<Vec<_>>()
    );
}

#[test]
fn bad_input_ends_in_clear_errors() {
    let Some(path) = model_path() else { return };
    // A missing model file.
    let out = Command::new(BIN).args(["node", "--model", "/nonexistent/model.gguf", "--http", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    // A node with the model, and one without.
    let with = lossless_cluster(BIN, Some(&path), 1, 1, &[]);
    let without = lossless_cluster(BIN, None, 1, 1, &[]);
    let (http, http2) = (with.peers[0].http.clone(), without.peers[0].http.clone());
    let long = "word ".repeat(9000);
    let err = generate_on(&http, &raw_flags(&long, 8, 0.0, 0), |_| {}).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
    let err = generate_on(&http, &GenFlags { max_tokens: 1 << 20, ..raw_flags("hi", 8, 0.0, 0) }, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_tokens"), "{err}");
    let err = generate_on(&http2, &raw_flags("hi", 8, 0.0, 0), |_| {}).unwrap_err().to_string();
    assert!(err.contains("serves no model"), "{err}");
    let bad = http_get(&http, "/plan").unwrap();
    assert!(bad.contains("route"));
    // Malformed request bodies.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    for body in ["{", "{\"prompt\": 5}", "{\"prompt\":\"x\",\"bogus\":1}"] {
        let r = agent.post(&format!("http://{http}/v1/fogmesh/generate")).send(body).unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }
    // Nobody at the address.
    let out = Command::new(BIN).args(["run", "--node", "127.0.0.1:9", "--prompt", "hi"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no fogmesh node answered"));
    // The node still serves after all that.
    let ok = generate_on(&http, &raw_flags("The capital of France is", 4, 0.0, 0), |_| {}).unwrap();
    assert_eq!(ok.done.tokens.len(), 4);
}
