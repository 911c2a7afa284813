//! The OpenAI-compatible API and the dashboard of a 3-peer mesh of
//! `fogmesh node` processes on loopback, on the real model (needs it:
//! `fogmesh fetch`):
//! - chat and completions, streamed and not, give the single-process text
//!   for the same prompt, sampling and seed, and the `fogmesh run` text;
//! - the official `openai` Python client and curl work unchanged (they are
//!   skipped when absent locally; under CI (`CI` set) their absence fails);
//! - bad input gets a 4xx with a message, a client that disconnects
//!   mid-stream cancels its session, and the node keeps serving;
//! - 32 concurrent streaming clients all complete;
//! - `/metrics` reports requests, tokens, per-stage histograms, peers and
//!   wire bytes per encoding;
//! - the dashboard in headless Chromium (Debian's `chromium`, driven over
//!   the DevTools protocol): the peers show, a prompt streams tokens, and a
//!   screenshot is saved (`target/tmp/dashboard.png`).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fogmesh::models::{ChatMessage, LocalModel, SamplingParams};
use fogmesh::node::api::types::GenFlags;
use fogmesh::node::cluster::{ClusterOptions, LocalCluster};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_fogmesh");
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

fn cluster(path: &Path) -> LocalCluster {
    // Lossless: the answers are compared with the single-process ones; no
    // peer holds the whole model, so requests cross a pipeline.
    let o = ClusterOptions {
        activations: Some("lossless".into()),
        max_memory: Some(split_offer(path)),
        ..ClusterOptions::new(BIN, Some(path.to_path_buf()), 3)
    };
    let c = LocalCluster::start(&o).unwrap();
    c.wait_plan(3, Duration::from_secs(60)).unwrap();
    c
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// POSTs `body` (raw bytes) to `path`; the status and the body text.
fn post_raw(http: &str, path: &str, body: &[u8]) -> (u16, String) {
    let url = format!("http://{http}{path}");
    match agent().post(&url).header("content-type", "application/json").send(body) {
        Ok(mut r) => {
            let status = r.status().as_u16();
            (status, r.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default())
        }
        Err(e) => panic!("POST {path}: {e}"),
    }
}

fn post(http: &str, path: &str, body: &Value) -> (u16, Value) {
    let (s, text) = post_raw(http, path, body.to_string().as_bytes());
    (s, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} answered non-JSON ({e}): {text}")))
}

fn get(http: &str, path: &str) -> (u16, String) {
    let mut r = agent().get(&format!("http://{http}{path}")).call().unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

/// The streamed text of an SSE answer, checking its framing; the chunks.
fn sse_text(body: &str) -> (String, Vec<Value>) {
    assert!(body.ends_with("data: [DONE]\n\n"), "no [DONE] at the end: {body}");
    let mut text = String::new();
    let mut chunks = Vec::new();
    for ev in body.split("\n\n").filter(|e| !e.is_empty()) {
        let data = ev.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data event: {ev:?}"));
        if data == "[DONE]" {
            continue;
        }
        let c: Value = serde_json::from_str(data).unwrap();
        assert!(c.get("error").is_none(), "error in the stream: {c}");
        if let Some(ch) = c["choices"].get(0) {
            text.push_str(ch["delta"]["content"].as_str().or(ch["text"].as_str()).unwrap_or(""));
        }
        chunks.push(c);
    }
    (text, chunks)
}

fn sampling(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, seed, ..GenFlags::default().sampling() }
}

fn python_has_openai() -> bool {
    Command::new("python3").args(["-c", "import openai"]).status().is_ok_and(|s| s.success())
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Under CI a missing tool fails; locally it skips, loudly.
fn required(tool: &str, present: bool) -> bool {
    if !present {
        assert!(std::env::var_os("CI").is_none(), "CI must install {tool} (see .ci/run)");
        eprintln!("SKIPPED part: {tool} is not installed");
    }
    present
}

#[test]
fn openai_api_over_three_peers() {
    let Some(path) = model_path() else { return };
    let local = LocalModel::load(&path, None, 1).unwrap();
    let c = cluster(&path);
    let http = c.peers[0].http.clone();

    // /v1/models and /health.
    let (s, models) = get(&http, "/v1/models");
    assert_eq!(s, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    let (s, health) = get(&http, "/health");
    assert_eq!(s, 200, "{health}");

    // Chat, seeded sampling: the single-process text, streamed and not, and
    // the same as `fogmesh run`.
    let question = "What is the capital of France?";
    let msgs = [ChatMessage::new("user", question)];
    let tok = local.tokenizer();
    let prompt = tok.encode(&tok.apply_chat_template(&msgs).unwrap()).unwrap();
    let want = local.generate(prompt.clone(), 24, sampling(0.8, 7), vec![], 0, |_| {}).unwrap();
    let body = json!({ "model": MODEL, "messages": [{ "role": "user", "content": question }], "max_tokens": 24,
                       "temperature": 0.8, "seed": 7 });
    let (s, v) = post(&http, "/v1/chat/completions", &body);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.text.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], want.tokens.len());
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let (s, text) = post_raw(&http, "/v1/chat/completions", streamed.to_string().as_bytes());
    assert_eq!(s, 200, "{text}");
    let (got, chunks) = sse_text(&text);
    assert_eq!(got, want.text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.len() > 3, "tokens arrive one chunk at a time");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], want.tokens.len());
    let out = Command::new(BIN)
        .args(["run", "--node", &http, "--json", "--max-tokens", "24", "--temperature", "0.8", "--seed", "7", "--prompt", question])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["text"], want.text.as_str());

    // Log-probabilities of the chosen tokens, whole and streamed: one per
    // generated token, the same both ways, never above 0.
    let body = json!({ "model": MODEL, "messages": [{ "role": "user", "content": question }], "max_tokens": 12,
                       "temperature": 0, "logprobs": true });
    let (s, v) = post(&http, "/v1/chat/completions", &body);
    assert_eq!(s, 200, "{v}");
    let whole: Vec<Value> = v["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(whole.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap(), "{v}");
    assert!(whole.iter().all(|e| e["logprob"].as_f64().unwrap() <= 0.0 && e["token"].is_string()), "{v}");
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (_, text) = post_raw(&http, "/v1/chat/completions", sb.to_string().as_bytes());
    let streamed: Vec<Value> = sse_text(&text)
        .1
        .iter()
        .flat_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(streamed, whole);

    // Completions, greedy, text and token-id prompts, through another node.
    let raw = "The capital of France is";
    let ids = tok.encode(raw).unwrap();
    let want = local.generate(ids.clone(), 12, sampling(0.0, 0), vec![], 0, |_| {}).unwrap();
    for prompt in [json!(raw), json!(ids), json!([raw])] {
        let body = json!({ "model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0 });
        let (s, v) = post(&c.peers[1].http, "/v1/completions", &body);
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], want.text.as_str());
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    let body = json!({ "model": MODEL, "prompt": raw, "max_tokens": 12, "temperature": 0, "stream": true });
    let (s, text) = post_raw(&c.peers[2].http, "/v1/completions", body.to_string().as_bytes());
    assert_eq!(s, 200);
    assert_eq!(sse_text(&text).0, want.text);
    // A stop string ends the answer before it.
    let body = json!({ "model": MODEL, "prompt": raw, "max_tokens": 12, "temperature": 0, "stop": "." });
    let (_, v) = post(&http, "/v1/completions", &body);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(!v["choices"][0]["text"].as_str().unwrap().contains('.'), "{v}");

    // The official Python client, unchanged.
    if required("the openai Python package", python_has_openai()) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/openai_client.py");
        let out = Command::new("python3").args([script, &format!("http://{http}/v1"), MODEL]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["chat"], v["chat_stream"], "{v}");
        assert_eq!(v["chat"], local.generate(prompt.clone(), 16, sampling(0.0, 0), vec![], 0, |_| {}).unwrap().text.as_str());
        assert_eq!(v["completion"], want.text.as_str());
        assert_eq!(v["not_found"], 404);
        assert_eq!(v["bad_request"], 400);
        assert_eq!(v["logprobs"], 4, "one log-probability per token through the client's types");
    }

    // curl, streamed and not.
    if required("curl", have("curl")) {
        let url = format!("http://{http}/v1/chat/completions");
        let body = json!({ "model": MODEL, "messages": [{ "role": "user", "content": question }], "max_tokens": 8, "temperature": 0 });
        let out = Command::new("curl").args(["-sS", "--fail-with-body", &url, "-H", "Content-Type: application/json", "-d", &body.to_string()]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let greedy8 = local.generate(prompt.clone(), 8, sampling(0.0, 0), vec![], 0, |_| {}).unwrap().text;
        assert_eq!(v["choices"][0]["message"]["content"], greedy8.as_str());
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let out = Command::new("curl").args(["-sSN", "--fail-with-body", &url, "-H", "Content-Type: application/json", "-d", &sb.to_string()]).output().unwrap();
        assert!(out.status.success());
        assert_eq!(sse_text(&String::from_utf8_lossy(&out.stdout)).0, greedy8);
    }

    bad_input(&http);
    disconnect_mid_stream(&http);
    thirty_two_streams(&c);

    // Metrics after all that, on the node that owned the sessions (and,
    // for activations sent on, on any node: the last stage sends none).
    let (s, m) = get(&http, "/metrics");
    assert_eq!(s, 200);
    let logs = || (0..3).map(|i| c.log_tail(i)).collect::<Vec<_>>().join("\n----\n");
    assert!(!m.contains("fogmesh_failovers_total"), "a healthy mesh failed over:\n{m}\n{}", logs());
    let all: String = c.peers.iter().map(|p| get(&p.http, "/metrics").1).collect();
    assert!(all.contains("fogmesh_wire_bytes_total{encoding=\"f32\"}"), "{all}");
    assert!(all.contains("fogmesh_link_sent_bytes{peer="), "each link's traffic is measured: {all}");
    for needle in [
        "fogmesh_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
        "fogmesh_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"}",
        "fogmesh_generated_tokens_total",
        "fogmesh_prompt_tokens_total",
        "fogmesh_stage_forward_seconds_bucket{layers=",
        "fogmesh_time_to_first_token_seconds_bucket",
        "fogmesh_peers_connected 2",
        "fogmesh_sessions_total{outcome=\"done\"}",
    ] {
        assert!(m.contains(needle), "/metrics lacks {needle}:\n{m}");
    }
}

