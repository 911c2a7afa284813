//! One peer's actors and the glue between them and the network: it starts
//! the placement actor, starts sessions, and (in its rooms) keeps the shard
//! registry, routes inbound traffic and calls, and runs bids and auctions.
//! Each actor reaches the runtime only through its own narrow host trait
//! (`ShardHost`, `SessionHost`, `PlacementHost`), implemented in `hosts.rs`.
//!
//! Layout of the room: `registry.rs` (shards loaded here), `routing.rs`
//! (deliver, calls, session opens), `bidding.rs` (bids, auctions, load
//! report), `hosts.rs` (the actors' host traits over [`Runtime`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fogmesh_models::{GenerateRequest, ThreadPool};
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;

use crate::compute::Compute;
use crate::config::RuntimeConfig;
use crate::error::RuntimeError;
use crate::link::{MeshLink, PeerKey, PeerView};
use crate::model::ModelInfo;
use crate::placement::PlacementPeer;
use crate::placement_actor::{PlacementActor, PlacementHost, PlacementMsg};
use crate::policy::{self, Hop};
use crate::sched::{BidBook, SchedConfig, Scheduler};
use crate::session::{SessionActor, SessionEvent, SessionHost, SessionMsg};

mod bidding;
mod hosts;
mod registry;
mod routing;

pub use registry::ShardSlot;
pub use routing::error_frame;

/// A running generation: its events and its actor.
#[derive(Debug)]
pub struct GenerationHandle {
    /// Tokens, failovers, then `Done` or `Error`.
    pub events: mpsc::Receiver<SessionEvent>,
    /// The session actor (cancel with [`SessionMsg::Cancel`]).
    pub actor: ActorRef<SessionMsg>,
}

impl GenerationHandle {
    /// The next event; `None` after `Done` or `Error`.
    pub async fn next(&mut self) -> Option<SessionEvent> {
        self.events.recv().await
    }

    /// The events as a stream.
    pub fn into_stream(self) -> impl futures::Stream<Item = SessionEvent> + Send + 'static {
        futures::stream::unfold(self, |mut h| async move { h.events.recv().await.map(|e| (e, h)) })
    }

    /// Stops the generation everywhere.
    pub fn cancel(&self) {
        let _ = self.actor.cast(SessionMsg::Cancel("cancelled by the caller".into()));
    }
}

struct Inner {
    link: Arc<dyn MeshLink>,
    local: PeerKey,
    model: std::sync::OnceLock<Arc<ModelInfo>>,
    /// The chunk cache, chunks served and fetched.
    weights: Arc<crate::weights::Weights>,
    pool: Arc<ThreadPool>,
    cfg: RuntimeConfig,
    shards: tokio::sync::Mutex<Vec<ShardSlot>>,
    /// Held while a shard loads: one load at a time, without holding
    /// `shards` across it.
    loading: tokio::sync::Mutex<()>,
    /// Wire session id → the session served here and its hops.
    served: Mutex<HashMap<u64, Served>>,
    /// Wire session id → the local session actor that owns it.
    sessions: Mutex<HashMap<u64, ActorRef<SessionMsg>>>,
    placement: Mutex<Option<ActorRef<PlacementMsg>>>,
    next_id: AtomicU64,
    /// Auctions this peer runs for its sessions' hops.
    sched: Mutex<Scheduler>,
    /// Peer ids as the scheduler numbers them.
    sched_ids: Mutex<Vec<PeerKey>>,
    /// Bids this peer made that their owners have not yet decided on
    /// (keyed by owner and auction): their work counts in its other bids.
    bids: Mutex<BidBook<(PeerKey, u64)>>,
    /// The routes of this peer's finished sessions, by history: follow-ups
    /// prefer where their prefix is kept.
    affinity: Mutex<crate::policy::affinity::PrefixRoutes>,
    started: Instant,
    /// The compute thread (forward passes of every shard here).
    compute: Compute,
    /// What sends measure of each link; the encoding per hop.
    links: Arc<crate::links::LinkMeter>,
}

/// A session a shard of this peer serves, and who may talk to it about it:
/// stage requests only from `prev`, close and cancel only from `owner`,
/// forwarded stage errors only from `next`.
#[derive(Debug, Clone)]
struct Served {
    slot: ShardSlot,
    owner: PeerKey,
    /// The previous hop (the owner for the first stage).
    prev: PeerKey,
    next: Option<PeerKey>,
}

