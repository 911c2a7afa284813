//! One peer's actors and the glue between them and the network: it routes
//! inbound stage traffic to shard and session actors, answers calls, loads
//! shards on demand and starts sessions.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fogmesh_models::gguf::Gguf;
use futures::StreamExt;
use fogmesh_models::{LlamaConfig, ModelProfile, SamplingParams, Shard, ThreadPool, Tokenizer};
use fogmesh_protocols::{
    Award, Bid, CallForBids, ErrorCode, ErrorFrame, Limits, LoadReport, Message, ModelHash, SessionOpen, ShardAdvert, ShardLoad, StageError,
    StageOutcome, StageReply,
};
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;

use crate::link::{LinkError, MeshLink, PeerKey, PeerView};
use crate::placement::{ModelCosts, PlacementPeer};
use crate::sched::{
    Action as SchedAction, BidBook, LoadReport as SchedLoadReport, Quote as SchedQuote, SchedConfig, Scheduler,
    TaskSpec as SchedTask,
};
use crate::placement_actor::{PlacementActor, PlacementMsg};
use crate::policy::{self, Deadlines, Hop};
use crate::session::{SessionActor, SessionEvent, SessionMsg};
use crate::shard_actor::{ShardActor, ShardArgs, ShardMsg, ShardStatus};

/// A model file this peer holds, and what was read from it.
#[derive(Debug)]
pub struct ModelInfo {
    /// Where it is.
    pub path: PathBuf,
    /// Its SHA-256.
    pub hash: ModelHash,
    /// Its architecture.
    pub config: LlamaConfig,
    /// Its tokenizer and chat template.
    pub tokenizer: Arc<Tokenizer>,
    /// Per-layer costs (placement).
    pub costs: ModelCosts,
}

impl ModelInfo {
    /// Reads the file's directory (not its weights). `hash` is its SHA-256.
    pub fn open(path: &Path, hash: ModelHash) -> fogmesh_models::Result<Self> {
        let g = Gguf::open(path)?;
        let config = LlamaConfig::from_gguf(&g)?;
        let tokenizer = Arc::new(Tokenizer::from_gguf(&g)?);
        let costs = ModelCosts::from_profile(&ModelProfile::from_gguf(&g)?);
        Ok(ModelInfo { path: path.to_path_buf(), hash, config, tokenizer, costs })
    }
}

/// Tunables of a peer's runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Compute threads (shared by this peer's shards).
    pub threads: usize,
    /// This peer's speed and memory as placement sees it (what it gossips).
    pub gflops: f32,
    /// Free memory this peer reports.
    pub memory_bytes: u64,
    /// Caps the memory placement plans on any peer (0 = as reported).
    pub memory_cap: u64,
    /// Sessions one shard keeps caches for; the least recently used goes.
    pub max_sessions_per_shard: usize,
    /// A session cache untouched this long is dropped.
    pub session_ttl: Duration,
    /// Stage requests waiting per shard before new ones are refused (BUSY).
    pub max_queue: usize,
    /// Layer ranges this peer keeps loaded at most.
    pub max_shards: usize,
    /// Keep standby replicas: the ranges this peer would serve if one other
    /// peer were lost, while they fit in `max_shards` and half the free memory.
    pub standby_shards: bool,
    /// Prompt tokens per pipeline chunk.
    pub prefill_chunk: usize,
    /// How long a step may take before its hops are probed.
    pub deadlines: Deadlines,
    /// A session gives up after this many failovers.
    pub max_failovers: u32,
    /// First ban of a failed peer (doubles on repeat).
    pub ban_base: Duration,
    /// Longest ban.
    pub ban_max: Duration,
    /// How long a probe of a silent hop may take.
    pub probe_timeout: Duration,
    /// How often placement looks at the view.
    pub placement_interval: Duration,
    /// Bounds on decoded activations.
    pub limits: Limits,
    /// How long a session waits for bids from the holders of a range.
    pub bid_timeout: Duration,
    /// Events buffered per generation before the session waits for its caller.
    pub event_capacity: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gflops: 1.0,
            memory_bytes: 1 << 30,
            memory_cap: 0,
            max_sessions_per_shard: 64,
            session_ttl: Duration::from_secs(600),
            max_queue: 256,
            max_shards: 4,
            standby_shards: true,
            prefill_chunk: 64,
            deadlines: Deadlines::default(),
            max_failovers: 6,
            ban_base: Duration::from_secs(2),
            ban_max: Duration::from_secs(60),
            probe_timeout: Duration::from_millis(800),
            placement_interval: Duration::from_secs(1),
            limits: Limits::default(),
            bid_timeout: Duration::from_millis(150),
            event_capacity: 256,
        }
    }
}