/// Bad requests: a 4xx in OpenAI's shape naming the problem; never a 500.
fn bad_input(http: &str) {
    let chat = "/v1/chat/completions";
    let user = json!([{ "role": "user", "content": "hi" }]);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (chat, b"{not json".to_vec(), 400, "invalid JSON"),
        (chat, b"".to_vec(), 400, "empty"),
        (chat, b"[1,2]".to_vec(), 400, "invalid request"),
        (chat, json!({ "model": MODEL }).to_string().into_bytes(), 400, "messages"),
        (chat, json!({ "messages": user }).to_string().into_bytes(), 400, "model"),
        (chat, json!({ "model": MODEL, "messages": "hi" }).to_string().into_bytes(), 400, "invalid type"),
        (chat, json!({ "model": MODEL, "messages": user, "temperature": "hot" }).to_string().into_bytes(), 400, "invalid type"),
        (chat, json!({ "model": MODEL, "messages": user, "temperature": 9 }).to_string().into_bytes(), 400, "temperature"),
        (chat, json!({ "model": MODEL, "messages": user, "max_tokens": -1 }).to_string().into_bytes(), 400, "invalid value"),
        (chat, json!({ "model": MODEL, "messages": user, "max_tokens": 100000 }).to_string().into_bytes(), 400, "context"),
        (chat, json!({ "model": MODEL, "messages": user, "n": 2 }).to_string().into_bytes(), 400, "n = 1"),
        (chat, json!({ "model": MODEL, "messages": [{ "role": "wizard", "content": "x" }] }).to_string().into_bytes(), 400, "role"),
        (chat, json!({ "model": MODEL, "messages": [] }).to_string().into_bytes(), 400, "messages"),
        (chat, json!({ "model": "gpt-9", "messages": user }).to_string().into_bytes(), 404, "not served"),
        (chat, json!({ "model": MODEL, "messages": [{ "role": "user", "content": "x".repeat(60_000) }] }).to_string().into_bytes(), 400, "context"),
        (chat, json!({ "model": MODEL, "messages": user, "logprobs": "yes" }).to_string().into_bytes(), 400, "true or false"),
        (chat, json!({ "model": MODEL, "messages": user, "logprobs": true, "top_logprobs": 3 }).to_string().into_bytes(), 400, "top_logprobs"),
        ("/v1/completions", json!({ "model": MODEL, "prompt": "x", "logprobs": 5 }).to_string().into_bytes(), 400, "logprobs"),
        ("/v1/completions", json!({ "model": MODEL, "prompt": [999_999] }).to_string().into_bytes(), 400, "vocabulary"),
        ("/v1/completions", json!({ "model": MODEL, "prompt": ["a", "b"] }).to_string().into_bytes(), 400, "one prompt"),
        ("/v1/completions", json!({ "model": MODEL, "prompt": "" }).to_string().into_bytes(), 400, "empty"),
        ("/v1/nothing", b"{}".to_vec(), 404, "no such endpoint"),
    ];
    for (path, body, status, needle) in cases {
        let (s, text) = post_raw(http, path, &body);
        assert_eq!(s, status, "{path} {}: {text}", String::from_utf8_lossy(&body[..body.len().min(80)]));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{path}: {msg:?} should mention {needle:?}");
    }
    // A body past the bound.
    let huge = vec![b' '; fogmesh::node::api::MAX_BODY + 4096];
    let (s, text) = post_raw(http, chat, &huge);
    assert_eq!(s, 413, "{text}");
    // Still serving.
    let (s, v) = post(http, chat, &json!({ "model": MODEL, "messages": user, "max_tokens": 2 }));
    assert_eq!(s, 200, "{v}");
}

