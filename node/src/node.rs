//! `fogmesh node` (run a peer until SIGINT/SIGTERM), `fogmesh peers` and
//! `fogmesh status` (ask a running node).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use libp2p::Multiaddr;

use crate::mesh::Mesh;
use crate::net::{PeerInfo, keys};

/// Where `fogmesh node` serves HTTP unless told otherwise.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8469";
/// File in the data dir holding the HTTP address of the running node.
pub const HTTP_ADDR_FILE: &str = "http.addr";

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

pub(crate) fn data_dir(d: &Option<PathBuf>) -> PathBuf {
    d.clone().unwrap_or_else(|| fogmesh_models::home_dir().join("node"))
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
        Some(p) => Some(crate::cli::resolve_model(Some(p))?),
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
        let server = tokio::spawn(crate::http::serve(http, handle.clone(), rt, async move {
            let _ = stop_rx.await;
        }));
        wait_for_signal().await;
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

async fn wait_for_signal() {
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

pub(crate) fn node_addr(node: &Option<String>, dir: &Path) -> String {
    if let Some(n) = node {
        return n.clone();
    }
    std::fs::read_to_string(dir.join(HTTP_ADDR_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_HTTP.to_string())
}

/// Fetches `path` from the node's HTTP endpoint.
pub fn http_get(node: &str, path: &str) -> Result<String> {
    let base = if node.starts_with("http://") { node.to_string() } else { format!("http://{node}") };
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build().into();
    let mut resp = agent.get(&url).call().with_context(|| format!("no fogmesh node answered at {node} (is `fogmesh node` running? pass --node ADDR)"))?;
    resp.body_mut().with_config().limit(64 << 20).read_to_string().with_context(|| format!("reading {url}"))
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

/// Prints a running node's status: itself, then its view.
pub fn run_status(args: NodeQueryArgs) -> Result<()> {
    let (node, body) = args.get("/status")?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let s: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{node} sent a malformed status"))?;
    println!("node        {}", s["peer_id"].as_str().unwrap_or("?"));
    let listen: Vec<&str> = s["listen_addrs"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
    println!("listening   {}", listen.join(" "));
    println!("mDNS        {}", if s["mdns"] == true { "on" } else { "off" });
    println!("secret      {}", if s["secret"] == true { "on" } else { "off (anyone on the network can join)" });
    println!("connections {}", s["connections"]);
    let m = &s["measurement"];
    println!(
        "this host   {} cores, {} MiB free, {:.1} GFLOP/s, fogmesh {}",
        m["cores"],
        m["memory_bytes"].as_u64().unwrap_or(0) >> 20,
        m["gflops"].as_f64().unwrap_or(0.0),
        m["version"].as_str().unwrap_or("?")
    );
    let n = s["peers"].as_array().map_or(0, |p| p.len());
    println!("peers       {n}");
    if n == 0 {
        println!("            none yet: are the hosts on one LAN? is multicast blocked? try --bootstrap ADDR");
    }
    Ok(())
}