/// Why the runtime refused something.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// This peer has no model file.
    #[error("this peer serves no model")]
    NoModel,
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No route can be formed.
    #[error("no route: {0}")]
    NoRoute(String),
    /// The model engine failed.
    #[error(transparent)]
    Model(#[from] fogmesh_models::ModelError),
    /// An actor could not be started or reached.
    #[error("actor: {0}")]
    Actor(String),
}

/// A loaded layer range on this peer.
#[derive(Debug, Clone)]
pub struct ShardSlot {
    /// Its layers.
    pub range: Range<usize>,
    /// Its actor.
    pub actor: ActorRef<ShardMsg>,
    /// Stage requests delivered but not yet taken up.
    pub queued: Arc<AtomicUsize>,
    /// Bytes of weights it holds.
    pub memory_bytes: usize,
    /// Measured compute time per token (EWMA, microseconds; 0 = none yet).
    pub us_per_token: Arc<AtomicU64>,
    /// Tokens processed since load.
    pub tokens: Arc<AtomicU64>,
    /// The last (time, tokens) sample the load report's rate is taken from.
    rate: Arc<Mutex<(Instant, u64)>>,
}

impl ShardSlot {
    /// Tokens per second since the previous call (the gossiped rate).
    pub fn tokens_per_s(&self) -> f32 {
        let now = Instant::now();
        let total = self.tokens.load(Ordering::Relaxed);
        let mut last = lock(&self.rate);
        let dt = now.duration_since(last.0).as_secs_f64();
        let rate = if dt > 0.0 { total.saturating_sub(last.1) as f64 / dt } else { 0.0 };
        *last = (now, total);
        rate as f32
    }
}

/// What a caller asks to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
}

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
    model: Option<Arc<ModelInfo>>,
    pool: Arc<ThreadPool>,
    cfg: RuntimeConfig,
    shards: tokio::sync::Mutex<Vec<ShardSlot>>,
    /// Wire session id → (shard holding it here, the session's owner).
    served: Mutex<HashMap<u64, (ShardSlot, PeerKey)>>,
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
    started: Instant,
    /// The compute thread's queue (forward passes of every shard here).
    compute: std::sync::mpsc::SyncSender<ComputeJob>,
}

type ComputeJob = Box<dyn FnOnce() + Send>;

/// Open bids a peer tracks (beyond, the one whose lease ends first goes).
const OPEN_BIDS: usize = 1024;
/// A bid holds its work at most this long, whatever the call's deadline.
const MAX_BID_LEASE: Duration = Duration::from_secs(10);

/// Forward passes wait here at most (beyond: BUSY).
const COMPUTE_QUEUE: usize = 1024;