/// A client that goes away mid-stream: its session closes on every peer,
/// and the node serves the next request.
fn disconnect_mid_stream(http: &str) {
    let body = json!({ "model": MODEL, "messages": [{ "role": "user", "content": "Tell me a long story." }],
                       "max_tokens": 2000, "stream": true, "temperature": 0.9, "seed": 1 })
    .to_string();
    let mut s = std::net::TcpStream::connect(http).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(7).filter(|w| w == b"content").count() < 6 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    // The owner's shard sessions drain (each hop is told to close).
    let t = Instant::now();
    loop {
        let (_, plan) = get(http, "/plan");
        let plan: Value = serde_json::from_str(&plan).unwrap();
        let open: u64 = plan["shards"].as_array().unwrap().iter().map(|s| s["sessions"].as_u64().unwrap()).sum();
        if open == 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "sessions still open after the client left: {plan}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (s, v) = post(http, "/v1/chat/completions", &json!({ "model": MODEL, "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 3 }));
    assert_eq!(s, 200, "{v}");
}

/// 32 clients streaming at once, spread over the three nodes, all finish.
fn thirty_two_streams(c: &LocalCluster) {
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let http = c.peers[i % 3].http.clone();
            std::thread::spawn(move || {
                let body = json!({ "model": MODEL, "messages": [{ "role": "user", "content": format!("Count to {i}.") }],
                                   "max_tokens": 8, "stream": true, "seed": i });
                let (s, text) = post_raw(&http, "/v1/chat/completions", body.to_string().as_bytes());
                assert_eq!(s, 200, "{text}");
                let (_, chunks) = sse_text(&text);
                chunks.last().unwrap()["choices"][0]["finish_reason"].as_str().unwrap().to_string()
            })
        })
        .collect();
    for h in handles {
        let finish = h.join().expect("a streaming client failed");
        assert!(finish == "length" || finish == "stop");
    }
}

