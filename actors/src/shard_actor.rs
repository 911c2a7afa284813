//! ShardActor: one loaded layer range, its sessions' KV caches (bounded, LRU
//! with a TTL) and, on the last stage, their samplers. Work arrives as
//! stage requests; outputs go straight to the next stage, tokens to the
//! session's owner, through an outbox: the actor never waits on a link.
//!
//! Continuous batching: while a forward pass runs on the compute thread,
//! the actor keeps taking requests in; when it ends, the next pass carries
//! every session's ready step at once ([`batch::pick`]), so the weights are
//! read once for all of them. A session's results do not depend on what
//! shares its pass.

pub mod batch;
mod open;
pub use open::Opened;
mod output;
pub mod prefix;
mod queue;

pub use queue::WorkQueue;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fogmesh_models::{BatchItem, LogitsFor, Sampler, SessionCache, Shard, ShardInput, ShardOutput};
use fogmesh_protocols::{
    ActivationCodec, ErrorCode, Message, NodeId, SessionOpen, StageError, StageInput, StageOutcome, StageReply,
    StageRequest,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::compute::{Compute, ComputeError};
use crate::host::Host;
use crate::link::PeerKey;
use crate::links::LinkMeter;
use crate::outbox::Outbox;

/// What a shard actor needs of its peer beyond [`Host`]: to let go of a
/// session it no longer serves, and to report failed stage requests.
#[async_trait::async_trait]
pub trait ShardHost: Host {
    /// The session is no longer served here (its cache is gone).
    fn forget_served(&self, session: u64);
    /// Reports a failed stage request to whoever should hear of it.
    async fn report(&self, to: &str, request: u64, err: StageError) {
        let msg = Message::StageReply(StageReply { request, outcome: StageOutcome::Error(err) });
        if let Err(e) = self.send(to, msg).await {
            tracing::debug!(peer = to, error = %e, "could not report a stage error");
        }
    }
}

/// Messages of a [`ShardActor`].
#[derive(Debug)]
pub enum ShardMsg {
    /// Open a session's cache here; answers how many of its history's
    /// tokens a shared prefix already covers, and its bound here.
    Open(Box<SessionOpen>, RpcReplyPort<Result<Opened, StageError>>),
    /// A stage request from the given peer, for a session of the given
    /// owner (counted in the [`WorkQueue`] under it).
    Work(PeerKey, PeerKey, StageRequest),
    /// Drop a session's cache.
    Close(u64),
    /// Report status.
    Status(RpcReplyPort<ShardStatus>),
    /// A forward pass ended (sent by the actor's own pass).
    Done(Box<Finished>),
    /// Start a pass if one is due (after lingering for stragglers).
    Kick,
}

/// A finished pass: its steps and what the compute thread gave back.
#[derive(Debug)]
pub struct Finished {
    steps: Vec<Step>,
    result: Result<Pass, ComputeError>,
}

/// What a pass gives back: every session's cache, its output, and the
/// pass's compute time.
#[derive(Debug)]
struct Pass {
    caches: Vec<SessionCache>,
    outs: Vec<fogmesh_models::Result<ShardOutput>>,
    took: std::time::Duration,
}

/// A stage request taken in, its input decoded.
#[derive(Debug)]
struct Step {
    from: PeerKey,
    owner: PeerKey,
    /// The request (its input moved out).
    req: StageRequest,
    tokens: usize,
    arrived: Instant,
}

/// A shard's state, for status pages and tests.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardStatus {
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
    /// Open sessions.
    pub sessions: usize,
    /// Bytes of weights.
    pub memory_bytes: usize,
    /// Bytes of KV caches.
    pub cache_bytes: usize,
    /// Tokens processed since load.
    pub tokens: u64,
    /// Stage requests waiting or in the running pass.
    pub queued: usize,
    /// Forward passes run since load.
    pub passes: u64,
    /// Session steps those passes carried (over `passes`: sessions per pass).
    pub steps: u64,
    /// Bytes of KV cache its sessions may reserve together.
    pub cache_budget: usize,
    /// Bytes of shared prompt prefixes kept.
    pub prefix_bytes: usize,
    /// Sessions opened with a shared prefix.
    pub prefix_hits: u64,
}

