//! `fogmesh run` (a generation on the mesh through a running node) and
//! `fogmesh demo` (a 3-process mesh on this host, its stage map and a
//! streamed chat answer).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use fogmesh_actors::placement_actor::short;

use crate::cli::GenFlags;
use crate::cluster::{ClusterOptions, LocalCluster};
use crate::node::{NodeQueryArgs, data_dir, http_get, node_addr};

/// Options of `fogmesh run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    node: NodeQueryArgs,
    #[command(flatten)]
    flags: GenFlags,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// What a finished generation on the mesh reported.
#[derive(Debug)]
pub struct MeshRun {
    /// The `done` event (prompt_tokens, tokens, text, finish_reason, seed,
    /// timings, route, failovers).
    pub done: Value,
    /// Failover and recovery events on the way.
    pub incidents: Vec<Value>,
}

/// Runs `flags` through the node at `node`, calling `on_text` with each
/// piece of final text as it streams.
pub fn generate_on(node: &str, flags: &GenFlags, mut on_text: impl FnMut(&str)) -> Result<MeshRun> {
    let base = if node.starts_with("http://") { node.to_string() } else { format!("http://{node}") };
    let url = format!("{}/v1/fogmesh/generate", base.trim_end_matches('/'));
    let body = serde_json::to_string(flags)?;
    let resp = agent()
        .post(&url)
        .header("content-type", "application/json")
        .send(body.as_bytes())
        .with_context(|| format!("no fogmesh node answered at {node} (is `fogmesh node --model PATH` running? pass --node ADDR)"))?;
    let status = resp.status();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    if !status.is_success() {
        let mut text = String::new();
        let _ = Read::take(&mut reader, 64 << 10).read_to_string(&mut text);
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        bail!("{node} refused the generation ({status}): {msg}");
    }
    let mut incidents = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = Read::take(&mut reader, 16 << 20).read_line(&mut line).context("reading the node's stream")?;
        if n == 0 {
            bail!("{node} closed the stream before the generation finished");
        }
        let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("{node} sent a malformed event"))?;
        match v["event"].as_str() {
            Some("token") => on_text(v["text"].as_str().unwrap_or("")),
            Some("failover") | Some("recovered") => incidents.push(v),
            Some("done") => return Ok(MeshRun { done: v, incidents }),
            Some("error") => bail!("the generation failed: {}", v["message"].as_str().unwrap_or("?")),
            _ => {}
        }
    }
}

fn route_line(route: &Value) -> String {
    let hops: Vec<String> = route
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| format!("…{} [{}..{})", short(h["peer"].as_str().unwrap_or("?")), h["layers"][0], h["layers"][1]))
        .collect();
    hops.join(" → ")
}

fn timing_summary(done: &Value) -> String {
    let t: fogmesh_models::Timings = serde_json::from_value(done["timings"].clone()).unwrap_or_default();
    crate::cli::timing_line(&t)
}

