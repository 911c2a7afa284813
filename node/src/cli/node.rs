//! `fogmesh node` (run a peer until SIGINT/SIGTERM), `fogmesh peers` and
//! `fogmesh status` (ask a running node).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use libp2p::Multiaddr;

use super::{data_dir, resolve_model};
use crate::api::types::{Dashboard, Incident};
use crate::client::{DEFAULT_HTTP, HTTP_ADDR_FILE, http_get, node_addr};
use crate::mesh::{Mesh, PeerInfo, keys};

/// Options of `fogmesh node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Address to listen on (repeatable). Default: all IPv4 interfaces, a free
    /// TCP port (and a free QUIC port when no secret is set).
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// A peer to join through, beyond the local link (repeatable), e.g.
    /// /ip4/10.0.0.5/tcp/4001.
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Cluster secret, 64 hex digits; peers without it cannot connect.
    #[arg(long, env = "FOGMESH_SECRET", hide_env_values = true, conflicts_with = "secret_file")]
    pub secret: Option<String>,
    /// File holding the cluster secret (64 hex digits, or a go-libp2p swarm.key).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Do not discover peers by multicast DNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Where the node keeps its identity key (default $FOGMESH_HOME/node).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Local HTTP status endpoint (port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_HTTP)]
    pub http: SocketAddr,
    /// Seconds an unconnected, silent peer stays in the view.
    #[arg(long, default_value_t = 10.0, hide = true)]
    pub peer_ttl: f64,
    /// Serve this GGUF model: the mesh's peers holding it split its layers
    /// between them. Without it the node only relays and answers queries.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Compute threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
}

fn secret(args: &NodeArgs) -> Result<Option<libp2p::pnet::PreSharedKey>> {
    Ok(match (&args.secret, &args.secret_file) {
        (Some(s), _) => Some(keys::parse_secret(s)?),
        (None, Some(f)) => Some(keys::read_secret_file(f)?),
        (None, None) => None,
    })
}