/// What a shard actor starts from.
pub struct ShardArgs {
    /// The loaded range.
    pub shard: Arc<Shard>,
    /// This peer, as the actor sees it.
    pub host: Arc<dyn ShardHost>,
    /// The compute thread its forward passes run on.
    pub compute: Compute,
    /// Work waiting (shared with the runtime, which refuses work past its bounds).
    pub queued: Arc<WorkQueue>,
    /// Measured microseconds per token (EWMA), for bids.
    pub us_per_token: Arc<AtomicU64>,
    /// Tokens processed since load (shared: the load report's rate).
    pub tokens: Arc<AtomicU64>,
    /// Sessions open here (shared: bids count them).
    pub active: Arc<std::sync::atomic::AtomicUsize>,
    /// This peer's links: send times, and the encoding per hop.
    pub links: Arc<LinkMeter>,
}

struct Session {
    cache: Option<SessionCache>,
    /// None on the last stage.
    next: Option<PeerKey>,
    owner: PeerKey,
    sampler: Option<Sampler>,
    history: Vec<u32>,
    /// What the session opened with: its sampling, draws and history
    /// length (a resent step rewinds the sampler to where the step began).
    params: fogmesh_models::SamplingParams,
    open_draws: u64,
    open_len: usize,
    max_tokens: usize,
    last_used: Instant,
    /// Tokens its cache holds (or will, once the pass it is in ends).
    held: usize,
    /// When its last result left, until its next step comes in.
    delivered: Option<Instant>,
    /// How long its next step takes to come back after a result (smoothed).
    gap: Option<std::time::Duration>,
}

/// State of a [`ShardActor`].
pub struct ShardState {
    shard: Arc<Shard>,
    rt: Arc<dyn ShardHost>,
    compute: Compute,
    queued: Arc<WorkQueue>,
    us_per_token: Arc<AtomicU64>,
    sessions: HashMap<u64, Session>,
    /// `sessions.len()`, shared with the runtime's bids.
    active: Arc<std::sync::atomic::AtomicUsize>,
    codec: ActivationCodec,
    tokens: Arc<AtomicU64>,
    /// `layers="start..end"`, the label of this stage's metrics.
    label: String,
    /// What this stage sends, queued per destination so that no send
    /// waits inside the actor.
    outbox: Outbox,
    myself: ActorRef<ShardMsg>,
    /// Bytes of KV cache this shard's sessions may hold together.
    cache_budget: usize,
    links: Arc<LinkMeter>,
    /// Steps taken in, waiting for a pass, oldest first.
    waiting: VecDeque<(Step, Input)>,
    /// Whether a pass is running.
    running: bool,
    /// Tokens one pass carries at most (see [`batch::pick`]).
    max_batch_tokens: usize,
    passes: u64,
    steps: u64,
    prefix_hits: u64,
    /// The last pass's compute time, and when it ended.
    last_took: std::time::Duration,
    ended: Option<Instant>,
    /// Whether a [`ShardMsg::Kick`] is on its way.
    kick_pending: bool,
    /// Finished sessions' prompts, for new sessions starting the same way.
    prefixes: prefix::Prefixes,
}

/// The actor owning one loaded layer range.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardActor;

fn stage_error(session: u64, peer: &str, code: ErrorCode, reason: impl Into<String>) -> StageError {
    StageError { session, peer: Some(NodeId::from(peer)), code, reason: reason.into() }
}

impl ShardState {
    /// Takes a stage request in: its input decoded and checked, it waits
    /// for the next pass.
    fn arrive(&mut self, from: PeerKey, owner: PeerKey, mut req: StageRequest) {
        let d = self.shard.config().hidden;
        let input = match std::mem::replace(&mut req.input, StageInput::Tokens(Vec::new())) {
            StageInput::Tokens(t) => Input::Tokens(t),
            StageInput::Activation(bytes) => {
                let mut x = Vec::new();
                let bad = match self.codec.decode(&bytes, &self.rt.config().limits, &mut x) {
                    Ok(info) if info.width == d && x.len() == info.tokens * d => None,
                    Ok(info) => Some(format!("activation of width {} for a model of width {d}", info.width)),
                    Err(err) => Some(format!("undecodable activation: {err}")),
                };
                if let Some(why) = bad {
                    self.queued.leave(&owner);
                    report(&mut self.outbox, &owner, req.request, stage_error(req.session, &from, ErrorCode::Malformed, why));
                    return;
                }
                Input::Hidden(x)
            }
        };
        let tokens = match &input {
            Input::Tokens(t) => t.len(),
            Input::Hidden(h) => h.len() / d.max(1),
        };
        if let Some(sess) = self.sessions.get_mut(&req.session)
            && let Some(t) = sess.delivered.take()
        {
            // While a pass runs it holds the cores, and the way back is
            // slower than it would be: such a sample only ever lowers the
            // estimate.
            let g = t.elapsed();
            sess.gap = match (sess.gap, self.running) {
                (None, true) => None,
                (Some(old), true) => Some(old.min(g)),
                (None, false) => Some(g),
                (Some(old), false) => Some((old * 3 + g) / 4),
            };
        }
        self.waiting.push_back((Step { from, owner, req, tokens, arrived: Instant::now() }, input));
    }