/// `fogmesh run`.
pub fn run(a: RunArgs) -> Result<()> {
    let node = node_addr(&a.node.node, &data_dir(&a.node.data_dir));
    let json = a.node.json;
    let mut stdout = std::io::stdout().lock();
    let r = generate_on(&node, &a.flags, |t| {
        if !json && !t.is_empty() {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if json {
        let mut done = r.done;
        if let Some(o) = done.as_object_mut() {
            o.remove("event");
        }
        writeln!(stdout, "{done}")?;
    } else {
        writeln!(stdout)?;
        for i in &r.incidents {
            eprintln!("[{}]", i);
        }
        eprintln!("[{}; route {}]", timing_summary(&r.done), route_line(&r.done["route"]));
    }
    Ok(())
}

/// Options of `fogmesh demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// GGUF model [default: the fetched default model, fetched if absent].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Peers to start.
    #[arg(long, default_value_t = 3)]
    peers: usize,
    /// The question asked.
    #[arg(long, short, default_value = "What is fog computing? Answer in two sentences.")]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 160)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seconds to wait for the peers to find each other.
    #[arg(long, default_value_t = 60)]
    wait: u64,
    /// Keep the mesh running after the answer (dashboard, API) until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

/// Whether this host has an interface (other than loopback) that is up and
/// multicast-capable, read from /sys/class/net.
pub fn has_multicast_interface() -> bool {
    const IFF_UP: u32 = 0x1;
    const IFF_LOOPBACK: u32 = 0x8;
    const IFF_MULTICAST: u32 = 0x1000;
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else { return false };
    dir.flatten().any(|e| {
        let flags = std::fs::read_to_string(e.path().join("flags")).ok();
        let flags = flags.and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok()).unwrap_or(0);
        flags & IFF_UP != 0 && flags & IFF_MULTICAST != 0 && flags & IFF_LOOPBACK == 0
    })
}

/// `fogmesh demo`.
pub fn demo(a: DemoArgs) -> Result<()> {
    if a.peers == 0 || a.peers > 16 {
        bail!("--peers must be between 1 and 16");
    }
    let demo_started = Instant::now();
    let model = crate::cli::resolve_model(a.model.as_deref())?;
    let model_path = model.clone();
    let exe = std::env::current_exe().context("locating the fogmesh binary")?;
    let secret: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    let mdns = has_multicast_interface();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if mdns {
        println!("starting {} peers on this host; they find each other by mDNS (random cluster secret)", a.peers);
    } else {
        println!(
            "starting {} peers on this host; no multicast-capable interface here, so peers 2..{} join peer 1 by its loopback address",
            a.peers, a.peers
        );
    }
    let mut o = ClusterOptions::new(exe, Some(model), a.peers);
    o.threads = (cores / a.peers).max(1);
    o.mdns = mdns;
    o.secret = Some(secret);
    o.wait = Duration::from_secs(a.wait);
    if let Ok(l) = std::env::var("RUST_LOG") {
        o.log = l;
    }
    let mut peers = LocalCluster::start(&o)?;
    let plan = peers.wait_plan(a.peers, Duration::from_secs(a.wait))?;
    let mut shards = std::collections::HashMap::new();
    for p in &peers.peers {
        let v: Value = serde_json::from_str(&http_get(&p.http, "/plan")?)?;
        for s in v["shards"].as_array().into_iter().flatten() {
            shards.insert((p.peer_id.clone(), s["start"].as_u64(), s["end"].as_u64()), s["memory_bytes"].as_u64().unwrap_or(0));
        }
    }
    println!("\nstage map ({} layers):", plan["route"].as_array().map_or(0, |r| r.iter().map(|h| h["layers"][1].as_u64().unwrap_or(0) - h["layers"][0].as_u64().unwrap_or(0)).sum::<u64>()));
    println!("  {:<6} {:<54} {:>9} {:>11}", "STAGE", "PEER", "LAYERS", "WEIGHTS");
    for (i, h) in plan["route"].as_array().into_iter().flatten().enumerate() {
        let peer = h["peer"].as_str().unwrap_or("?");
        let mem = shards.get(&(peer.to_string(), h["layers"][0].as_u64(), h["layers"][1].as_u64())).copied().unwrap_or(0);
        println!(
            "  {:<6} {:<54} {:>9} {:>7.1} MiB",
            i + 1,
            peer,
            format!("{}..{}", h["layers"][0], h["layers"][1]),
            mem as f64 / 1048576.0
        );
    }
    println!("\n> {}\n", a.prompt);
    let flags = GenFlags {
        prompt: a.prompt.clone(),
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        ..GenFlags::default()
    };
    let mut stdout = std::io::stdout().lock();
    let started = Instant::now();
    let mut first_token = None;
    let r = generate_on(&peers.peers[0].http, &flags, |t| {
        first_token.get_or_insert_with(|| demo_started.elapsed());
        let _ = stdout.write_all(t.as_bytes());
        let _ = stdout.flush();
    });
    drop(stdout);
    if a.keep && r.is_ok() {
        let http = &peers.peers[0].http;
        println!("\n\nthe mesh stays up until Ctrl-C:");
        println!("  dashboard  http://{http}/");
        println!("  API        curl http://{http}/v1/chat/completions -H 'Content-Type: application/json' \\");
        println!("               -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}]}}'", crate::http::model_id(&model_path));
        println!("  status     fogmesh status --node {http}");
        crate::node::block_on_signal()?;
    }
    let codes = peers.stop();
    let r = r?;
    println!("\n");
    let tokens = r.done["tokens"].as_array().map_or(0, |t| t.len());
    println!(
        "[{}; {} tokens in {:.1} s end to end; route {}]",
        timing_summary(&r.done),
        tokens,
        started.elapsed().as_secs_f64(),
        route_line(&r.done["route"])
    );
    if let Some(t) = first_token {
        println!("[first answer token {:.1} s after the demo started, model fetch and peer start-up included]", t.as_secs_f64());
    }
    let clean = codes.iter().all(|c| *c == Some(0));
    println!("peers stopped {}", if clean { "cleanly" } else { "(some had to be killed)" });
    if !clean {
        bail!("peers did not shut down cleanly: exit codes {codes:?}");
    }
    Ok(())
}
