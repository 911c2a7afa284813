//! ShardActor: one loaded layer range, its sessions' KV caches (bounded, LRU
//! with a TTL) and, on the last stage, their samplers. Work arrives as
//! stage requests; outputs go straight to the next stage, tokens to the
//! session's owner, through an outbox: the actor never waits on a link.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fogmesh_models::{LogitsFor, Sampler, SessionCache, Shard, ShardInput, ShardOutput, log_prob};
use fogmesh_protocols::{
    ActivationCodec, ErrorCode, Message, NodeId, SessionOpen, StageError, StageInput, StageOutcome, StageReply,
    StageRequest, TokenResult,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::compute::Compute;
use crate::host::Host;
use crate::link::PeerKey;
use crate::links::LinkMeter;
use crate::outbox::Outbox;
use crate::policy;

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
    /// Open a session's cache here.
    Open(Box<SessionOpen>, RpcReplyPort<Result<(), StageError>>),
    /// A stage request from the given peer, for a session of the given
    /// owner (counted in the [`WorkQueue`] under it).
    Work(PeerKey, PeerKey, StageRequest),
    /// Drop a session's cache.
    Close(u64),
    /// Report status.
    Status(RpcReplyPort<ShardStatus>),
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
    /// Stage requests waiting.
    pub queued: usize,
}

/// A shard's waiting stage requests, counted in all and per session owner:
/// one owner may hold at most half the queue, so another's next step still
/// gets in.
#[derive(Debug, Default)]
pub struct WorkQueue {
    total: AtomicUsize,
    by_owner: Mutex<HashMap<PeerKey, usize>>,
}

impl WorkQueue {
    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts one more request of `owner`, or says why not: `max` wait in
    /// all, or `owner` already has half of them waiting.
    pub fn enter(&self, owner: &str, max: usize) -> Result<(), String> {
        let mut by = self.by_owner.lock().unwrap_or_else(|e| e.into_inner());
        let share = (max / 2).max(1);
        let mine = by.get(owner).copied().unwrap_or(0);
        if self.len() >= max {
            return Err(format!("{max} stage requests already wait here"));
        }
        if mine >= share {
            return Err(format!("{owner} already has {mine} stage requests waiting here, its share of {max}"));
        }
        *by.entry(owner.to_string()).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// One request of `owner` left the queue.
    pub fn leave(&self, owner: &str) {
        let mut by = self.by_owner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                by.remove(owner);
            }
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }
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
}

/// State of a [`ShardActor`].
pub struct ShardState {
    shard: Arc<Shard>,
    rt: Arc<dyn ShardHost>,
    compute: Compute,
    queued: Arc<WorkQueue>,
    us_per_token: Arc<AtomicU64>,
    sessions: HashMap<u64, Session>,
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
}

/// The actor owning one loaded layer range.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardActor;

fn stage_error(session: u64, peer: &str, code: ErrorCode, reason: impl Into<String>) -> StageError {
    StageError { session, peer: Some(NodeId::from(peer)), code, reason: reason.into() }
}

impl ShardState {
    fn open(&mut self, open: SessionOpen) -> Result<(), StageError> {
        let local = self.rt.local_peer().to_string();
        let now = Instant::now();
        if self.sessions.contains_key(&open.session) {
            return Err(stage_error(open.session, &local, ErrorCode::Malformed, "a live session cannot be reopened"));
        }
        let need = open.history.len() * self.shard.cache_bytes_per_token();
        self.make_room(open.session, open.owner.as_str(), need).map_err(|why| stage_error(open.session, &local, ErrorCode::Busy, why))?;
        let params = crate::wire::sampling_params(&open.sampling);
        let sampler = if self.shard.is_last() {
            Some(
                Sampler::resume(params.clone(), u64::from(open.draws))
                    .map_err(|e| stage_error(open.session, &local, ErrorCode::Malformed, e.to_string()))?,
            )
        } else {
            None
        };
        if self.shard.is_last() != open.next.is_none() {
            return Err(stage_error(
                open.session,
                &local,
                ErrorCode::Malformed,
                "exactly the stage holding the last layer has no next hop",
            ));
        }
        let max_tokens = (open.max_tokens as usize).min(self.shard.config().context);
        let history = open.history;
        self.sessions.insert(
            open.session,
            Session {
                cache: Some(self.shard.new_session()),
                next: open.next.map(|n| n.0),
                owner: open.owner.0,
                sampler,
                open_len: history.len(),
                history,
                params,
                open_draws: u64::from(open.draws),
                max_tokens,
                last_used: now,
            },
        );
        Ok(())
    }

