//! Compares scheduling policies on a simulated fog cluster.
//!
//! ```sh
//! cargo run --release -p fogmesh-actors --features sim --example schedsim -- --peers 100 --load 0.8 --seed 1 --json
//! cargo run --release -p fogmesh-actors --features sim --example schedsim -- --peers classic --load 0.8
//! ```
//!
//! `--peers classic` is the textbook example's three nodes of capacity 10, 15
//! and 8; a number gives a random cluster with speeds spread over 20x, on
//! wired links (`--links lan`, the default: 1-20 ms, 2-100 MB/s) or on edge
//! access links (`--links fog`: 2-100 ms, 2-100 Mbit/s).
//! `--mean-up S` sets the mean seconds between a peer's failures (default
//! 600; 0: peers never fail). `--json` prints one object keyed by policy name.

use fogmesh_actors::sim::{Links, Policy, SimConfig, classic_cluster, random_cluster_with, simulate};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}\nusage: schedsim [--peers N|classic] [--load L] [--seed S] [--tasks N] [--links lan|fog] [--mean-up S] [--json]");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut peers, mut load, mut seed, mut tasks, mut json) = ("10".to_string(), 0.8, 1u64, None, false);
    let mut links = Links::Lan;
    let mut mean_up = None;
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--peers" => peers = val("--peers")?,
            "--load" => load = val("--load")?.parse().map_err(|e| format!("--load: {e}"))?,
            "--seed" => seed = val("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--tasks" => tasks = Some(val("--tasks")?.parse().map_err(|e| format!("--tasks: {e}"))?),
            "--json" => json = true,
            "--mean-up" => {
                let s: f64 = val("--mean-up")?.parse().map_err(|e| format!("--mean-up: {e}"))?;
                if !(s >= 0.0 && s.is_finite()) {
                    return Err(format!("--mean-up {s} must be 0 (no failures) or a number of seconds"));
                }
                mean_up = Some(s);
            }
            "--links" => {
                links = match val("--links")?.as_str() {
                    "lan" => Links::Lan,
                    "fog" => Links::Fog,
                    other => return Err(format!("--links {other}: expected lan or fog")),
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(load > 0.0 && load < 1.5) {
        return Err(format!("--load {load} must be in (0, 1.5)"));
    }
    let cluster = if peers == "classic" {
        classic_cluster()
    } else {
        let n: usize = peers.parse().map_err(|e| format!("--peers: {e}"))?;
        if !(2..=10_000).contains(&n) {
            return Err(format!("--peers {n} must be in 2..=10000"));
        }
        random_cluster_with(n, seed, links)
    };
    let mut cfg = SimConfig::new(cluster, load, seed);
    if let Some(t) = tasks {
        cfg.tasks = t;
    }
    if let Some(s) = mean_up {
        cfg.mean_up_s = s;
    }
    let mut out = serde_json::Map::new();
    for p in Policy::ALL {
        let m = simulate(&cfg, p);
        out.insert(p.name().to_string(), serde_json::to_value(&m).map_err(|e| e.to_string())?);
    }
    if json {
        println!("{}", serde_json::Value::Object(out));
    } else {
        println!("{} peers, load {load}, seed {seed}, {} tasks", cfg.peers.len(), cfg.tasks);
        println!("| policy | mean s | p50 s | p99 s | tasks/s | load variance | msgs/task | msgs/task/candidate |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for (name, m) in &out {
            let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {name} | {:.3} | {:.3} | {:.3} | {:.1} | {:.4} | {:.2} | {:.2} |",
                f("mean_s"),
                f("p50_s"),
                f("p99_s"),
                f("throughput"),
                f("load_variance"),
                f("messages_per_task"),
                f("messages_per_task_per_candidate")
            );
        }
    }
    Ok(())
}