/// Runs a peer until SIGINT or SIGTERM.
pub fn run_node(args: NodeArgs) -> Result<()> {
    if !(args.peer_ttl.is_finite() && (0.1..=3600.0).contains(&args.peer_ttl)) {
        bail!("--peer-ttl must be between 0.1 and 3600 seconds");
    }
    let secret = secret(&args)?;
    let dir = data_dir(&args.data_dir);
    let keypair = keys::load_or_create_identity(&dir)?;
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let model = match &args.model {
        Some(p) => Some(resolve_model(Some(p))?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async move {
        let http = tokio::net::TcpListener::bind(args.http).await.with_context(|| {
            format!("cannot serve HTTP on {} (in use? pass --http 127.0.0.1:0 for a free port)", args.http)
        })?;
        let http_addr = http.local_addr()?;
        let mut b = Mesh::builder().keypair(keypair).mdns(!args.no_mdns).peer_ttl(Duration::from_secs_f64(args.peer_ttl));
        for a in &args.listen {
            b = b.listen(a.clone());
        }
        for a in &args.bootstrap {
            b = b.bootstrap(a.clone());
        }
        if let Some(s) = secret {
            b = b.secret(s);
        }
        if let Some(t) = args.threads {
            b = b.threads(t);
        }
        if let Some(m) = &model {
            b = b.model(m.clone());
        }
        let mesh = b.start().await?;
        let handle = mesh.net().clone();
        std::fs::write(dir.join(HTTP_ADDR_FILE), format!("{http_addr}\n"))
            .with_context(|| format!("writing {}", dir.join(HTTP_ADDR_FILE).display()))?;
        let addrs: Vec<String> = mesh.listen_addrs().iter().map(|a| a.to_string()).collect();
        let measurement = mesh.measurement().clone();
        tracing::info!(
            peer_id = %handle.local_peer_id(),
            listen = %addrs.join(","),
            mdns = !args.no_mdns,
            secret = secret.is_some(),
            http = %http_addr,
            cores = measurement.cores,
            memory_mib = measurement.memory_bytes >> 20,
            gflops = format!("{:.1}", measurement.gflops),
            model = %model.as_ref().map_or("none".to_string(), |m| m.display().to_string()),
            "fogmesh node started"
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = mesh.model().is_some().then(|| mesh.runtime().clone());
        let server = tokio::spawn(crate::api::serve(http, handle.clone(), rt, async move {
            let _ = stop_rx.await;
        }));
        // The first thing a new user gets wrong: peers that never meet.
        let lonely = {
            let (h, mdns, bootstrap) = (handle.clone(), !args.no_mdns, !args.bootstrap.is_empty());
            tokio::spawn(async move {
                tokio::time::sleep(NO_PEERS_HINT_AFTER).await;
                if h.peers().await.is_ok_and(|p| p.is_empty()) {
                    tracing::warn!("{}", no_peers_hint(NO_PEERS_HINT_AFTER, mdns, bootstrap));
                }
            })
        };
        wait_for_signal().await;
        lonely.abort();
        tracing::info!("shutting down");
        let _ = stop_tx.send(());
        if tokio::time::timeout(Duration::from_secs(5), mesh.shutdown()).await.is_err() {
            tracing::warn!("the mesh did not stop within 5 s");
        }
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server error"),
            Err(_) => tracing::warn!("HTTP server did not stop within 5 s"),
            _ => {}
        }
        let _ = std::fs::remove_file(dir.join(HTTP_ADDR_FILE));
        tracing::info!("stopped");
        Ok(())
    })
}

/// When a node with no peers says what to check.
pub const NO_PEERS_HINT_AFTER: Duration = Duration::from_secs(5);

/// What to check when no peer showed up after `after`.
pub fn no_peers_hint(after: Duration, mdns: bool, bootstrap: bool) -> String {
    let mut s = format!("no peers after {} s —", after.as_secs());
    if mdns {
        s.push_str(" are the hosts on one LAN? is multicast (UDP 5353) blocked?");
    } else {
        s.push_str(" mDNS is off (--no-mdns);");
    }
    if bootstrap {
        s.push_str(" is the --bootstrap address reachable, and do both peers hold the same cluster secret?");
    } else {
        s.push_str(" try --bootstrap ADDR with a peer's address (see its startup line), and the same --secret on every peer");
    }
    s
}

pub(super) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Options of the commands that ask a running node (`peers`, `status`).
#[derive(Debug, Args)]
pub struct NodeQueryArgs {
    /// HTTP address of the node (default: the one the node in --data-dir
    /// wrote, else 127.0.0.1:8469).
    #[arg(long, value_name = "ADDR")]
    pub node: Option<String>,
    /// Data dir of the local node, to find its HTTP address.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print the node's JSON answer.
    #[arg(long)]
    pub json: bool,
}

impl NodeQueryArgs {
    /// GETs `path` from the node: its address and the body.
    fn get(&self, path: &str) -> Result<(String, String)> {
        let node = node_addr(&self.node, &data_dir(&self.data_dir));
        let body = http_get(&node, path)?;
        Ok((node, body))
    }
}

/// Prints the view of a running node.
pub fn run_peers(args: NodeQueryArgs) -> Result<()> {
    let (node, body) = args.get("/peers")?;
    let peers: Vec<PeerInfo> = serde_json::from_str(&body).with_context(|| format!("{node} sent a malformed peer list"))?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    if peers.is_empty() {
        println!("no peers in the view of {node}");
        return Ok(());
    }
    println!("{:<54} {:>5} {:>9} {:>7} {:>8} {:>9}  ADDRESS", "PEER", "CORES", "MEM MiB", "GFLOPS", "RTT ms", "SEEN ms");
    for p in &peers {
        let rtt = p.rtt_ms.map_or("-".to_string(), |r| format!("{r:.2}"));
        println!(
            "{:<54} {:>5} {:>9} {:>7.1} {:>8} {:>9}  {}",
            p.peer_id,
            p.cores,
            p.memory_bytes >> 20,
            p.gflops,
            rtt,
            p.last_seen_ms,
            p.addrs.first().map_or("", |a| a.as_str())
        );
    }
    Ok(())
}

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
    let layers = d.layers as u64;
    match &d.model {
        Some(m) => {
            let _ = writeln!(o, "model       {m} ({layers} layers)");
        }
        None => {
            let _ = writeln!(o, "model       none (start the node with --model PATH to serve one)");
        }
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
    let _ = writeln!(o, "{:<18} {:<30} {:<16} {:>5} {:>7} {:>7} {:>7}", "PEER", "LAYERS", "RANGES", "QUEUE", "TOK/S", "GFLOPS", "RTT ms");
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
        let _ = writeln!(
            o,
            "{:<18} {:<30} {:<16} {:>5} {:>7.1} {:>7.1} {:>7}{gone}",
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
            tokens_per_s: 12.5,
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
            shards: vec![ShardStatus { start: 0, end: 10, sessions: 0, memory_bytes: 0, cache_bytes: 0, tokens: 0, queued: 2 }],
            route: vec![
                RouteHop { peer: "12D3KooWAAAAself".into(), layers: [0, 10] },
                RouteHop { peer: "12D3KooWBBBBpeer".into(), layers: [10, 30] },
            ],
            no_route: None,
            peers: vec![peer],
            generated_tokens: 5,
            sessions: 1,
            incidents: vec![
                Incident::Failover { at_ms: 0, banned: vec!["12D3KooWCCCCgone".into()], reason: "hop did not answer".into() },
                Incident::Recovered { at_ms: 0, route: vec![], recovery_ms: 320.0 },
            ],
        };
        let v = status_view("127.0.0.1:8469", &d, Some(3.0));
        for needle in ["(this)", "0..10", "10..30", "12.5", "0.70", "route", "→", "hop did not answer", "recovered in 320 ms", "3.0 tokens/s"] {
            assert!(v.contains(needle), "{needle:?} missing from:\n{v}");
        }
        assert!(!v.contains("no peers yet"));
        // The typed body survives its JSON round trip (what `fogmesh status` reads).
        let back: Dashboard = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
        let lonely = Dashboard { peers: vec![], ..d };
        assert!(status_view("n", &lonely, None).contains("try --bootstrap ADDR"));
    }

    #[test]
    fn the_no_peers_hint_says_what_to_try() {
        let h = no_peers_hint(Duration::from_secs(5), true, false);
        assert!(h.starts_with("no peers after 5 s") && h.contains("multicast") && h.contains("--bootstrap ADDR"), "{h}");
        assert!(no_peers_hint(Duration::from_secs(5), false, true).contains("cluster secret"));
    }
}