    /// How much longer the next pass should wait for sessions that usually
    /// come back quickly after a result and have not yet, or `None` to
    /// start now. Counted from the end of the last pass, so that sessions
    /// that came back during it and those coming back now share the next
    /// one instead of taking turns.
    fn linger(&self) -> Option<std::time::Duration> {
        let since = self.ended?.elapsed();
        let cap = batch::LINGER_MAX.min(self.last_took / 4);
        if since >= cap {
            return None;
        }
        // Sessions not yet back whose way back is short, or not yet known.
        let soon = self.sessions.iter().any(|(id, s)| {
            s.delivered.is_some() && s.gap.is_none_or(|g| g <= cap) && !self.waiting.iter().any(|(w, _)| w.req.session == *id)
        });
        soon.then(|| cap - since)
    }

    /// Readies one step's session for a pass: its cache, rolled back to
    /// where the step starts and with room to grow. Reports and returns
    /// `None` when the step cannot run.
    fn prepare(&mut self, step: &Step) -> Option<SessionCache> {
        let local = self.rt.local_peer().to_string();
        let req = &step.req;
        let fail = |outbox: &mut Outbox, to: &str, code, why: String| {
            report(outbox, to, req.request, stage_error(req.session, &local, code, why));
        };
        let Some(sess) = self.sessions.get_mut(&req.session) else {
            fail(&mut self.outbox, &step.from, ErrorCode::UnknownSession, "session evicted or closed".into());
            return None;
        };
        sess.last_used = Instant::now();
        let owner = sess.owner.clone();
        let Some(mut cache) = sess.cache.take() else {
            fail(&mut self.outbox, &owner, ErrorCode::Internal, "the session is already in a pass".into());
            return None;
        };
        let (pos, n) = (req.position as usize, step.tokens);
        let why = if pos > cache.pos() {
            Some((ErrorCode::UnknownSession, format!("input at position {pos} but {} tokens are cached", cache.pos())))
        } else if pos + n > sess.max_tokens {
            Some((ErrorCode::Model, format!("{} tokens exceed the session's bound of {}", pos + n, sess.max_tokens)))
        } else {
            None
        };
        if let Some((code, why)) = why {
            sess.cache = Some(cache);
            fail(&mut self.outbox, &owner, code, why);
            return None;
        }
        // A retried request rolls the cache back to where it starts; it
        // grows within the room reserved at open.
        cache.truncate(pos);
        sess.held = pos + n;
        Some(cache)
    }

