//! `fogmesh status`: the mesh as a running node sees it, as a terminal view
//! (`--watch` redraws it) or its JSON.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::NodeQueryArgs;
use crate::api::types::{Dashboard, Incident};

/// Options of `fogmesh status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    query: NodeQueryArgs,
    /// Redraw every second until interrupted.
    #[arg(long)]
    watch: bool,
}

/// Prints a running node's view of the mesh: itself, the peers with the
/// layers they hold, their load and speed, the route and recent failovers.
pub fn run_status(args: StatusArgs) -> Result<()> {
    if args.query.json {
        let (_, body) = args.query.get("/v1/fogmesh/dashboard")?;
        println!("{body}");
        return Ok(());
    }
    let mut last: Option<(std::time::Instant, u64)> = None;
    loop {
        let (node, body) = args.query.get("/v1/fogmesh/dashboard")?;
        let d: Dashboard = serde_json::from_str(&body).with_context(|| format!("{node} sent a malformed status"))?;
        let generated = d.generated_tokens;
        let now = std::time::Instant::now();
        let rate = last.map(|(t, g)| generated.saturating_sub(g) as f64 / now.duration_since(t).as_secs_f64().max(1e-3));
        last = Some((now, generated));
        let view = status_view(&node, &d, rate);
        if args.watch {
            // Clear the screen and home the cursor, then draw.
            print!("\x1b[2J\x1b[H{view}");
            use std::io::Write;
            std::io::stdout().flush()?;
            std::thread::sleep(Duration::from_secs(1));
        } else {
            print!("{view}");
            return Ok(());
        }
    }
}

/// One line about a node's weights: the fetch from peers (progress, ETA),
/// what it fetched and served.
pub fn weights_line(w: &fogmesh_actors::weights::WeightsStatus) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
    let mut parts = Vec::new();
    if let Some(f) = &w.fetch {
        let mut s = match f.state.as_str() {
            "fetching" => format!(
                "fetching from {} peers: {} of {}{}",
                f.peers,
                mib(f.bytes_done),
                mib(f.bytes_wanted),
                f.eta_s.map_or(String::new(), |e| format!(", {e:.0} s left"))
            ),
            "ready" => format!("fetched from peers: {} held ({} chunks)", mib(f.bytes_held), f.chunks_held),
            other => other.to_string(),
        };
        if f.rejected > 0 {
            s.push_str(&format!("; {} damaged chunks refused", f.rejected));
        }
        if let Some(e) = &f.error {
            s.push_str(&format!(" — {e}"));
        }
        parts.push(s);
    }
    if w.served_bytes > 0 {
        parts.push(format!("served {} to peers", mib(w.served_bytes)));
    }
    if parts.is_empty() {
        parts.push("the whole file, here".into());
    }
    parts.join("; ")
}