    /// The bounds of this shard's caches.
    fn bounds(&self) -> policy::CacheBounds {
        let cfg = self.rt.config();
        policy::CacheBounds {
            ttl: cfg.session_ttl,
            max_sessions: cfg.max_sessions_per_shard,
            budget_bytes: self.cache_budget,
            owner_share: cfg.cache_owner_share,
        }
    }

    /// Evicts what [`policy::admit`] says so that `session` of `owner` may
    /// hold `bytes` of cache here, or says why it may not.
    fn make_room(&mut self, session: u64, owner: &str, bytes: usize) -> Result<(), String> {
        let per = self.shard.cache_bytes_per_token();
        let held: Vec<policy::Held<'_>> = self
            .sessions
            .iter()
            .filter(|(k, _)| **k != session)
            .map(|(k, s)| policy::Held { session: *k, owner: &s.owner, bytes: s.cache.as_ref().map_or(0, |c| c.pos() * per), last_used: s.last_used })
            .collect();
        let evict = policy::admit(&held, owner, bytes, Instant::now(), &self.bounds())?;
        for k in evict {
            tracing::info!(session = k, "evicting a session cache (idle past its TTL, or room for another owner's)");
            self.sessions.remove(&k);
            self.rt.forget_served(k);
        }
        Ok(())
    }