    /// Starts the next pass, if none runs and steps wait: the steps
    /// [`batch::pick`] chooses, run together on the compute thread; the
    /// result comes back as [`ShardMsg::Done`].
    fn start_pass(&mut self) {
        while !self.running && !self.waiting.is_empty() {
            if let Some(wait) = self.linger() {
                if !self.kick_pending {
                    self.kick_pending = true;
                    let me = self.myself.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = me.cast(ShardMsg::Kick);
                    });
                }
                return;
            }
            let owner_key = |o: &str| {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                o.hash(&mut h);
                h.finish()
            };
            let view: Vec<batch::Waiting> = self
                .waiting
                .iter()
                .map(|(s, _)| batch::Waiting { session: s.req.session, owner: owner_key(&s.owner), tokens: s.tokens })
                .collect();
            let picked = batch::pick(&view, self.max_batch_tokens);
            let mut taken = Vec::with_capacity(picked.len());
            for &i in picked.iter().rev() {
                taken.extend(self.waiting.remove(i));
            }
            taken.reverse();
            let (mut steps, mut work) = (Vec::new(), Vec::new());
            for (step, input) in taken {
                metrics::histogram!(crate::metrics::QUEUE_SECONDS, "layers" => self.label.clone()).record(step.arrived.elapsed().as_secs_f64());
                // A step counts as queued until its pass ends: a probe of a
                // late step then hears that work is under way here.
                if let Some(cache) = self.prepare(&step) {
                    steps.push(step);
                    work.push((cache, input));
                } else {
                    self.queued.leave(&step.owner);
                }
            }
            if steps.is_empty() {
                continue;
            }
            self.running = true;
            let (shard, compute, me) = (self.shard.clone(), self.compute.clone(), self.myself.clone());
            let slowdown = self.rt.config().compute_slowdown;
            tokio::spawn(async move {
                let result = compute
                    .run(move || {
                        let t0 = Instant::now();
                        let mut caches = Vec::with_capacity(work.len());
                        let mut inputs = Vec::with_capacity(work.len());
                        for (c, i) in work {
                            caches.push(c);
                            inputs.push(i);
                        }
                        let mut items: Vec<BatchItem<'_>> = caches
                            .iter_mut()
                            .zip(&inputs)
                            .map(|(cache, input)| BatchItem { cache, input: input.as_shard_input(), logits: LogitsFor::Last })
                            .collect();
                        let outs = shard.forward_batch(&mut items);
                        drop(items);
                        if slowdown.is_finite() && slowdown > 1.0 {
                            std::thread::sleep(t0.elapsed().mul_f32((slowdown - 1.0).min(100.0)));
                        }
                        Pass { caches, outs, took: t0.elapsed() }
                    })
                    .await;
                // The actor may be gone (its shard unloaded): nothing to tell.
                let _ = me.cast(ShardMsg::Done(Box::new(Finished { steps, result })));
            });
        }
    }

    /// A pass ended: every step's output goes on its way, then the next
    /// pass starts.
    fn finish(&mut self, f: Finished) {
        self.running = false;
        for step in &f.steps {
            self.queued.leave(&step.owner);
        }
        let local = self.rt.local_peer().to_string();
        match f.result {
            Err(e) => {
                for step in f.steps {
                    let (req, owner) = (&step.req, &step.owner);
                    let e = stage_error(req.session, &local, ErrorCode::Internal, format!("forward pass failed: {e}"));
                    report(&mut self.outbox, owner, req.request, e);
                    self.sessions.remove(&req.session);
                    self.rt.forget_served(req.session);
                }
            }
            Ok(Pass { caches, outs, took }) => {
                self.passes += 1;
                self.steps += f.steps.len() as u64;
                self.last_took = took;
                let n: usize = f.steps.iter().map(|s| s.tokens).sum();
                tracing::debug!(sessions = f.steps.len(), tokens = n, ms = took.as_secs_f64() * 1e3, waiting = self.waiting.len(), "pass");
                self.tokens.fetch_add(n as u64, Ordering::Relaxed);
                let label = self.label.clone();
                metrics::histogram!(crate::metrics::STAGE_SECONDS, "layers" => label.clone()).record(took.as_secs_f64());
                metrics::counter!(crate::metrics::STAGE_TOKENS, "layers" => label.clone()).increment(n as u64);
                metrics::histogram!(crate::metrics::BATCH_SESSIONS, "layers" => label.clone()).record(f.steps.len() as f64);
                metrics::histogram!(crate::metrics::BATCH_TOKENS, "layers" => label.clone()).record(n as f64);
                // Per token of a pass: what bids and the load report use.
                let us = took.as_micros() as u64 / n.max(1) as u64;
                let old = self.us_per_token.load(Ordering::Relaxed);
                self.us_per_token.store(if old == 0 { us } else { (old * 7 + us) / 8 }, Ordering::Relaxed);
                for ((step, cache), out) in f.steps.into_iter().zip(caches).zip(outs) {
                    self.deliver(step, cache, out, took.as_secs_f64());
                }
                metrics::gauge!(crate::metrics::KV_BYTES, "layers" => label).set(self.cache_bytes() as f64);
                // The lingering for returning sessions counts from here:
                // the last result has left.
                self.ended = Some(Instant::now());
            }
        }
        self.start_pass();
    }

    /// Bytes the sessions' caches hold.
    fn cache_bytes(&self) -> usize {
        let per = self.shard.cache_bytes_per_token();
        self.sessions.values().map(|s| s.cache.as_ref().map_or(s.held * per, SessionCache::memory_bytes)).sum()
    }
}