/// One long-lived thread runs every forward pass of this peer: the shards'
/// thread pool serializes them anyway, and staying on one thread (which the
/// OS keeps on one core) keeps caches warm, unlike a hop through tokio's
/// blocking pool per pass.
fn compute_thread() -> std::io::Result<std::sync::mpsc::SyncSender<ComputeJob>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<ComputeJob>(COMPUTE_QUEUE);
    std::thread::Builder::new().name("fogmesh-compute".into()).spawn(move || {
        while let Ok(job) = rx.recv() {
            // A panicking pass drops its reply sender: its caller hears of it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    })?;
    Ok(tx)
}

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

/// The error frame answering a call that failed.
pub fn error_frame(code: u16, message: impl Into<String>) -> Message {
    Message::Error(ErrorFrame { request: 0, code, message: message.into() })
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
        let seed = u64::from_le_bytes(rand::random::<[u8; 8]>()) >> 1;
        let rt = Runtime(Arc::new(Inner {
            link,
            local,
            model,
            pool: Arc::new(ThreadPool::new(cfg.threads.max(1))),
            cfg,
            shards: tokio::sync::Mutex::new(Vec::new()),
            served: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            placement: Mutex::new(None),
            next_id: AtomicU64::new(seed.max(1)),
            compute: compute_thread().map_err(|e| RuntimeError::Actor(format!("compute thread: {e}")))?,
            sched: Mutex::new(Scheduler::new(SchedConfig { auction_timeout_s: cfg_bid_timeout.as_secs_f64(), ..SchedConfig::default() })),
            sched_ids: Mutex::new(Vec::new()),
            bids: Mutex::new(BidBook::new(OPEN_BIDS)),
            started: Instant::now(),
        }));
        if rt.0.model.is_some() {
            let (actor, _) = Actor::spawn(None, PlacementActor, rt.clone())
                .await
                .map_err(|e| RuntimeError::Actor(e.to_string()))?;
            *lock(&rt.0.placement) = Some(actor);
        }
        Ok(rt)
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
        self.0.model.as_ref()
    }

    /// The placement actor, if this peer holds a model.
    pub fn placement_actor(&self) -> Option<ActorRef<PlacementMsg>> {
        lock(&self.0.placement).clone()
    }

    /// The shards loaded here.
    pub async fn shards(&self) -> Vec<ShardSlot> {
        self.0.shards.lock().await.clone()
    }

    /// Status of every shard loaded here.
    pub async fn shard_status(&self) -> Vec<ShardStatus> {
        let mut out = Vec::new();
        for s in self.shards().await {
            if let Ok(ractor::rpc::CallResult::Success(st)) =
                s.actor.call(ShardMsg::Status, Some(Duration::from_secs(2))).await
            {
                out.push(st);
            }
        }
        out
    }

    /// Runs `f` on this peer's compute thread and waits for it.
    pub(crate) async fn compute<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: ComputeJob = Box::new(move || {
            let _ = tx.send(f());
        });
        self.0.compute.try_send(job).map_err(|_| "the compute queue is full".to_string())?;
        rx.await.map_err(|_| "the forward pass panicked".to_string())
    }

    /// A fresh id (sessions, requests).
    pub fn next_id(&self) -> u64 {
        self.0.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The view placement works from: connected peers plus this one.
    pub async fn view(&self) -> Vec<PeerView> {
        let mut v = self.0.link.view().await;
        v.retain(|p| p.peer != self.0.local);
        if let Some(m) = &self.0.model {
            let shards = self.shards().await;
            v.push(PeerView {
                peer: self.0.local.clone(),
                gflops: self.0.cfg.gflops,
                memory_bytes: self.0.cfg.memory_bytes,
                models: vec![m.hash],
                shards: shards.iter().map(|s| (s.range.start as u32, s.range.end as u32)).collect(),
                queued: shards.iter().map(|s| s.queued.load(Ordering::Relaxed) as u32).sum(),
                rtt_ms: Some(0.0),
            });
        }
        v
    }

    /// The route placement gives for this peer's model, leaving out `excluded`.
    pub async fn route(&self, excluded: &[PeerKey]) -> Result<Vec<Hop>, RuntimeError> {
        let model = self.0.model.as_ref().ok_or(RuntimeError::NoModel)?;
        let view = self.view().await;
        let cands: Vec<PlacementPeer> = policy::candidates(&view, &model.hash, excluded, self.0.cfg.memory_cap);
        policy::route(&model.costs, &cands).map_err(|e| RuntimeError::NoRoute(e.to_string()))
    }

    /// Sends stage traffic to `peer` (delivered in-process when it is us).
    pub async fn send(&self, peer: &str, msg: Message) -> Result<(), LinkError> {
        if peer == self.0.local {
            Box::pin(self.deliver(peer, msg)).await;
            Ok(())
        } else {
            self.0.link.send(peer, msg).await
        }
    }

    /// Calls `peer` (answered in-process when it is us).
    pub async fn call(&self, peer: &str, msg: Message) -> Result<Message, LinkError> {
        if peer == self.0.local { Ok(Box::pin(self.handle_call(peer, msg)).await) } else { self.0.link.call(peer, msg).await }
    }

    /// Reports a failed stage request to whoever should hear of it.
    pub(crate) async fn report(&self, to: &str, request: u64, err: StageError) {
        let msg = Message::StageReply(StageReply { request, outcome: StageOutcome::Error(err) });
        if let Err(e) = self.send(to, msg).await {
            tracing::debug!(peer = to, error = %e, "could not report a stage error");
        }
    }

    /// Stage traffic from `from`.
    pub async fn deliver(&self, from: &str, msg: Message) {
        match msg {
            Message::StageRequest(req) => {
                tracing::trace!(session = req.session, step = req.step, stage = req.stage, "stage request in");
                let slot = lock(&self.0.served).get(&req.session).cloned();
                let Some((slot, owner)) = slot else {
                    let err = StageError {
                        session: req.session,
                        peer: self.0.local.clone(),
                        code: ErrorCode::UNKNOWN_SESSION,
                        reason: format!("session {} is not open on {}", req.session, self.0.local),
                    };
                    self.report(from, req.request, err).await;
                    return;
                };
                if slot.queued.load(Ordering::Relaxed) >= self.0.cfg.max_queue {
                    let err = StageError {
                        session: req.session,
                        peer: self.0.local.clone(),
                        code: ErrorCode::BUSY,
                        reason: format!("{} stage requests already wait on layers {:?}", self.0.cfg.max_queue, slot.range),
                    };
                    self.report(&owner, req.request, err).await;
                    return;
                }
                slot.queued.fetch_add(1, Ordering::Relaxed);
                if slot.actor.cast(ShardMsg::Work(from.to_string(), req)).is_err() {
                    slot.queued.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Message::TokenResult(t) => {
                tracing::trace!(session = t.session, step = t.step, "token in");
                if let Some(a) = lock(&self.0.sessions).get(&t.session) {
                    let _ = a.cast(SessionMsg::Token(t));
                }
            }
            Message::StageReply(StageReply { outcome: StageOutcome::Error(e), request }) => {
                let owner_actor = lock(&self.0.sessions).get(&e.session).cloned();
                if let Some(a) = owner_actor {
                    let _ = a.cast(SessionMsg::Failed(e));
                    return;
                }
                // A stage error for a session we serve goes on to its owner.
                let owner = lock(&self.0.served).get(&e.session).map(|(_, o)| o.clone());
                if let Some(owner) = owner.filter(|o| *o != from) {
                    self.report(&owner, request, e).await;
                }
            }
            Message::SessionClose(c) => self.close_served(c.session),
            Message::SessionCancel(c) => self.close_served(c.session),
            other => tracing::debug!(peer = from, kind = ?other.kind(), "unexpected stage traffic ignored"),
        }
    }

    fn close_served(&self, session: u64) {
        if let Some((slot, _)) = lock(&self.0.served).remove(&session) {
            let _ = slot.actor.cast(ShardMsg::Close(session));
        }
    }

    pub(crate) fn forget_served(&self, session: u64) {
        lock(&self.0.served).remove(&session);
    }

    /// A call from `from`; returns the answer.
    pub async fn handle_call(&self, from: &str, msg: Message) -> Message {
        match msg {
            Message::SessionOpen(open) => match self.open_served(from, open).await {
                Ok(m) => m,
                Err((code, reason)) => error_frame(code, reason),
            },
            Message::LoadReport(_) => Message::LoadReport(self.load_report().await),
            Message::CallForBids(c) => match self.bid(from, &c).await {
                Some(b) => Message::Bid(b),
                None => error_frame(ErrorCode::NOT_SERVED, "this peer holds no such model or range"),
            },
            // An auction this peer bid in is decided: its bid no longer holds.
            Message::Award(a) => {
                lock(&self.0.bids).release(&(from.to_string(), a.auction));
                Message::Award(a)
            }
            Message::SessionClose(c) => {
                self.close_served(c.session);
                Message::SessionClose(c)
            }
            other => error_frame(ErrorCode::NOT_SERVED, format!("{:?} is not a call this peer answers", other.kind())),
        }
    }

    /// This peer's bid for running `c`'s layers for `owner`: its queue and
    /// compute time from the shard's measured speed (from its GFLOPS estimate
    /// and a load time when the range is not loaded). The queue counts the
    /// work of this peer's other open bids; this bid's own work is held until
    /// the owner's award or release arrives, or for twice the call's deadline.
    /// Transfer is the owner's to add.
    pub async fn bid(&self, owner: &str, c: &CallForBids) -> Option<Bid> {
        let m = self.0.model.as_ref()?;
        let (start, end) = (c.start as usize, c.end as usize);
        if c.model != m.hash || start >= end || end > m.config.layers {
            return None;
        }
        let work = m.costs.stage_work(start..end);
        let estimate_ms = work / (f64::from(self.0.cfg.gflops.max(0.01)) * 1e9) * 1e3;
        let slot = self.shards().await.into_iter().find(|s| s.range == (start..end));
        let (per_token_ms, queue_ms) = match &slot {
            Some(s) => {
                let us = s.us_per_token.load(Ordering::Relaxed);
                let per = if us > 0 { us as f64 / 1e3 } else { estimate_ms };
                (per, s.queued.load(Ordering::Relaxed) as f64 * per)
            }
            // Not loaded: reading its weights comes first (~1 GB/s).
            None => (estimate_ms, m.costs.stage_bytes(start..end) as f64 / 1e6),
        };
        let service_ms = per_token_ms * f64::from(c.tokens.max(1));
        let now = self.0.started.elapsed().as_secs_f64();
        let lease_s = (2.0 * f64::from(c.deadline_ms) / 1e3).clamp(0.01, MAX_BID_LEASE.as_secs_f64());
        let held_ms = {
            let mut book = lock(&self.0.bids);
            let held = book.held_s(now) * 1e3;
            book.hold((owner.to_string(), c.auction), service_ms / 1e3, now, lease_s);
            held
        };
        Some(Bid {
            auction: c.auction,
            peer: self.0.local.as_bytes().to_vec(),
            queue_ms: (queue_ms + held_ms) as f32,
            service_ms: service_ms as f32,
            transfer_ms: 0.0,
        })
    }

    fn sched_id(&self, peer: &str) -> Option<u64> {
        let mut ids = lock(&self.0.sched_ids);
        if let Some(i) = ids.iter().position(|p| p == peer) {
            return Some(i as u64);
        }
        if ids.len() >= 4096 {
            return None;
        }
        ids.push(peer.to_string());
        Some(ids.len() as u64 - 1)
    }

    /// Bids this peer made whose auctions it has not heard the end of.
    pub fn open_bids(&self) -> usize {
        let now = self.0.started.elapsed().as_secs_f64();
        let mut book = lock(&self.0.bids);
        book.held_s(now);
        book.len()
    }

    /// Runs an auction among `candidates` (the first is the planned peer) for
    /// layers `range` of a `tokens`-token task: calls for bids, awards the
    /// lowest expected completion (adjusted by each peer's record), or by the
    /// scheduler's fallback when bids do not come in time. Returns the winner
    /// and its promise in seconds.
    pub async fn auction(&self, candidates: &[PeerKey], range: Range<usize>, tokens: usize) -> Option<(PeerKey, f64)> {
        let model = self.0.model.as_ref()?;
        let ids: Vec<u64> = candidates.iter().map(|p| self.sched_id(p)).collect::<Option<_>>()?;
        let now = || self.0.started.elapsed().as_secs_f64();
        let task = SchedTask { work: tokens as f64 };
        let pairs: Vec<(u64, f64)> = ids.iter().map(|&i| (i, 0.0)).collect();
        // The gossiped load of each candidate, for the scheduler's fallback
        // when no bid comes in time: its speed on this range (tokens/s from
        // its GFLOPS) and its waiting stage requests at that speed. The view
        // is the latest gossip, so it counts as fresh.
        let work = model.costs.stage_work(range.clone());
        let view = self.view().await;
        {
            let mut sched = lock(&self.0.sched);
            for (p, &id) in candidates.iter().zip(&ids) {
                let Some(v) = view.iter().find(|v| v.peer == *p) else { continue };
                let speed = f64::from(v.gflops) * 1e9 / work.max(1.0);
                let report = SchedLoadReport { queue_s: f64::from(v.queued) / speed.max(1e-9), speed, sent_at: now() };
                sched.on_load_report(id, report, now());
                if let Some(rtt) = v.rtt_ms {
                    sched.on_rtt(id, f64::from(rtt) / 1e3);
                }
            }
        }
        let (auction, actions) = lock(&self.0.sched).start(task, &pairs, now());
        // No bid and no gossip about any candidate: the plan's own peer keeps
        // the hop.
        let planned = ids[0];
        let award = |actions: &[SchedAction]| {
            actions.iter().find_map(|a| match *a {
                SchedAction::Award { auction: a, peer, expected_s, .. } if a == auction && expected_s.is_finite() => {
                    Some((peer, expected_s))
                }
                SchedAction::Award { auction: a, .. } if a == auction => Some((planned, f64::INFINITY)),
                _ => None,
            })
        };
        let mut won = award(&actions);
        let mut decided = Vec::new();
        if won.is_none() {
            let timeout = self.0.cfg.bid_timeout;
            let calls = actions.into_iter().filter_map(|a| match a {
                SchedAction::CallForBids { peer, .. } => Some(peer),
                _ => None,
            });
            let calls = calls.map(|id| {
                let peer = candidates[ids.iter().position(|&i| i == id).unwrap_or(0)].clone();
                let msg = Message::CallForBids(CallForBids {
                    auction,
                    session: 0,
                    model: model.hash,
                    start: range.start as u32,
                    end: range.end as u32,
                    tokens: tokens as u32,
                    activation_bytes: (tokens * model.config.hidden * 4) as u64,
                    deadline_ms: timeout.as_millis() as u32,
                });
                async move { (id, tokio::time::timeout(timeout, self.call(&peer, msg)).await) }
            });
            // Bids are taken as they come; the scheduler closes the auction
            // as soon as no missing bid could win, or at its deadline (the
            // timeout, or sooner where every candidate's round trip is known).
            let mut calls: futures::stream::FuturesUnordered<_> = calls.collect();
            let wait = lock(&self.0.sched).deadline(auction).map_or(0.0, |d| (d - now()).max(0.0));
            let deadline = tokio::time::sleep(Duration::from_secs_f64(wait));
            tokio::pin!(deadline);
            while won.is_none() {
                let (id, r) = tokio::select! {
                    next = calls.next() => match next {
                        Some(answer) => answer,
                        None => break,
                    },
                    () = &mut deadline => break,
                };
                if let Ok(Ok(Message::Bid(b))) = r {
                    let q = SchedQuote {
                        queue_s: f64::from(b.queue_ms) / 1e3,
                        service_s: f64::from(b.service_ms) / 1e3,
                        transfer_s: f64::from(b.transfer_ms) / 1e3,
                    };
                    let actions = lock(&self.0.sched).on_bid(auction, id, q, now());
                    if let Some(w) = award(&actions) {
                        won = Some(w);
                        decided = actions;
                    }
                }
            }
            if won.is_none() {
                // The deadline has passed, or every call has failed: this
                // auction (not the other sessions' ones) closes on what it has.
                decided = lock(&self.0.sched).close_now(auction, now());
                won = award(&decided);
            }
        }
        let (id, expected) = won?;
        let winner = lock(&self.0.sched_ids).get(id as usize).cloned()?;
        // Every candidate asked hears the outcome, so the losers' bids stop
        // counting against their other offers (the winner's too: the session
        // opening on it brings the work itself). Sent in the background; a
        // lost one lapses at the bid's lease.
        let told: Vec<PeerKey> = decided
            .iter()
            .filter_map(|a| match *a {
                SchedAction::Release { peer, .. } | SchedAction::Award { peer, .. } => {
                    candidates.get(ids.iter().position(|&i| i == peer)?).cloned()
                }
                _ => None,
            })
            .collect();
        for peer in told {
            let (rt, msg) = (self.clone(), Message::Award(Award { auction, peer: winner.as_bytes().to_vec() }));
            tokio::spawn(async move {
                let _ = tokio::time::timeout(MAX_BID_LEASE, rt.call(&peer, msg)).await;
            });
        }
        Some((winner, expected))
    }

    /// Tells the scheduler how a promise turned out.
    pub fn auction_outcome(&self, peer: &str, promised_s: f64, actual_s: f64) {
        if let Some(id) = self.sched_id(peer) {
            lock(&self.0.sched).on_outcome(id, promised_s, actual_s);
        }
    }

    /// This peer's load, as gossiped and as answered to probes.
    pub async fn load_report(&self) -> LoadReport {
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let hash = self.0.model.as_ref().map_or([0; 32], |m| m.hash);
        let shards = self
            .shards()
            .await
            .iter()
            .map(|s| ShardLoad {
                model: hash,
                start: s.range.start as u32,
                end: s.range.end as u32,
                queue_depth: s.queued.load(Ordering::Relaxed) as u32,
                tokens_per_s: s.tokens_per_s(),
            })
            .collect();
        LoadReport { peer: self.0.local.as_bytes().to_vec(), timestamp_ms: now_ms, shards }
    }

    async fn open_served(&self, from: &str, open: SessionOpen) -> Result<Message, (u16, String)> {
        let model = self.0.model.as_ref().ok_or((ErrorCode::NOT_SERVED, "this peer holds no model".to_string()))?;
        if open.model != model.hash {
            return Err((ErrorCode::NOT_SERVED, format!("this peer does not hold model {}", hex(&open.model))));
        }
        let (start, end) = (open.start as usize, open.end as usize);
        if start >= end || end > model.config.layers {
            return Err((ErrorCode::MALFORMED, format!("layers {start}..{end} are not a range of a {}-layer model", model.config.layers)));
        }
        if open.owner.is_empty() || open.owner != from && from != self.0.local {
            return Err((ErrorCode::MALFORMED, "a session is opened by its owner".to_string()));
        }
        let slot = self.ensure_shard(start..end).await.map_err(|e| (ErrorCode::BUSY, e.to_string()))?;
        let session = open.session;
        let owner = open.owner.clone();
        match slot.actor.call(|port| ShardMsg::Open(Box::new(open), port), Some(Duration::from_secs(10))).await {
            Ok(ractor::rpc::CallResult::Success(Ok(()))) => {}
            Ok(ractor::rpc::CallResult::Success(Err(e))) => return Err((e.code, e.reason)),
            _ => return Err((ErrorCode::INTERNAL, "shard actor did not answer".to_string())),
        }
        lock(&self.0.served).insert(session, (slot, owner));
        Ok(Message::ShardAdvert(ShardAdvert {
            peer: self.0.local.as_bytes().to_vec(),
            model: model.hash,
            start: start as u32,
            end: end as u32,
        }))
    }

    /// The shard serving exactly `range`, loading it if needed.
    pub async fn ensure_shard(&self, range: Range<usize>) -> Result<ShardSlot, RuntimeError> {
        let model = self.0.model.clone().ok_or(RuntimeError::NoModel)?;
        let mut shards = self.0.shards.lock().await;
        if let Some(s) = shards.iter().find(|s| s.range == range) {
            return Ok(s.clone());
        }
        if shards.len() >= self.0.cfg.max_shards {
            // Drop the first shard that serves no session.
            let busy: Vec<u64> = lock(&self.0.served).values().map(|(s, _)| s.actor.get_id().pid()).collect();
            let Some(i) = shards.iter().position(|s| !busy.contains(&s.actor.get_id().pid())) else {
                return Err(RuntimeError::Invalid(format!(
                    "this peer already serves {} layer ranges, all in use",
                    shards.len()
                )));
            };
            let old = shards.remove(i);
            tracing::info!(layers = ?old.range, "unloading shard");
            old.actor.stop(None);
        }
        let started = Instant::now();
        let path = model.path.clone();
        let pool = self.0.pool.clone();
        let r = range.clone();
        let shard = tokio::task::spawn_blocking(move || Shard::load(&path, r, pool))
            .await
            .map_err(|e| RuntimeError::Actor(e.to_string()))??;
        let memory_bytes = shard.memory_bytes();
        tracing::info!(layers = ?range, ms = started.elapsed().as_millis() as u64, memory_mib = memory_bytes >> 20, "shard loaded");
        let queued = Arc::new(AtomicUsize::new(0));
        let us_per_token = Arc::new(AtomicU64::new(0));
        let tokens = Arc::new(AtomicU64::new(0));
        let args = ShardArgs {
            shard: Arc::new(shard),
            rt: self.clone(),
            queued: queued.clone(),
            us_per_token: us_per_token.clone(),
            tokens: tokens.clone(),
        };
        let (actor, _) = Actor::spawn(None, ShardActor, args).await.map_err(|e| RuntimeError::Actor(e.to_string()))?;
        let rate = Arc::new(Mutex::new((Instant::now(), 0)));
        let slot = ShardSlot { range, actor, queued, memory_bytes, us_per_token, tokens, rate };
        shards.push(slot.clone());
        Ok(slot)
    }

    /// Whether a standby copy of `range` fits: a free shard slot, and all
    /// shards here within half the memory this peer reported.
    pub async fn room_for(&self, range: Range<usize>) -> bool {
        let Some(m) = &self.0.model else { return false };
        let shards = self.0.shards.lock().await;
        if shards.iter().any(|s| s.range == range) {
            return true;
        }
        let bytes = m.costs.stage_bytes(range);
        let held: u64 = shards.iter().map(|s| s.memory_bytes as u64).sum();
        shards.len() < self.0.cfg.max_shards && held + bytes <= self.0.cfg.memory_bytes / 2
    }

    /// Unloads shards whose range is not in `keep` and that serve no session.
    pub async fn unload_except(&self, keep: &[Range<usize>]) {
        let busy: Vec<u64> = lock(&self.0.served).values().map(|(s, _)| s.actor.get_id().pid()).collect();
        let mut shards = self.0.shards.lock().await;
        shards.retain(|s| {
            let drop = !keep.contains(&s.range) && !busy.contains(&s.actor.get_id().pid());
            if drop {
                tracing::info!(layers = ?s.range, "unloading shard the plan no longer needs");
                s.actor.stop(None);
            }
            !drop
        });
    }

    /// Tells every session owned here that `peer` is gone (its connection
    /// closed); those routed through it fail over now.
    pub fn peer_lost(&self, peer: &str) {
        for a in lock(&self.0.sessions).values() {
            let _ = a.cast(SessionMsg::PeerLost(peer.to_string()));
        }
    }

    pub(crate) fn register_session(&self, wire: u64, actor: ActorRef<SessionMsg>) {
        lock(&self.0.sessions).insert(wire, actor);
    }

    pub(crate) fn unregister_session(&self, wire: u64) {
        lock(&self.0.sessions).remove(&wire);
    }

    /// Starts a generation owned by this peer.
    pub async fn generate(&self, req: GenerateRequest) -> Result<GenerationHandle, RuntimeError> {
        let model = self.0.model.clone().ok_or(RuntimeError::NoModel)?;
        if req.prompt.is_empty() {
            return Err(RuntimeError::Invalid("empty prompt".into()));
        }
        if req.prompt.len() >= model.config.context {
            return Err(RuntimeError::Invalid(format!(
                "the prompt has {} tokens; the model's context holds {}",
                req.prompt.len(),
                model.config.context
            )));
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= model.tokenizer.vocab_size()) {
            return Err(RuntimeError::Invalid(format!("token id {t} is outside the vocabulary")));
        }
        req.sampling.validate()?;
        let (tx, rx) = mpsc::channel(self.0.cfg.event_capacity.max(1));
        let (actor, _) = Actor::spawn(None, SessionActor, (self.clone(), model, req, tx))
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

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