    async fn work(&mut self, from: PeerKey, req: StageRequest) {
        let local = self.rt.local_peer().to_string();
        let Some(sess) = self.sessions.get_mut(&req.session) else {
            let e = stage_error(req.session, &local, ErrorCode::UnknownSession, "session evicted or closed");
            report(&mut self.outbox, &from, req.request, e);
            return;
        };
        sess.last_used = Instant::now();
        let owner = sess.owner.clone();
        let Some(mut cache) = sess.cache.take() else { return };
        let pos = req.position as usize;
        if pos > cache.pos() {
            sess.cache = Some(cache);
            let e = stage_error(req.session, &local, ErrorCode::UnknownSession, format!("input at position {pos} but {} tokens are cached", sess.cache.as_ref().map_or(0, |c| c.pos())));
            report(&mut self.outbox, &owner, req.request, e);
            return;
        }
        // A retried request rolls the cache back to where it starts.
        cache.truncate(pos);
        let d = self.shard.config().hidden;
        let input = match req.input {
            StageInput::Tokens(t) => Input::Tokens(t),
            StageInput::Activation(bytes) => {
                let mut x = Vec::new();
                match self.codec.decode(&bytes, &self.rt.config().limits, &mut x) {
                    Ok(info) if info.width == d && x.len() == info.tokens * d => Input::Hidden(x),
                    Ok(info) => {
                        sess.cache = Some(cache);
                        let e = stage_error(req.session, &from, ErrorCode::Malformed, format!("activation of width {} for a model of width {d}", info.width));
                        report(&mut self.outbox, &owner, req.request, e);
                        return;
                    }
                    Err(err) => {
                        sess.cache = Some(cache);
                        let e = stage_error(req.session, &from, ErrorCode::Malformed, format!("undecodable activation: {err}"));
                        report(&mut self.outbox, &owner, req.request, e);
                        return;
                    }
                }
            }
        };
        let n = match &input {
            Input::Tokens(t) => t.len(),
            Input::Hidden(h) => h.len() / d.max(1),
        };
        if pos + n > sess.max_tokens {
            sess.cache = Some(cache);
            let e = stage_error(req.session, &local, ErrorCode::Model, format!("{} tokens exceed the session's bound of {}", pos + n, sess.max_tokens));
            report(&mut self.outbox, &owner, req.request, e);
            return;
        }
        // The cache grows to pos + n tokens: within the shard's budget, at
        // the expense of the biggest owner's least recently used caches.
        let need = (pos + n) * self.shard.cache_bytes_per_token();
        if let Err(why) = self.make_room(req.session, &owner, need) {
            if let Some(sess) = self.sessions.get_mut(&req.session) {
                sess.cache = Some(cache);
            }
            report(&mut self.outbox, &owner, req.request, stage_error(req.session, &local, ErrorCode::Busy, why));
            return;
        }
        tracing::trace!(session = req.session, step = req.step, "forward start");
        let shard = self.shard.clone();
        let t0 = Instant::now();
        let joined = self.compute.run(move || {
            let r = match &input {
                Input::Tokens(t) => shard.forward(&mut cache, ShardInput::Tokens(t), LogitsFor::Last),
                Input::Hidden(h) => shard.forward(&mut cache, ShardInput::Hidden(h), LogitsFor::Last),
            };
            (cache, r)
        })
        .await;
        let Some(sess) = self.sessions.get_mut(&req.session) else { return };
        let (cache, out) = match joined {
            Ok(v) => v,
            Err(e) => {
                let e = stage_error(req.session, &local, ErrorCode::Internal, format!("forward pass failed: {e}"));
                report(&mut self.outbox, &owner, req.request, e);
                self.sessions.remove(&req.session);
                self.rt.forget_served(req.session);
                return;
            }
        };
        sess.cache = Some(cache);
        self.tokens.fetch_add(n as u64, Ordering::Relaxed);
        let took = t0.elapsed();
        metrics::histogram!(crate::metrics::STAGE_SECONDS, "layers" => self.label.clone()).record(took.as_secs_f64());
        metrics::counter!(crate::metrics::STAGE_TOKENS, "layers" => self.label.clone()).increment(n as u64);
        let us = took.as_micros() as u64 / n.max(1) as u64;
        let old = self.us_per_token.load(Ordering::Relaxed);
        self.us_per_token.store(if old == 0 { us } else { (old * 7 + us) / 8 }, Ordering::Relaxed);
        tracing::trace!(session = req.session, step = req.step, "forward done");
        match out {
            Err(err) => {
                let e = stage_error(req.session, &local, ErrorCode::Model, err.to_string());
                report(&mut self.outbox, &owner, req.request, e);
            }
            Ok(ShardOutput::Hidden(h)) => {
                let Some(next) = sess.next.clone() else {
                    let e = stage_error(req.session, &local, ErrorCode::Internal, "hidden states but no next stage");
                    report(&mut self.outbox, &owner, req.request, e);
                    return;
                };
                // Lossless unless the link to the next stage is the
                // bottleneck (or the node was told otherwise).
                let encoding = self.links.encoding(&next, h.len() * 4, took.as_secs_f64());
                let mut bytes = Vec::new();
                if let Err(err) = self.codec.encode(&h, n, d, encoding, &mut bytes) {
                    let e = stage_error(req.session, &local, ErrorCode::Internal, err.to_string());
                    report(&mut self.outbox, &owner, req.request, e);
                    return;
                }
                self.links.sent(encoding);
                metrics::counter!(crate::metrics::WIRE_BYTES, "encoding" => encoding.name()).increment(bytes.len() as u64);
                let msg = Message::StageRequest(StageRequest {
                    request: req.request,
                    session: req.session,
                    step: req.step,
                    stage: req.stage + 1,
                    position: req.position,
                    sample: req.sample,
                    input: StageInput::Activation(bytes),
                });
                // Sent in the background: a slow link to the next stage
                // holds up only this session. Its failure is reported to
                // the owner (which replaces the hop).
                let (host, session, request, hop) = (self.rt.clone(), req.session, req.request, next.clone());
                self.outbox.push(&next, msg, move |err| {
                    let e = stage_error(session, &hop, ErrorCode::NotServed, format!("next stage unreachable: {err}"));
                    tokio::spawn(async move { host.report(&owner, request, e).await });
                });
            }
            Ok(ShardOutput::Logits(l)) => {
                if !req.sample {
                    return;
                }
                // A resent step: the history and the sampler go back to
                // where the step began, so it draws the same token again.
                let upto = pos + n;
                if sess.history.len() > upto && upto >= sess.open_len {
                    sess.history.truncate(upto);
                    let draws = sess.open_draws + (upto - sess.open_len) as u64;
                    if let Ok(s) = Sampler::resume(sess.params.clone(), draws) {
                        sess.sampler = Some(s);
                    }
                }
                let Some(sampler) = sess.sampler.as_mut() else { return };
                let token = match sampler.sample(&l, &sess.history) {
                    Ok(t) => t,
                    Err(err) => {
                        let e = stage_error(req.session, &local, ErrorCode::Model, err.to_string());
                        report(&mut self.outbox, &owner, req.request, e);
                        return;
                    }
                };
                sess.history.push(token);
                let msg = Message::TokenResult(TokenResult {
                    session: req.session,
                    step: req.step,
                    token,
                    logprob: log_prob(&l, token),
                });
                let (host, me, session) = (self.rt.clone(), self.myself.clone(), req.session);
                self.outbox.push(&owner, msg, move |err| {
                    tracing::info!(session, error = %err, "session owner unreachable; dropping its cache");
                    host.forget_served(session);
                    let _ = me.cast(ShardMsg::Close(session));
                });
            }
        }
    }
}

