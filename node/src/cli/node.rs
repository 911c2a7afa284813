//! `fogmesh node`: run a peer until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use libp2p::Multiaddr;

use super::{NodeModel, data_dir, resolve_node_model};
use crate::client::{DEFAULT_HTTP, HTTP_ADDR_FILE};
use crate::mesh::{Invite, Mesh, is_loopback, keys};
use crate::net::connections::{DEFAULT_MAX_PEERS, DEFAULT_TARGET_PEERS};

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
    /// Join the mesh an invite token names (from `fogmesh invite` on a
    /// member): its cluster secret and where to reach it.
    #[arg(long, value_name = "TOKEN", env = "FOGMESH_JOIN", hide_env_values = true)]
    pub join: Option<String>,
    /// Start a private cluster: a secret made once in the data dir
    /// (cluster.key, kept across restarts); prints the invite for the
    /// other hosts.
    #[arg(long, conflicts_with_all = ["secret", "secret_file", "join"])]
    pub private: bool,
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
    /// Peers this node keeps connections to on its own (for gossip and the
    /// DHT); it connects to others only to exchange work with them.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TARGET_PEERS as u16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub target_peers: u16,
    /// Connected peers above which idle connections close (a bootstrap
    /// peer takes every newcomer at first, then sheds them).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PEERS as u16,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub max_peers: u16,
    /// Serve this model: a GGUF file, a catalogue name (`fogmesh fetch
    /// --list`), or `sha256:HEX[@DIGEST]`, a model the mesh holds (the
    /// file's SHA-256, and its manifest's digest as the holder's log prints
    /// it): this node then fetches from its peers only the chunks of the
    /// layers it is given, each checked.
    /// The mesh's peers serving it split its layers between them. Without
    /// it the node only relays and answers queries.
    #[arg(long, value_name = "PATH|NAME|sha256:HEX[@DIGEST]")]
    pub model: Option<PathBuf>,
    /// Where chunks of models fetched from peers are kept [default:
    /// $FOGMESH_HOME/chunks].
    #[arg(long, value_name = "DIR")]
    pub chunk_dir: Option<PathBuf>,
    /// The most bytes of chunks kept in --chunk-dir, over all models (least
    /// recently used out).
    #[arg(long, value_name = "SIZE", default_value = "16GiB", value_parser = crate::measure::parse_size)]
    pub chunk_cache: u64,
    /// The most bytes per second this node uploads model chunks to peers at
    /// (`10MiB`, …) [default: no bound], leaving the rest of a slow link to
    /// inference.
    #[arg(long, value_name = "SIZE", value_parser = crate::measure::parse_size)]
    pub upload_rate: Option<u64>,
    /// Compute threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Require this API key (`Authorization: Bearer KEY`) on every HTTP
    /// endpoint but /health and the dashboard page (which asks for it).
    #[arg(long, env = "FOGMESH_API_KEY", hide_env_values = true, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// File holding the API key (its first line; private to its owner).
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// A Host name the HTTP API answers besides IP addresses and localhost
    /// (repeatable); with an API key, any Host is answered.
    #[arg(long, value_name = "NAME")]
    pub allow_host: Vec<String>,
    /// Wall-clock cap on one HTTP generation, in seconds; past it the
    /// stream ends with an error and the session is cancelled.
    #[arg(long, value_name = "SECS", default_value_t = crate::api::MAX_GENERATION_SECS)]
    pub max_generation_secs: u64,
    /// How activations cross the hops this node sends: `auto` (lossless
    /// while a link keeps up, compressed no lossier than int8o while it is
    /// the bottleneck), `lossless` (f32 everywhere: the exact single-process
    /// tokens), or `f16`, `bf16`, `int8o` on every hop.
    #[arg(long, value_name = "HOW", default_value = "auto")]
    pub activations: fogmesh_actors::links::ActivationPolicy,
    /// The most memory this node offers the mesh, in all (`80MiB`, `2GiB`,
    /// or bytes): three quarters for the weights it may hold (what placement
    /// plans with), a quarter for its sessions' KV caches. Default: the
    /// memory available when it starts.
    #[arg(long, value_name = "SIZE", value_parser = crate::measure::parse_size)]
    pub max_memory: Option<u64>,
    /// This host's compute speed in GFLOP/s, announced instead of measured
    /// at start (placement sizes stages by it). For hosts whose speed is
    /// known: a probe run while the host is busy reads it as slow, and each
    /// restart would then move the plan.
    #[arg(long, value_name = "GFLOPS", value_parser = crate::measure::parse_gflops)]
    pub gflops: Option<f32>,
    /// Tokens one forward pass of a shard carries at most, over all the
    /// sessions batched into it (decode steps first, then prompt chunks).
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_batch_tokens: u32,
    /// Bytes of KV cache each shard's sessions may reserve together
    /// (`512MiB`, …). A session reserves its whole bound (prompt plus
    /// max_tokens) when it opens and keeps it to the end; one that does not
    /// fit waits for room (--queue-wait-secs). Default: a quarter of the
    /// memory offered (--max-memory), else of the memory available.
    #[arg(long, value_name = "SIZE", value_parser = crate::measure::parse_size)]
    pub kv_budget: Option<u64>,
    /// How long a new request waits for KV room on a full route before it is
    /// answered 429 with Retry-After.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub queue_wait_secs: u64,
    /// How requests entering here pick among the peers holding a hop's
    /// layers (whole replicas, stage copies): `bids` (the holders bid their
    /// expected completion), or the baselines `round-robin` and
    /// `least-queued` (by gossip), for comparisons.
    #[arg(long, value_name = "HOW", default_value = "bids")]
    pub hop_choice: fogmesh_actors::policy::HopChoice,
    /// HTTP connections open at once; more are closed on accept.
    #[arg(long, value_name = "N", default_value_t = crate::api::MAX_CONNECTIONS)]
    pub http_max_connections: usize,
}