/// Queues a failed stage request's report for `to`.
fn report(outbox: &mut Outbox, to: &str, request: u64, err: StageError) {
    let msg = Message::StageReply(StageReply { request, outcome: StageOutcome::Error(err) });
    outbox.push(to, msg, |e| tracing::debug!(error = %e, "could not report a stage error"));
}

#[derive(Debug)]
enum Input {
    Tokens(Vec<u32>),
    Hidden(Vec<f32>),
}

impl Input {
    fn as_shard_input(&self) -> ShardInput<'_> {
        match self {
            Input::Tokens(t) => ShardInput::Tokens(t),
            Input::Hidden(h) => ShardInput::Hidden(h),
        }
    }
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(&self, myself: ActorRef<ShardMsg>, args: ShardArgs) -> Result<ShardState, ActorProcessingErr> {
        let r = args.shard.range();
        let cfg = args.host.config();
        let limit = cfg.outbox_bytes;
        let cache_budget = cfg.cache_budget();
        let max_batch_tokens = cfg.max_batch_tokens.max(1);
        Ok(ShardState {
            cache_budget,
            outbox: Outbox::new(args.host.clone(), args.links.clone(), limit),
            links: args.links,
            myself,
            label: format!("{}..{}", r.start, r.end),
            shard: args.shard,
            rt: args.host,
            compute: args.compute,
            queued: args.queued,
            us_per_token: args.us_per_token,
            active: args.active,
            sessions: HashMap::new(),
            codec: ActivationCodec::new(),
            tokens: args.tokens,
            waiting: VecDeque::new(),
            running: false,
            max_batch_tokens,
            passes: 0,
            steps: 0,
            prefix_hits: 0,
            last_took: std::time::Duration::ZERO,
            ended: None,
            prefixes: prefix::Prefixes::default(),
            kick_pending: false,
        })
    }

    async fn handle(&self, _myself: ActorRef<ShardMsg>, msg: ShardMsg, st: &mut ShardState) -> Result<(), ActorProcessingErr> {
        st.handle(msg);
        st.active.store(st.sessions.len(), Ordering::Relaxed);
        Ok(())
    }
}

impl ShardState {
    fn handle(&mut self, msg: ShardMsg) {
        let st = self;
        match msg {
            ShardMsg::Open(open, reply) => {
                let _ = reply.send(st.open(*open));
            }
            ShardMsg::Work(from, owner, req) => {
                st.arrive(from, owner, req);
                // The pass starts once the messages already in the mailbox
                // are in (a burst from the stage before, one per session).
                if !st.running && !st.kick_pending {
                    st.kick_pending = true;
                    let _ = st.myself.cast(ShardMsg::Kick);
                }
            }
            ShardMsg::Done(f) => st.finish(*f),
            ShardMsg::Kick => {
                st.kick_pending = false;
                st.start_pass();
            }
            ShardMsg::Close(session) => {
                if let Some(sess) = st.sessions.remove(&session) {
                    // Its history's keys and values stay, shared, for whoever
                    // starts the same way.
                    if let Some(cache) = sess.cache {
                        let tokens = sess.history[..sess.open_len.min(sess.history.len())].to_vec();
                        st.prefixes.keep(&sess.owner, tokens, cache, st.cache_budget / 2);
                    }
                    metrics::gauge!(crate::metrics::KV_BYTES, "layers" => st.label.clone()).set(st.cache_bytes() as f64);
                    metrics::gauge!(crate::metrics::PREFIX_BYTES, "layers" => st.label.clone()).set(st.prefixes.bytes() as f64);
                }
            }
            ShardMsg::Status(reply) => {
                let r = st.shard.range();
                let _ = reply.send(ShardStatus {
                    start: r.start,
                    end: r.end,
                    sessions: st.sessions.len(),
                    memory_bytes: st.shard.memory_bytes(),
                    cache_bytes: st.cache_bytes(),
                    tokens: st.tokens.load(Ordering::Relaxed),
                    queued: st.queued.len(),
                    passes: st.passes,
                    steps: st.steps,
                    cache_budget: st.cache_budget,
                    prefix_bytes: st.prefixes.bytes(),
                    prefix_hits: st.prefix_hits,
                });
            }
        }
    }
}