/// A DevTools-protocol session with one headless Chromium page.
struct Browser {
    child: std::process::Child,
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next: u64,
    _dir: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let port_file = dir.path().join("DevToolsActivePort");
        let t = Instant::now();
        let port = loop {
            let port = std::fs::read_to_string(&port_file).ok().and_then(|s| s.lines().next().map(str::to_string));
            if let Some(p) = port.filter(|p| !p.is_empty()) {
                break p;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "chromium did not open its DevTools port");
            std::thread::sleep(Duration::from_millis(100));
        };
        let (_, list) = get(&format!("127.0.0.1:{port}"), "/json/list");
        let list: Value = serde_json::from_str(&list).unwrap();
        let page = list.as_array().unwrap().iter().find(|t| t["type"] == "page").expect("a page target");
        let (ws, _) = tungstenite::connect(page["webSocketDebuggerUrl"].as_str().unwrap()).unwrap();
        Browser { child, ws, next: 1, _dir: dir }
    }

    /// Sends a command and waits for its answer (events are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        self.ws.send(tungstenite::Message::text(json!({ "id": id, "method": method, "params": params }).to_string())).unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let Ok(text) = m.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap_or_default();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true }))["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn dashboard_in_headless_chromium() {
    let Some(path) = model_path() else { return };
    if !required("chromium", have("chromium")) {
        return;
    }
    let c = cluster(&path);
    let http = &c.peers[0].http;
    let (s, page) = get(http, "/");
    assert_eq!(s, 200);
    assert!(page.contains("<title>fogmesh</title>"));
    let mut b = Browser::start();
    b.call("Page.enable", json!({}));
    b.call("Page.navigate", json!({ "url": format!("http://{http}/?ask=What%20is%20fog%20computing%3F&max_tokens=24") }));
    let t = Instant::now();
    let probe = "JSON.stringify({ loaded: document.body.dataset.loaded || null, \
        rows: document.querySelectorAll('tr[data-peer]').length, \
        state: document.getElementById('answer').dataset.state, \
        pieces: Number(document.getElementById('answer').dataset.pieces || 0), \
        text: document.getElementById('answer').textContent, \
        route: document.getElementById('routeline').textContent })";
    let mut seen_streaming = false;
    let last = loop {
        let v: Value = b.eval(probe).as_str().map(|s| serde_json::from_str(s).unwrap()).unwrap_or_default();
        seen_streaming |= v["state"] == "streaming" && v["pieces"].as_u64().unwrap_or(0) > 0;
        if v["state"] == "done" || v["state"] == "error" {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "the chat did not finish: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(last["state"], "done", "{last}");
    assert_eq!(last["rows"], 3, "this node and its two peers: {last}");
    assert!(last["pieces"].as_u64().unwrap() >= 2, "tokens arrive one by one: {last}");
    assert!(seen_streaming, "the answer was seen growing before it finished");
    assert!(!last["text"].as_str().unwrap().trim().is_empty());
    assert!(last["route"].as_str().unwrap().starts_with("route: 1."), "{last}");
    // Every peer's id shows.
    for p in &c.peers {
        let id = p.peer_id.clone();
        let shown = b.eval(&format!("!!document.querySelector('tr[data-peer=\"{id}\"]')"));
        assert_eq!(shown, json!(true), "peer {id} is not on the page");
    }
    let shot = b.call("Page.captureScreenshot", json!({ "format": "png" }));
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("dashboard screenshot: {} ({} bytes)", out.display(), png.len());
}

/// One peer serving the model in this process, its API on loopback under
/// `limits`; its address, its stop, and the mesh.
async fn one_peer_api(path: &Path, limits: fogmesh::node::api::Limits) -> (String, tokio::sync::oneshot::Sender<()>, fogmesh::Mesh) {
    let mesh = fogmesh::Mesh::builder()
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .model(path)
        .threads(2)
        .start()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let rt = Some(mesh.runtime().clone());
    tokio::spawn(fogmesh::node::api::serve(listener, mesh.net().clone(), rt, Default::default(), limits, async move {
        let _ = stopped.await;
    }));
    (http, stop, mesh)
}

/// A raw completion of a count on a blocking thread: the status and the body.
async fn count_once(http: &str, max_tokens: u32) -> (u16, Value) {
    let http = http.to_string();
    tokio::task::spawn_blocking(move || {
        post(&http, "/v1/completions", &json!({ "model": MODEL, "max_tokens": max_tokens, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11," }))
    })
    .await
    .unwrap()
}

/// Streaming clients that read the response head and then stop reading
/// hold their generation slots only until their writes have stalled for
/// the bound; then the node closes them and serves new requests. A
/// generation past the wall-clock cap ends with an error saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_lose_their_slots_and_generations_have_a_wall_clock_cap() {
    let Some(path) = model_path() else { return };
    let stall = Duration::from_secs(2);
    // Small send buffers, so that the stall comes after tens of tokens.
    let limits = fogmesh::node::api::Limits { max_running: 4, write_stall: stall, send_buffer: 4096, ..Default::default() };
    let (http, stop, mesh) = one_peer_api(&path, limits).await;
    // The peer serves once its plan is in place.
    let t = Instant::now();
    while count_once(&http, 1).await.0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(60), "the peer never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut stalled = Vec::new();
    for i in 0..4 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(http.parse().unwrap()).await.unwrap();
        // A raw prompt the model goes on counting from, far past what
        // the socket buffers hold.
        let body = json!({ "model": MODEL, "prompt": format!("{i}, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,"), "max_tokens": 1500, "stream": true })
            .to_string();
        let req = format!("POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes()).await.unwrap();
        // The client reads the response head and the first event (its
        // generation holds a slot now), then stops reading.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.windows(6).any(|w| w == b"data: ") {
            let n = tokio::time::timeout(Duration::from_secs(60), tokio::io::AsyncReadExt::read(&mut s, &mut byte)).await.unwrap().unwrap();
            assert!(n > 0, "the stream ended before its first event: {}", String::from_utf8_lossy(&head));
            head.push(byte[0]);
        }
        stalled.push(s);
    }
    // The four stalled streams hold all four slots: a new request gets 429.
    let t = Instant::now();
    let (first, v) = count_once(&http, 1).await;
    assert_eq!(first, 429, "four stalled streams hold all four slots: {v}");
    let served = loop {
        let (s, v) = count_once(&http, 1).await;
        if s == 200 {
            break t.elapsed();
        }
        assert_eq!(s, 429, "{v}");
        assert!(t.elapsed() < Duration::from_secs(120), "the stalled readers kept their slots");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("a new request was served {served:?} after four stalled readers took every slot (write-stall bound {stall:?})");
    // Every stalled reader loses its slot, while still not reading: four
    // requests at once are all served.
    let t = Instant::now();
    loop {
        let all = futures::future::join_all((0..4).map(|_| count_once(&http, 1))).await;
        if all.iter().all(|(s, _)| *s == 200) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "a stalled reader kept its slot: {all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stalled);
    let _ = stop.send(());
    mesh.shutdown().await;

    let limits = fogmesh::node::api::Limits { max_generation: Duration::from_secs(1), ..Default::default() };
    let (http, stop, mesh) = one_peer_api(&path, limits).await;
    let t = Instant::now();
    let (s, v) = loop {
        let (s, v) = count_once(&http, 1500).await;
        if s == 200 || v.to_string().contains("cap of 1 s") || t.elapsed() > Duration::from_secs(60) {
            break (s, v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("cap of 1 s per generation"), "{v}");
    let _ = stop.send(());
    mesh.shutdown().await;
}
