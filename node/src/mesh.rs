//! The embeddable mesh: a libp2p peer plus its actors; `netlink.rs`: the
//! actors' `MeshLink` over the swarm.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogmesh_actors::{
    GenerateRequest, GenerationHandle, Hop, ModelInfo, Runtime,
    RuntimeConfig, RuntimeError,
};
use fogmesh_protocols::ModelHash;
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::Semaphore;

use crate::measure::SelfMeasurement;
use crate::net::{self, NetConfig};
mod netlink;
pub use netlink::NetLink;
use netlink::{MAX_STAGE_STREAMS_PER_PEER, PeerStreams};
pub use crate::net::dialer::is_loopback;
pub use crate::net::invite::{Invite, InviteError};
pub use crate::net::reach::{LinkKind, Nat};
pub use crate::net::{NetError, NetHandle, NodeStatus, PeerInfo, keys};

/// Why a mesh peer could not start or do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The model file named to the builder is not there.
    #[error("model file {0} does not exist")]
    NoModelFile(PathBuf),
    /// The model file could not be read (hashing or its header).
    #[error("reading {path}: {reason}")]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The network could not start, or has stopped.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The actors refused (no model, no route, an invalid request).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The model engine failed (tokenizing, the chat template).
    #[error(transparent)]
    Model(#[from] fogmesh_models::ModelError),
    /// No plan over enough peers formed in time.
    #[error(
        "no plan over {stages} peers after {timeout:?}: are the peers on one LAN? is multicast blocked? try --bootstrap ADDR"
    )]
    NoPlan {
        /// The stages waited for.
        stages: usize,
        /// How long it waited.
        timeout: Duration,
    },
    /// A start-up task of this peer failed.
    #[error("start-up task failed: {0}")]
    Task(String),
}

/// What [`Mesh`] returns.
pub type Result<T, E = MeshError> = std::result::Result<T, E>;

/// Inbound calls served at once.
const MAX_INBOUND_CALLS: usize = 64;
/// Inbound stage streams open at once, from all peers.
const MAX_STAGE_STREAMS: usize = 512;
/// An inbound stage stream with no frame for this long is closed, giving
/// its slot back (the sender opens a new one when it next has traffic).
const STAGE_STREAM_IDLE: Duration = Duration::from_secs(300);

/// Options of a mesh peer; [`Mesh::builder`] starts here.
#[derive(Debug, Clone)]
pub struct MeshBuilder {
    model: Option<PathBuf>,
    model_hash: Option<ModelHash>,
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    secret: Option<PreSharedKey>,
    mdns: bool,
    keypair: Option<Keypair>,
    peer_ttl: Option<Duration>,
    peer_bounds: Option<(usize, usize)>,
    runtime: RuntimeConfig,
    measurement: Option<SelfMeasurement>,
    gflops: Option<f32>,
    max_memory: Option<u64>,
    from_mesh: Option<MeshModel>,
}

/// A model this peer gets from the mesh instead of a file.
#[derive(Debug, Clone)]
pub struct MeshModel {
    /// The SHA-256 of its file.
    pub hash: ModelHash,
    /// The digest of its manifest, when known (the catalogue's models).
    pub manifest: Option<[u8; 32]>,
    /// The name it is served under (a file name).
    pub name: String,
}

/// A running mesh peer: the swarm, its membership view and its actors.
pub struct Mesh {
    handle: NetHandle,
    runtime: Runtime,
    listen_addrs: Vec<Multiaddr>,
    measurement: SelfMeasurement,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    net_task: Option<net::NetTask>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("peer", &self.handle.local_peer_id()).finish()
    }
}

impl MeshBuilder {
    /// Serve (and place) this GGUF model; its SHA-256 is computed unless
    /// given with [`MeshBuilder::model_hash`].
    pub fn model(mut self, path: impl Into<PathBuf>) -> Self {
        self.model = Some(path.into());
        self
    }

    /// The model's SHA-256, when already known.
    pub fn model_hash(mut self, hash: ModelHash) -> Self {
        self.model_hash = Some(hash);
        self
    }

    /// Listen on this address (repeatable; default: a free TCP port on all
    /// IPv4 interfaces).
    pub fn listen(mut self, addr: Multiaddr) -> Self {
        self.listen.push(addr);
        self
    }

    /// Join through this peer (repeatable).
    pub fn bootstrap(mut self, addr: Multiaddr) -> Self {
        self.bootstrap.push(addr);
        self
    }

    /// The cluster secret.
    pub fn secret(mut self, key: PreSharedKey) -> Self {
        self.secret = Some(key);
        self
    }