/// Queues a failed stage request's report for `to`.
fn report(outbox: &mut Outbox, to: &str, request: u64, err: StageError) {
    let msg = Message::StageReply(StageReply { request, outcome: StageOutcome::Error(err) });
    outbox.push(to, msg, |e| tracing::debug!(error = %e, "could not report a stage error"));
}

enum Input {
    Tokens(Vec<u32>),
    Hidden(Vec<f32>),
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
            sessions: HashMap::new(),
            codec: ActivationCodec::new(),
            tokens: args.tokens,
        })
    }

    async fn handle(&self, _myself: ActorRef<ShardMsg>, msg: ShardMsg, st: &mut ShardState) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Open(open, reply) => {
                let _ = reply.send(st.open(*open));
            }
            ShardMsg::Work(from, owner, req) => {
                st.queued.leave(&owner);
                st.work(from, req).await;
            }
            ShardMsg::Close(session) => {
                st.sessions.remove(&session);
            }
            ShardMsg::Status(reply) => {
                let r = st.shard.range();
                let _ = reply.send(ShardStatus {
                    start: r.start,
                    end: r.end,
                    sessions: st.sessions.len(),
                    memory_bytes: st.shard.memory_bytes(),
                    cache_bytes: st.sessions.values().filter_map(|s| s.cache.as_ref()).map(|c| c.memory_bytes()).sum(),
                    tokens: st.tokens.load(Ordering::Relaxed),
                    queued: st.queued.len(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::WorkQueue;

    #[test]
    fn one_owner_fills_at_most_half_the_queue_and_another_still_gets_in() {
        let q = WorkQueue::default();
        for _ in 0..4 {
            q.enter("flood", 8).unwrap();
        }
        assert!(q.enter("flood", 8).unwrap_err().contains("its share"));
        for _ in 0..4 {
            q.enter("calm", 8).unwrap();
        }
        assert!(q.enter("third", 8).unwrap_err().contains("already wait"));
        q.leave("flood");
        q.enter("third", 8).unwrap();
        assert_eq!(q.len(), 8);
        // A leave of an owner with nothing waiting changes nothing.
        q.leave("nobody");
        assert_eq!(q.len(), 8);
    }
}