/// The cluster secret (from `--secret`, `--secret-file`, `--private` or
/// the `--join` token, which must agree) and the invite joined with.
fn secret(args: &NodeArgs, dir: &std::path::Path) -> Result<(Option<libp2p::pnet::PreSharedKey>, Option<Invite>)> {
    let given = match (&args.secret, &args.secret_file) {
        (Some(s), _) => Some(keys::parse_secret(s)?),
        (None, Some(f)) => Some(keys::read_secret_file(f)?),
        (None, None) if args.private => Some(keys::load_or_create_secret(&dir.join(keys::SECRET_FILE))?),
        (None, None) => None,
    };
    let Some(token) = &args.join else { return Ok((given, None)) };
    let invite = Invite::decode(token).context("--join")?;
    let fp = |k: &libp2p::pnet::PreSharedKey| k.fingerprint().to_string();
    match (&given, invite.psk()) {
        (Some(g), Some(t)) if fp(g) != fp(&t) => bail!("--join: the token is for another cluster than the secret given"),
        (Some(_), None) => bail!("--join: the token is for an open mesh, but a cluster secret was given"),
        _ => {}
    }
    Ok((given.or(invite.psk()), Some(invite)))
}

/// Runs a peer until SIGINT or SIGTERM.
pub fn run_node(args: NodeArgs) -> Result<()> {
    if !(args.peer_ttl.is_finite() && (0.1..=3600.0).contains(&args.peer_ttl)) {
        bail!("--peer-ttl must be between 0.1 and 3600 seconds");
    }
    if !(1..=86_400).contains(&args.max_generation_secs) {
        bail!("--max-generation-secs must be between 1 and 86400");
    }
    if !(1..=65_536).contains(&args.http_max_connections) {
        bail!("--http-max-connections must be between 1 and 65536");
    }
    let dir = data_dir(&args.data_dir);
    let (secret, joined) = secret(&args, &dir)?;
    let api_key = match (&args.api_key, &args.api_key_file) {
        (Some(k), _) => Some(k.trim().to_string()),
        (None, Some(f)) => Some(keys::read_api_key_file(f)?),
        (None, None) => None,
    };
    if api_key.as_deref().is_some_and(str::is_empty) {
        bail!("the API key is empty");
    }
    for (flag, better) in [("--secret", "--secret-file FILE or FOGMESH_SECRET"), ("--join", "FOGMESH_JOIN")] {
        if std::env::args_os().any(|a| a == flag || a.to_string_lossy().starts_with(&format!("{flag}="))) {
            eprintln!("warning: {flag} on the command line is visible to every user of this host (ps); use {better}");
        }
    }
    let everywhere = args.listen.is_empty() || args.listen.iter().any(|a| !is_loopback(a));
    if secret.is_none() && everywhere {
        let msg = "open mesh: no cluster secret, so this node meets every open peer on the LAN by mDNS, and any host that can reach it can join and run its stages; `fogmesh node --private` starts a private cluster (see `fogmesh node --help`)";
        eprintln!("warning: {msg}");
        tracing::warn!("{msg}");
    }
    let keypair = keys::load_or_create_identity(&dir)?;
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let model = match &args.model {
        Some(p) => Some(resolve_node_model(p)?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async move {
        let http = tokio::net::TcpListener::bind(args.http).await.with_context(|| {
            format!("cannot serve HTTP on {} (in use? pass --http 127.0.0.1:0 for a free port)", args.http)
        })?;
        let http_addr = http.local_addr()?;
        let mut b = Mesh::builder()
            .keypair(keypair)
            .mdns(!args.no_mdns)
            .peer_ttl(Duration::from_secs_f64(args.peer_ttl))
            .peer_bounds(usize::from(args.target_peers), usize::from(args.max_peers));
        for a in &args.listen {
            b = b.listen(a.clone());
        }
        for a in &args.bootstrap {
            b = b.bootstrap(a.clone());
        }
        if let Some(i) = &joined {
            tracing::info!("joining with an {}", i.redacted());
            for a in &i.addrs {
                b = b.bootstrap(a.clone());
            }
        }
        if let Some(s) = secret {
            b = b.secret(s);
        }
        if let Some(t) = args.threads {
            b = b.threads(t);
        }
        b = b.activations(args.activations);
        b = b.max_batch_tokens(args.max_batch_tokens as usize);
        b = b.queue_wait(std::time::Duration::from_secs(args.queue_wait_secs)).hop_choice(args.hop_choice);
        if let Some(kv) = args.kv_budget {
            b = b.kv_budget(kv);
        }
        if let Some(m) = args.max_memory {
            b = b.max_memory(m);
        }
        if let Some(g) = args.gflops {
            b = b.gflops(g);
        }
        match &model {
            Some(NodeModel::File(m)) => b = b.model(m.clone()),
            Some(NodeModel::Mesh(m)) => b = b.model_from_mesh(m.clone()),
            None => {}
        }
        let chunks = args.chunk_dir.clone().unwrap_or_else(|| fogmesh_models::home_dir().join("chunks"));
        b = b.chunk_dir(chunks, args.chunk_cache).upload_rate(args.upload_rate.unwrap_or(0));
        if let Some(f) = std::env::var("FOGMESH_TEST_SLOWDOWN").ok().and_then(|v| v.parse::<f32>().ok()).filter(|f| *f > 1.0) {
            tracing::warn!(factor = f, "FOGMESH_TEST_SLOWDOWN: every forward pass is held this many times its length (a test hook)");
            b = b.compute_slowdown(f);
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
            model = %model.as_ref().map_or("none".to_string(), |m| m.to_string()),
            "fogmesh node started"
        );
        // The id other hosts serve this model under, once its manifest is
        // made (a read of the file, off the start-up path).
        if let Some(m) = mesh.model().cloned() {
            let rt = mesh.runtime().clone();
            tokio::spawn(async move {
                if let Ok(man) = rt.weights().manifest(m.hash, &m.source).await {
                    let hex = fogmesh_actors::protocols::hex;
                    let id = format!("sha256:{}@{}", hex(&m.hash), hex(&man.digest()));
                    tracing::info!(chunks = man.chunks.len(), "serving {}; hosts without the file can serve it with --model {id}", m.path.display());
                }
            });
        }
        if args.private {
            // Printed, never logged: the token carries the secret.
            let invite = handle.invite().await?;
            println!("private mesh; on the other hosts run: fogmesh node --join TOKEN (or FOGMESH_JOIN=TOKEN), TOKEN being the next line");
            println!("{}", invite.encode());
            tracing::info!("{} printed on stdout (`fogmesh invite` prints it again)", invite.redacted());
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = model.is_some().then(|| mesh.runtime().clone());
        let access = crate::api::Access { api_key, hosts: args.allow_host.clone() };
        let limits = crate::api::Limits {
            max_connections: args.http_max_connections,
            max_generation: Duration::from_secs(args.max_generation_secs),
            ..Default::default()
        };
        let server = tokio::spawn(crate::api::serve(http, handle.clone(), rt, access, limits, async move {
            let _ = stop_rx.await;
        }));
        // The first thing a new user gets wrong: peers that never meet.
        let lonely = {
            let (h, mdns, bootstrap) = (handle.clone(), !args.no_mdns, !args.bootstrap.is_empty() || joined.is_some());
            tokio::spawn(async move {
                tokio::time::sleep(NO_PEERS_HINT_AFTER).await;
                if h.peers().await.is_ok_and(|p| p.is_empty()) {
                    tracing::warn!("{}", no_peers_hint(NO_PEERS_HINT_AFTER, mdns, bootstrap));
                }
            })
        };
        let trims = tokio::spawn(crate::heap::trim_every(crate::heap::TRIM_EVERY));
        wait_for_signal().await;
        lonely.abort();
        trims.abort();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_no_peers_hint_says_what_to_try() {
        let h = no_peers_hint(Duration::from_secs(5), true, false);
        assert!(h.starts_with("no peers after 5 s") && h.contains("multicast") && h.contains("--bootstrap ADDR"), "{h}");
        assert!(no_peers_hint(Duration::from_secs(5), false, true).contains("cluster secret"));
    }
}