    /// Discover LAN peers by mDNS (default on).
    pub fn mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }

    /// The peer's identity (default: a fresh one).
    pub fn keypair(mut self, k: Keypair) -> Self {
        self.keypair = Some(k);
        self
    }

    /// How long an unconnected peer stays in the view.
    pub fn peer_ttl(mut self, ttl: Duration) -> Self {
        self.peer_ttl = Some(ttl);
        self
    }

    /// Peers this node dials on its own, and connected peers above which
    /// it closes idle connections (defaults 6 and 16).
    pub fn peer_bounds(mut self, target: usize, max: usize) -> Self {
        self.peer_bounds = Some((target, max.max(target)));
        self
    }

    /// Compute threads of this peer.
    pub fn threads(mut self, n: usize) -> Self {
        self.runtime.threads = n.max(1);
        self
    }

    /// How activations are encoded on the hops this peer sends.
    pub fn activations(mut self, policy: fogmesh_actors::links::ActivationPolicy) -> Self {
        self.runtime.activations = policy;
        self
    }

    /// Every runtime tunable (queues, caches, deadlines, bans).
    pub fn runtime_config(mut self, cfg: RuntimeConfig) -> Self {
        self.runtime = cfg;
        self
    }

    /// Tokens one forward pass of a shard carries at most (continuous
    /// batching).
    pub fn max_batch_tokens(mut self, n: usize) -> Self {
        self.runtime.max_batch_tokens = n.max(1);
        self
    }

    /// Bytes of KV cache each shard's sessions may reserve together
    /// (`--kv-budget`); by default a quarter of the memory offered.
    pub fn kv_budget(mut self, bytes: u64) -> Self {
        self.runtime.cache_budget_bytes = usize::try_from(bytes).unwrap_or(usize::MAX).max(1);
        self
    }

    /// How sessions owned here pick among a hop's holders (`--hop-choice`).
    pub fn hop_choice(mut self, how: fogmesh_actors::policy::HopChoice) -> Self {
        self.runtime.hop_choice = how;
        self
    }

    /// How long a new session waits for room on a full route before it
    /// gives up as busy (HTTP 429).
    pub fn queue_wait(mut self, wait: Duration) -> Self {
        self.runtime.open_wait = wait;
        self
    }

    /// Offer at most `bytes` of memory in all (`--max-memory`): three
    /// quarters for weights (what placement plans with, as gossiped), one
    /// quarter for the KV caches of the sessions served here.
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.max_memory = Some(bytes);
        self
    }

    /// Serve a model this peer does not hold: its manifest and header come
    /// from the peers that hold it, then only the chunks of the layers
    /// placement gives this peer (into the chunk cache, [`MeshBuilder::chunk_dir`]).
    pub fn model_from_mesh(mut self, m: MeshModel) -> Self {
        self.from_mesh = Some(m);
        self
    }

    /// Where chunks of models fetched from peers are kept, and the most
    /// bytes kept there (default: none; a peer without a chunk cache fetches
    /// nothing).
    pub fn chunk_dir(mut self, dir: impl Into<PathBuf>, budget: u64) -> Self {
        self.runtime.chunk_dir = Some(dir.into());
        self.runtime.chunk_cache_bytes = budget;
        self
    }

    /// Test hook: each forward pass holds the compute thread `factor`
    /// times as long as it took, so one host can play a slower device
    /// (`FOGMESH_TEST_SLOWDOWN` for `fogmesh node`).
    pub fn compute_slowdown(mut self, factor: f32) -> Self {
        self.runtime.compute_slowdown = factor;
        self
    }

    /// Upload model chunks to peers at most this fast (bytes per second; 0:
    /// no bound).
    pub fn upload_rate(mut self, bytes_per_s: u64) -> Self {
        self.runtime.upload_rate = bytes_per_s;
        self
    }

    /// Use this self-measurement instead of probing the host (tests).
    pub fn measurement(mut self, m: SelfMeasurement) -> Self {
        self.measurement = Some(m);
        self
    }

    /// Announce this compute speed (GFLOP/s) instead of measuring it at
    /// start: for hosts whose speed is known, so that a restart under load
    /// (which a probe would read as a slow host) does not move the plan.
    pub fn gflops(mut self, gflops: f32) -> Self {
        self.gflops = Some(gflops);
        self
    }

    /// Starts the peer: network, actors, and the loops feeding them.
    pub async fn start(self) -> Result<Mesh> {
        let measurement = match (self.measurement, self.gflops) {
            (Some(m), _) => m,
            (None, Some(g)) => SelfMeasurement::with_speed(g),
            (None, None) => tokio::task::spawn_blocking(|| SelfMeasurement::measure(Duration::from_millis(200)))
                .await
                .map_err(|e| MeshError::Task(e.to_string()))?,
        };
        let mut measurement = measurement;
        let mut runtime_cfg = self.runtime.clone();
        if let Some(offer) = self.max_memory {
            let offer = if measurement.memory_bytes == 0 { offer } else { offer.min(measurement.memory_bytes) };
            measurement.memory_bytes = offer - offer / 4;
            if runtime_cfg.cache_budget_bytes == 0 {
                runtime_cfg.cache_budget_bytes = usize::try_from(offer / 4).unwrap_or(usize::MAX).max(1);
            }
        }
        if self.model.is_some() && self.from_mesh.is_some() {
            return Err(MeshError::Task("a model file and a model from the mesh were both given".into()));
        }
        let model = match &self.model {
            None => None,
            Some(p) => {
                if !p.is_file() {
                    return Err(MeshError::NoModelFile(p.clone()));
                }
                let bad = |reason: String| MeshError::ModelFile { path: p.clone(), reason };
                let hash = match self.model_hash {
                    Some(h) => h,
                    None => {
                        let p2 = p.clone();
                        tokio::task::spawn_blocking(move || crate::fetch::sha256_digest(&p2, false))
                            .await
                            .map_err(|e| MeshError::Task(e.to_string()))?
                            .map_err(|e| bad(e.to_string()))?
                    }
                };
                let p2 = p.clone();
                let info = tokio::task::spawn_blocking(move || ModelInfo::open(&p2, hash))
                    .await
                    .map_err(|e| MeshError::Task(e.to_string()))?
                    .map_err(|e| bad(e.to_string()))?;
                Some(Arc::new(info))
            }
        };
        let mut cfg = NetConfig::new(self.keypair.unwrap_or_else(Keypair::generate_ed25519), measurement.clone());
        cfg.listen = self.listen;
        cfg.bootstrap = self.bootstrap;
        cfg.secret = self.secret;
        cfg.mdns = self.mdns;
        if let Some(t) = self.peer_ttl {
            cfg.peer_ttl = t;
        }
        if let Some((target, max)) = self.peer_bounds {
            (cfg.target_peers, cfg.max_peers) = (target, max);
        }
        cfg.models = model.iter().map(|m| m.hash).collect();
        let net = net::start(cfg).await?;
        let handle = net.handle.clone();
        let link = Arc::new(NetLink::new(handle.clone()));
        let mut rcfg = runtime_cfg;
        rcfg.gflops = measurement.gflops;
        rcfg.memory_bytes = measurement.memory_bytes;
        let runtime = Runtime::start(link, model, rcfg).await?;
        let net::Net { mut inbound, listen_addrs, task, .. } = net;
        let mut tasks = Vec::new();
        // Calls: answered concurrently, at most MAX_INBOUND_CALLS at once.
        let rt = runtime.clone();
        tasks.push(tokio::spawn(async move {
            let limit = Arc::new(Semaphore::new(MAX_INBOUND_CALLS));
            while let Some(req) = inbound.recv().await {
                let Ok(permit) = limit.clone().acquire_owned().await else { break };
                let rt = rt.clone();
                tokio::spawn(async move {
                    let peer = req.peer.to_string();
                    let reply = rt.handle_call(&peer, req.message.clone()).await;
                    req.respond(reply);
                    drop(permit);
                });
            }
        }));
        // Stage streams: one reader task per stream, at most
        // MAX_STAGE_STREAMS_PER_PEER per peer and MAX_STAGE_STREAMS in all
        // (beyond, a new stream is dropped at once).
        if let Some(mut incoming) = handle.accept_stage_streams() {
            let rt = runtime.clone();
            tasks.push(tokio::spawn(async move {
                let total = Arc::new(Semaphore::new(MAX_STAGE_STREAMS));
                let per_peer: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
                while let Some(mut s) = incoming.next().await {
                    let from = s.peer();
                    let Ok(permit) = total.clone().try_acquire_owned() else {
                        tracing::debug!(peer = %from, "stage stream refused: {MAX_STAGE_STREAMS} open");
                        continue;
                    };
                    let Some(slot) = PeerStreams::take(&per_peer, from) else {
                        tracing::debug!(peer = %from, "stage stream refused: {MAX_STAGE_STREAMS_PER_PEER} open from this peer");
                        continue;
                    };
                    let rt = rt.clone();
                    tokio::spawn(async move {
                        let _held = (permit, slot);
                        let peer = s.peer().to_string();
                        loop {
                            let Ok(got) = tokio::time::timeout(STAGE_STREAM_IDLE, s.recv()).await else {
                                tracing::debug!(peer, "stage stream idle for {} s; closed", STAGE_STREAM_IDLE.as_secs());
                                break;
                            };
                            match got {
                                Ok(m) => rt.deliver(&peer, m).await,
                                Err(e) => {
                                    if e.kind() != std::io::ErrorKind::UnexpectedEof {
                                        tracing::debug!(peer, error = %e, "stage stream closed");
                                    }
                                    break;
                                }
                            }
                        }
                    });
                }
            }));
        }
        // A peer whose last connection closed: sessions routed through it
        // fail over at once instead of waiting for their deadline.
        let (rt, mut lost) = (runtime.clone(), handle.subscribe_lost());
        tasks.push(tokio::spawn(async move {
            loop {
                match lost.recv().await {
                    Ok(p) => rt.peer_lost(&p.to_string()),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
        }));
        // Gossip this peer's shards, and the models (and chunks) it
        // serves, every couple of seconds (a second at first, while a
        // fetched model's chunks come in).
        let (rt, h) = (runtime.clone(), handle.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let report = rt.load_report().await;
                if h.set_load(report.shards).await.is_err() {
                    break;
                }
                let models = rt.model().map(|m| vec![m.hash]).unwrap_or_default();
                if h.set_models(models, rt.held_chunks()).await.is_err() {
                    break;
                }
                let fetching = rt.weights().progress().status().is_some_and(|f| f.state == "fetching");
                tokio::time::sleep(Duration::from_secs(if fetching { 1 } else { 2 })).await;
            }
        }));
        // A model from the mesh: its manifest and header, then placement.
        if let Some(m) = self.from_mesh {
            // Beyond the LAN, holders are found through their provider
            // records, until the model is had.
            let (rt, h, hash) = (runtime.clone(), handle.clone(), m.hash);
            tasks.push(tokio::spawn(async move {
                while rt.model().is_none() {
                    if h.find_holders(hash).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }));
            let rt = runtime.clone();
            tasks.push(tokio::spawn(async move {
                tracing::info!(model = %fogmesh_protocols::hex(&m.hash), "getting the model from the peers that hold it");
                if let Err(e) = rt.fetch_model(m.hash, m.manifest, &m.name).await {
                    tracing::error!(error = %e, "the model could not be had from the mesh; this node serves no model");
                }
            }));
        }
        Ok(Mesh { handle, runtime, listen_addrs, measurement, tasks, net_task: Some(task) })
    }
}