/// The terminal view of a node's `/v1/fogmesh/dashboard` answer.
pub fn status_view(node: &str, d: &Dashboard, rate: Option<f64>) -> String {
    use std::fmt::Write;
    let short = |p: &str| fogmesh_actors::placement_actor::short(p).to_string();
    let mut o = String::new();
    let me = d.peer_id.as_str();
    let _ = writeln!(o, "fogmesh {} — node {me} at {node}", d.version);
    let _ = writeln!(o, "listening   {}", d.listen_addrs.join(" "));
    let _ = writeln!(
        o,
        "discovery   mDNS {}; cluster secret {}",
        if d.mdns { "on" } else { "off" },
        if d.secret { "on" } else { "off (anyone who can reach this host can join)" }
    );
    let reach = match d.nat {
        crate::mesh::Nat::Public => "public: peers dial this node; it relays for peers behind NAT".to_string(),
        crate::mesh::Nat::Private if d.relays.is_empty() => "behind NAT: looking for a relay".to_string(),
        crate::mesh::Nat::Private => {
            let r: Vec<String> = d.relays.iter().map(|p| format!("…{}", short(p))).collect();
            format!("behind NAT: reachable through relay {}", r.join(", "))
        }
        crate::mesh::Nat::Unknown => "not known yet (no peer has dialed it back)".to_string(),
    };
    let _ = writeln!(o, "reachable   {reach}");
    let layers = d.layers as u64;
    match &d.model {
        Some(m) => {
            let _ = writeln!(o, "model       {m} ({layers} layers)");
        }
        None => {
            let _ = writeln!(o, "model       none (start the node with --model PATH to serve one)");
        }
    }
    if let Some(w) = &d.weights {
        let _ = writeln!(o, "weights     {}", weights_line(w));
    }
    let m = &d.measurement;
    let _ = writeln!(o, "this host   {} cores, {} MiB free, {:.1} GFLOP/s", m.cores, m.memory_bytes >> 20, m.gflops);
    if let Some(r) = rate {
        let _ = writeln!(o, "generating  {r:.1} tokens/s here ({} sessions so far)", d.sessions);
    }
    let _ = writeln!(o);
    let bar = |ranges: &[(u64, u64)]| -> String {
        let w = 30usize;
        let mut cells = vec!['·'; w];
        for &(s, e) in ranges {
            if layers == 0 {
                break;
            }
            let (a, b) = ((s * w as u64 / layers) as usize, (e * w as u64).div_ceil(layers) as usize);
            for c in cells.iter_mut().take(b.min(w)).skip(a) {
                *c = '█';
            }
        }
        cells.into_iter().collect()
    };
    let _ = writeln!(
        o,
        "{:<18} {:<30} {:<16} {:>5} {:>7} {:>7} {:>7}  {:<12} {:>9}",
        "PEER", "LAYERS", "RANGES", "QUEUE", "TOK/S", "GFLOPS", "RTT ms", "LINK", "RATE"
    );
    let own: Vec<(u64, u64)> = d.shards.iter().map(|s| (s.start as u64, s.end as u64)).collect();
    let fmt_ranges = |r: &[(u64, u64)]| r.iter().map(|(a, b)| format!("{a}..{b}")).collect::<Vec<_>>().join(" ");
    let queue: u64 = d.shards.iter().map(|s| s.queued as u64).sum();
    let _ = writeln!(
        o,
        "{:<18} {:<30} {:<16} {:>5} {:>7} {:>7.1} {:>7}",
        format!("…{} (this)", short(me)),
        bar(&own),
        fmt_ranges(&own),
        queue,
        "-",
        m.gflops,
        "-"
    );
    for p in &d.peers {
        let r: Vec<(u64, u64)> = p.shards.iter().map(|s| (u64::from(s[0]), u64::from(s[1]))).collect();
        let q: u64 = p.shards.iter().map(|s| u64::from(s[2])).sum();
        let gone = if p.connections == 0 { " (gone)" } else { "" };
        let link = p.link.map_or("-", |l| l.as_str());
        let rate = d
            .links
            .iter()
            .find(|l| l.peer == p.peer_id)
            .and_then(|l| l.bottleneck_bps)
            .map_or("-".to_string(), |bps| format!("{:.1} Mb/s", bps * 8.0 / 1e6));
        let _ = writeln!(
            o,
            "{:<18} {:<30} {:<16} {:>5} {:>7.1} {:>7.1} {:>7}  {link:<12} {rate:>9}{gone}",
            format!("…{}", short(&p.peer_id)),
            bar(&r),
            fmt_ranges(&r),
            q,
            p.tokens_per_s,
            p.gflops,
            p.rtt_ms.map_or("-".to_string(), |r| format!("{r:.2}")),
        );
    }
    if d.peers.is_empty() {
        let _ = writeln!(o, "\nno peers yet: are the hosts on one LAN? is multicast blocked? try --bootstrap ADDR on `fogmesh node`");
    }
    let _ = writeln!(o);
    if !d.route.is_empty() {
        let _ = writeln!(o, "route       {}", super::run::route_line(&d.route));
    } else if let Some(why) = &d.no_route {
        let _ = writeln!(o, "route       none: {why}");
    }
    if !d.incidents.is_empty() {
        let _ = writeln!(o, "recent failovers:");
        for i in d.incidents.iter().rev().take(5) {
            match i {
                Incident::Failover { banned, reason, .. } => {
                    let banned: Vec<String> = banned.iter().map(|b| format!("…{}", short(b))).collect();
                    let _ = writeln!(o, "  failover: banned {} — {reason}", banned.join(", "));
                }
                Incident::Recovered { recovery_ms, .. } => {
                    let _ = writeln!(o, "  recovered in {recovery_ms:.0} ms");
                }
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::PeerInfo;

    #[test]
    fn status_view_shows_peers_layers_route_and_failovers() {
        use crate::api::types::RouteHop;
        use crate::measure::SelfMeasurement;
        use fogmesh_actors::shard_actor::ShardStatus;
        let peer = PeerInfo {
            peer_id: "12D3KooWBBBBpeer".into(),
            addrs: vec![],
            cores: 4,
            memory_bytes: 1 << 30,
            gflops: 40.0,
            version: "0.1.0".into(),
            rtt_ms: Some(0.7),
            last_seen_ms: 0,
            connections: 1,
            sources: vec![],
            shards: vec![[10, 30, 1]],
            agent: None,
            models: vec![],
            partial: vec![],
            tokens_per_s: 12.5,
            link: Some(crate::mesh::LinkKind::HolePunched),
        };
        let d = Dashboard {
            peer_id: "12D3KooWAAAAself".into(),
            version: "0.1.0".into(),
            model: Some("m".into()),
            layers: 30,
            uptime_s: 1.0,
            listen_addrs: vec!["/ip4/10.0.0.1/tcp/4001".into()],
            mdns: true,
            secret: true,
            connections: 1,
            measurement: SelfMeasurement { cores: 4, memory_bytes: 1 << 33, gflops: 50.0, version: "0.1.0".into() },
            shards: vec![ShardStatus { start: 0, end: 10, sessions: 0, memory_bytes: 0, cache_bytes: 0, tokens: 0, queued: 2, passes: 0, steps: 0, cache_budget: 1 << 20, prefix_bytes: 0, prefix_hits: 0 }],
            route: vec![
                RouteHop { peer: "12D3KooWAAAAself".into(), layers: [0, 10] },
                RouteHop { peer: "12D3KooWBBBBpeer".into(), layers: [10, 30] },
            ],
            no_route: None,
            peers: vec![peer],
            nat: crate::mesh::Nat::Private,
            relays: vec!["12D3KooWRRRRrelay".into()],
            links: vec![fogmesh_actors::links::LinkView {
                peer: "12D3KooWBBBBpeer".into(),
                bytes: 1 << 20,
                blocked_writes: 3,
                bottleneck_bps: Some(125_000.0),
            }],
            generated_tokens: 5,
            sessions: 1,
            incidents: vec![
                Incident::Failover { at_ms: 0, banned: vec!["12D3KooWCCCCgone".into()], reason: "hop did not answer".into() },
                Incident::Recovered { at_ms: 0, route: vec![], recovery_ms: 320.0 },
            ],
            weights: Some(fogmesh_actors::weights::WeightsStatus {
                fetch: Some(fogmesh_actors::weights::FetchStatus {
                    state: "fetching".into(),
                    bytes_wanted: 20 << 20,
                    bytes_done: 5 << 20,
                    peers: 2,
                    eta_s: Some(3.0),
                    rejected: 1,
                    ..Default::default()
                }),
                served_bytes: 1 << 20,
                ..Default::default()
            }),
        };
        let v = status_view("127.0.0.1:8469", &d, Some(3.0));
        for needle in ["(this)", "0..10", "10..30", "12.5", "0.70", "route", "→", "hop did not answer", "recovered in 320 ms", "3.0 tokens/s", "hole-punched", "1.0 Mb/s", "through relay …", "fetching from 2 peers: 5.0 MiB of 20.0 MiB, 3 s left", "1 damaged chunks refused", "served 1.0 MiB"] {
            assert!(v.contains(needle), "{needle:?} missing from:\n{v}");
        }
        assert!(!v.contains("no peers yet"));
        // The typed body survives its JSON round trip (what `fogmesh status` reads).
        let back: Dashboard = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
        let lonely = Dashboard { peers: vec![], ..d };
        assert!(status_view("n", &lonely, None).contains("try --bootstrap ADDR"));
    }
}