/// Open bids a peer tracks (beyond, the one whose lease ends first goes).
const OPEN_BIDS: usize = 1024;

/// One peer's actors; cheap to clone.
#[derive(Clone)]
pub struct Runtime(Arc<Inner>);

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("local", &self.0.local).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Runtime {
    /// Starts the runtime (and its placement actor when it holds a model).
    pub async fn start(
        link: Arc<dyn MeshLink>,
        model: Option<Arc<ModelInfo>>,
        cfg: RuntimeConfig,
    ) -> Result<Runtime, RuntimeError> {
        let local = link.local_peer();
        let cfg_bid_timeout = cfg.bid_timeout;
        let cfg_activations = cfg.activations;
        let seed = u64::from_le_bytes(rand::random::<[u8; 8]>()) >> 1;
        let weights = Arc::new(crate::weights::Weights::new(cfg.chunk_dir.clone(), cfg.chunk_cache_bytes).with_upload_rate(cfg.upload_rate));
        let rt = Runtime(Arc::new(Inner {
            link,
            local,
            model: std::sync::OnceLock::new(),
            weights,
            pool: Arc::new(ThreadPool::new(cfg.threads.max(1))),
            cfg,
            shards: tokio::sync::Mutex::new(Vec::new()),
            loading: tokio::sync::Mutex::new(()),
            served: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            placement: Mutex::new(None),
            next_id: AtomicU64::new(seed.max(1)),
            compute: Compute::start().map_err(|e| RuntimeError::Actor(format!("compute thread: {e}")))?,
            sched: Mutex::new(Scheduler::new(SchedConfig {
                auction_timeout_s: cfg_bid_timeout.as_secs_f64(),
                rtt_margin_s: bidding::BID_ANSWER_MARGIN.as_secs_f64(),
                ..SchedConfig::default()
            })),
            sched_ids: Mutex::new(Vec::new()),
            bids: Mutex::new(BidBook::new(OPEN_BIDS)),
            affinity: Mutex::new(Default::default()),
            started: Instant::now(),
            links: Arc::new(crate::links::LinkMeter::new(cfg_activations)),
        }));
        if let Some(m) = model {
            rt.adopt_model(m).await?;
        }
        Ok(rt)
    }

    /// Serves `model` from now on (a runtime started without one: its
    /// weights came from the mesh): placement starts; a whole file's
    /// manifest is computed ahead of the first peer asking for it.
    pub async fn adopt_model(&self, model: Arc<ModelInfo>) -> Result<(), RuntimeError> {
        if self.0.model.set(model.clone()).is_err() {
            return Err(RuntimeError::Invalid("this peer already serves a model".into()));
        }
        let (actor, _) = Actor::spawn(None, PlacementActor, Arc::new(self.clone()) as Arc<dyn PlacementHost>)
            .await
            .map_err(|e| RuntimeError::Actor(e.to_string()))?;
        *lock(&self.0.placement) = Some(actor);
        if matches!(model.source, crate::weights::WeightSource::File(_)) {
            let w = self.0.weights.clone();
            tokio::spawn(async move {
                if let Err(e) = w.manifest(model.hash, &model.source).await {
                    tracing::warn!(error = %e, "weights: no manifest of the model file; it is not served to peers");
                }
            });
        }
        Ok(())
    }

    /// Gets model `hash` from the peers that hold it (manifest, then header;
    /// the layers follow when placement gives this peer a range) and serves
    /// it. `trusted`: the manifest digest the model is known by, if any.
    pub async fn fetch_model(&self, hash: fogmesh_protocols::ModelHash, trusted: Option<[u8; 32]>, name: &str) -> Result<(), RuntimeError> {
        let (path, gguf, source) = self
            .0
            .weights
            .acquire(self.0.link.clone(), hash, trusted, name)
            .await
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let info = ModelInfo::from_gguf(&gguf, path, hash, source)?;
        tracing::info!(model = %fogmesh_protocols::hex(&hash), layers = info.config.layers, "model header fetched from the mesh; taking part in placement");
        self.adopt_model(Arc::new(info)).await
    }

    /// The chunk cache, and what was fetched and served.
    pub fn weights(&self) -> &crate::weights::Weights {
        &self.0.weights
    }

    /// The models this peer serves only in part, with the chunks it holds
    /// (gossiped so that peers fetch from it what it has).
    pub fn held_chunks(&self) -> Vec<fogmesh_protocols::HeldChunks> {
        match self.0.model.get().map(|m| &m.source) {
            Some(crate::weights::WeightSource::Chunks { store, .. }) => {
                vec![fogmesh_protocols::HeldChunks { model: store.manifest().model, bitmap: store.bitmap() }]
            }
            _ => Vec::new(),
        }
    }

    /// This peer's id.
    pub fn local_peer(&self) -> &str {
        &self.0.local
    }

    /// The runtime's configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.0.cfg
    }

    /// The model this peer holds.
    pub fn model(&self) -> Option<&Arc<ModelInfo>> {
        self.0.model.get()
    }

    /// The placement actor, if this peer holds a model.
    pub fn placement_actor(&self) -> Option<ActorRef<PlacementMsg>> {
        lock(&self.0.placement).clone()
    }

    /// A fresh id (sessions, requests).
    pub fn next_id(&self) -> u64 {
        self.0.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The view placement works from: connected peers plus this one.
    pub async fn view(&self) -> Vec<PeerView> {
        let mut v = self.0.link.view().await;
        v.retain(|p| p.peer != self.0.local);
        if let Some(m) = self.0.model.get() {
            let shards = self.shards().await;
            v.push(PeerView {
                peer: self.0.local.clone(),
                gflops: self.0.cfg.gflops,
                memory_bytes: self.0.cfg.memory_bytes,
                models: vec![m.hash],
                shards: shards.iter().map(|s| (s.range.start as u32, s.range.end as u32)).collect(),
                queued: shards.iter().map(|s| s.queued.len() as u32).sum(),
                rtt_ms: Some(0.0),
                partial: self.held_chunks(),
            });
        }
        v
    }

    /// The preferred route placement gives for this peer's model, leaving
    /// out `excluded`.
    pub async fn route(&self, excluded: &[PeerKey]) -> Result<Vec<Hop>, RuntimeError> {
        Ok(self.routes(excluded).await?.into_iter().next().unwrap_or_default())
    }

    /// Every route placement gives for this peer's model (whole replicas and
    /// pipelines, the preferred first), leaving out `excluded`.
    pub async fn routes(&self, excluded: &[PeerKey]) -> Result<Vec<Vec<Hop>>, RuntimeError> {
        let model = self.0.model.get().ok_or(RuntimeError::NoModel)?;
        let view = self.view().await;
        let cands: Vec<PlacementPeer> = policy::candidates_for(&view, model, excluded, self.0.cfg.memory_cap);
        policy::routes(&model.costs, &cands).map_err(|e| RuntimeError::NoRoute(e.to_string()))
    }

    /// This peer's links as its sends measured them, and the activation
    /// frames it sent by encoding.
    pub fn links(&self) -> &crate::links::LinkMeter {
        &self.0.links
    }

    /// Ids of the sessions a shard of this peer serves (diagnostics, tests).
    pub fn served_sessions(&self) -> Vec<u64> {
        lock(&self.0.served).keys().copied().collect()
    }

    /// Tells every session owned here that `peer` is gone (its connection
    /// closed); those routed through it fail over now.
    pub fn peer_lost(&self, peer: &str) {
        for a in lock(&self.0.sessions).values() {
            let _ = a.cast(SessionMsg::PeerLost(peer.to_string()));
        }
    }

    /// Starts a generation owned by this peer.
    pub async fn generate(&self, req: GenerateRequest) -> Result<GenerationHandle, RuntimeError> {
        let model = self.0.model.get().cloned().ok_or(RuntimeError::NoModel)?;
        req.validate(&model.config).map_err(|e| RuntimeError::Invalid(e.message))?;
        let (tx, rx) = mpsc::channel(self.0.cfg.event_capacity.max(1));
        let (actor, _) = Actor::spawn(None, SessionActor, (Arc::new(self.clone()) as Arc<dyn SessionHost>, model, req, tx))
            .await
            .map_err(|e| RuntimeError::Actor(e.to_string()))?;
        Ok(GenerationHandle { events: rx, actor })
    }

    /// Stops every actor of this runtime.
    pub async fn shutdown(&self) {
        if let Some(p) = lock(&self.0.placement).take() {
            p.stop(None);
        }
        let sessions: Vec<_> = lock(&self.0.sessions).drain().map(|(_, a)| a).collect();
        for a in sessions {
            a.stop(None);
        }
        lock(&self.0.served).clear();
        for s in self.0.shards.lock().await.drain(..) {
            s.actor.stop(None);
        }
    }
}