impl Mesh {
    /// Options with defaults: no model, mDNS on, a fresh identity.
    pub fn builder() -> MeshBuilder {
        MeshBuilder {
            model: None,
            model_hash: None,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            secret: None,
            mdns: true,
            keypair: None,
            peer_ttl: None,
            peer_bounds: None,
            runtime: RuntimeConfig::default(),
            measurement: None,
            gflops: None,
            max_memory: None,
            from_mesh: None,
        }
    }

    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        self.handle.local_peer_id()
    }

    /// Addresses it listens on.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// What it measured about its host.
    pub fn measurement(&self) -> &SelfMeasurement {
        &self.measurement
    }

    /// The network handle (view, status, raw requests).
    pub fn net(&self) -> &NetHandle {
        &self.handle
    }

    /// The actors: shard, session and placement actor refs live here.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The model this peer serves.
    pub fn model(&self) -> Option<&Arc<ModelInfo>> {
        self.runtime.model()
    }

    /// The current route (placement plan) over the mesh.
    pub async fn plan(&self) -> Result<Vec<Hop>> {
        Ok(self.runtime.route(&[]).await?)
    }

    /// Waits until placement uses `stages` peers (or `timeout` passes).
    pub async fn wait_for_stages(&self, stages: usize, timeout: Duration) -> Result<Vec<Hop>> {
        let start = std::time::Instant::now();
        loop {
            if let Ok(plan) = self.runtime.route(&[]).await
                && plan.len() >= stages
            {
                return Ok(plan);
            }
            if start.elapsed() > timeout {
                return Err(MeshError::NoPlan { stages, timeout });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a generation owned by this peer; read its events.
    pub async fn generate(&self, req: GenerateRequest) -> Result<GenerationHandle> {
        Ok(self.runtime.generate(req).await?)
    }

    /// Starts a chat generation: `message` goes through the model's chat
    /// template as the user's turn.
    pub async fn chat(&self, message: &str, max_tokens: usize, sampling: fogmesh_models::SamplingParams) -> Result<GenerationHandle> {
        let model = self.model().ok_or(RuntimeError::NoModel)?;
        let prompt = model.tokenizer.encode_chat(&[fogmesh_models::ChatMessage::new("user", message)])?;
        self.generate(GenerateRequest { prompt, max_tokens, sampling, stop: Vec::new() }).await
    }

    /// Stops the actors and the network.
    pub async fn shutdown(mut self) {
        self.runtime.shutdown().await;
        self.handle.shutdown().await;
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(t) = self.net_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t.join()).await;
        }
    }
}
