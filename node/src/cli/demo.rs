//! `fogmesh demo`: a mesh of processes on this host, its stage map and a
//! streamed chat answer.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{block_on_signal, resolve_model, timing_line};
use super::run::route_line;
use crate::api::types::{GenFlags, PlanView};
use crate::client::{generate_on, http_get};
use crate::cluster::{ClusterOptions, LocalCluster};

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
    let model = resolve_model(a.model.as_deref())?;
    let model_path = model.clone();
    let exe = std::env::current_exe().context("locating the fogmesh binary")?;
    let secret = fogmesh_actors::protocols::hex(&rand::random::<[u8; 32]>());
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
    let mut o = ClusterOptions::new(exe, Some(model.clone()), a.peers);
    o.threads = (cores / a.peers).max(1);
    // Each peer offers too little memory to hold the whole model, so the
    // demo shows a real split: weights room (three quarters of the offer)
    // of 1.5 / peers of the file.
    if (2..=4).contains(&a.peers) {
        let file = std::fs::metadata(&model).map_or(0, |m| m.len());
        let offer = file * 2 / a.peers as u64;
        o.max_memory = Some(offer);
        println!(
            "each peer offers {:.0} MiB (--max-memory; the model file is {:.0} MiB), so no peer can hold the whole model: it is split across the {}",
            offer as f64 / 1048576.0,
            file as f64 / 1048576.0,
            a.peers
        );
    }
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
        let v: PlanView = serde_json::from_str(&http_get(&p.http, "/plan")?)?;
        for s in v.shards {
            shards.insert((p.peer_id.clone(), s.start, s.end), s.memory_bytes);
        }
    }
    println!("\nstage map ({} layers):", plan.route.iter().map(|h| h.layers[1].saturating_sub(h.layers[0])).sum::<usize>());
    println!("  {:<6} {:<54} {:>9} {:>11}", "STAGE", "PEER", "LAYERS", "WEIGHTS");
    for (i, h) in plan.route.iter().enumerate() {
        let mem = shards.get(&(h.peer.clone(), h.layers[0], h.layers[1])).copied().unwrap_or(0);
        println!(
            "  {:<6} {:<54} {:>9} {:>7.1} MiB",
            i + 1,
            h.peer,
            format!("{}..{}", h.layers[0], h.layers[1]),
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
        println!("               -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}]}}'", crate::api::model_id(&model_path));
        println!("  status     fogmesh status --node {http}");
        block_on_signal()?;
    }
    let codes = peers.stop();
    let r = r?;
    println!("\n");
    println!(
        "[{}; {} tokens in {:.1} s end to end; route {}]",
        timing_line(&r.done.timings),
        r.done.tokens.len(),
        started.elapsed().as_secs_f64(),
        route_line(&r.done.route)
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
