//! SessionActor: owns one generation. It gets a route from placement, opens
//! the session on every hop, feeds the prompt in chunks to the first stage
//! (the stages pass activations forward themselves; the last one samples and
//! sends the token here), feeds each token back, and streams steps to its
//! caller. On a failed or late hop it bans the culprit with backoff, takes a
//! new route without it, replays the whole history to rebuild the caches
//! and the sampler there, and goes on with the same tokens.

use std::sync::Arc;
use std::time::Instant;

use fogmesh_models::{GenerateRequest, GenerationState, Timings};
use fogmesh_protocols::{
    ErrorCode, Message, NodeId, SessionClose, SessionOpen, StageError, StageInput, StageRequest, TokenResult,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use crate::host::Host;
use crate::error::{RuntimeError, SessionError};
use crate::link::{LinkError, PeerKey, PeerView};
use crate::model::ModelInfo;
use crate::policy::{self, BanList, Hop, LateStep, Trouble};

mod award;
mod close;
mod event;
pub use event::SessionEvent;

/// What a session actor needs of its peer beyond [`Host`]: routes and the
/// view, auctions for its hops, ids, calls (looped back in-process when the
/// peer is this one), and registration of its wire ids so inbound tokens
/// and stage errors reach it.
#[async_trait::async_trait]
pub trait SessionHost: Host {
    /// A fresh id (wire sessions, requests).
    fn next_id(&self) -> u64;
    /// The routes placement gives (the preferred first), leaving out
    /// `excluded`.
    async fn routes(&self, excluded: &[PeerKey]) -> Result<Vec<Vec<Hop>>, RuntimeError>;
    /// The peers as placement sees them (this one included).
    async fn view(&self) -> Vec<PeerView>;
    /// Runs an auction among `candidates` (the planned peer first) for
    /// `range` of a `tokens`-token task, `cached` naming a candidate that
    /// holds that many of them already; the winner and its promise in
    /// seconds.
    async fn auction(&self, candidates: &[PeerKey], range: std::ops::Range<usize>, tokens: usize, cached: Option<(&str, usize)>) -> Option<(PeerKey, f64)>;
    /// Remembers the route a finished session's history was left on.
    fn remember_route(&self, history: &[u32], route: &[Hop]);
    /// The hops holding the longest remembered prefix of `history`.
    fn prefix_holders(&self, history: &[u32]) -> Vec<crate::policy::affinity::Held>;
    /// How an awarded peer's promise turned out.
    fn auction_outcome(&self, peer: &str, promised_s: f64, actual_s: f64);
    /// Calls `peer`.
    async fn call(&self, peer: &str, msg: Message) -> Result<Message, LinkError>;
    /// Routes inbound traffic for wire session `wire` to `actor`.
    fn register_session(&self, wire: u64, actor: ActorRef<SessionMsg>);
    /// Stops routing wire session `wire`.
    fn unregister_session(&self, wire: u64);
    /// Whether any shard of this peer has stage work waiting.
    async fn local_busy(&self) -> bool;
}

/// Messages of a [`SessionActor`].
#[derive(Debug)]
pub enum SessionMsg {
    /// Open the route and feed the prompt (sent by the actor to itself).
    Start,
    /// A token, from the given peer (the last stage, if it is honest).
    Token(PeerKey, TokenResult),
    /// A stage failure, reported by the given peer.
    Failed(PeerKey, StageError),
    /// A step's deadline passed.
    Timeout {
        /// Which route attempt it concerns.
        wire: u64,
        /// Which step.
        step: u32,
    },
    /// A peer's connection closed.
    PeerLost(PeerKey),
    /// Stop the generation everywhere.
    Cancel(String),
}

/// State of a [`SessionActor`].
pub struct SessionState {
    rt: Arc<dyn SessionHost>,
    model: Arc<ModelInfo>,
    state: Option<GenerationState>,
    max_tokens: usize,
    events: mpsc::Sender<SessionEvent>,
    route: Vec<Hop>,
    /// Ping round trips to the route's hops, as the view had them when the
    /// route opened (steps' deadlines grow with them).
    route_rtts: Vec<Option<std::time::Duration>>,
    /// The session id on the wire for the current route (new per route).
    wire: u64,
    step: u32,
    pending_tokens: usize,
    /// The current step's input and where it starts, for a resend.
    step_input: (Vec<u32>, usize),
    stalls: u32,
    /// Deadlines missed while the pipeline had work queued (reset by a token).
    busy_waits: u32,
    /// Since when, and how many times, routes refused to open for want of
    /// room ([`ErrorCode::Full`]).
    full_since: Option<Instant>,
    full_waits: u32,
    bans: BanList,
    failovers: u32,
    failed_at: Option<Instant>,
    started: Instant,
    first_token: Option<Instant>,
    timer: Option<tokio::task::JoinHandle<Result<(), ractor::MessagingErr<SessionMsg>>>>,
    done: bool,
    /// Awarded hops of the current route and what they promised (seconds).
    promises: Vec<(PeerKey, f64)>,
    /// When the current route was opened.
    opened: Instant,
}

/// The actor owning one generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionActor;

impl SessionState {
    fn state(&mut self) -> &mut GenerationState {
        self.state.as_mut().expect("generation state present until done")
    }

    async fn emit(&mut self, e: SessionEvent) -> bool {
        self.events.send(e).await.is_ok()
    }

    fn arm(&mut self, myself: &ActorRef<SessionMsg>, tokens: usize) {
        if let Some(t) = self.timer.take() {
            t.abort();
        }
        let (wire, step) = (self.wire, self.step);
        let d = self.rt.config().deadlines.step_over(tokens, &self.route_rtts);
        self.timer = Some(myself.send_after(d, move || SessionMsg::Timeout { wire, step }));
    }

    /// Opens a route and replays the history into it; retries other routes
    /// as hops fail, until it works or the failover budget is spent.
    async fn establish(&mut self, myself: &ActorRef<SessionMsg>) -> Result<(), SessionError> {
        loop {
            let now = Instant::now();
            let routes = self.rt.routes(&self.bans.banned(now)).await.map_err(|e| SessionError::NoRoute(e.to_string()))?;
            let tokens = self.state.as_ref().map_or(0, |g| g.history().len());
            let route = self.award_hops(routes, tokens).await;
            // Random, so no peer can guess another session's id.
            let wire = rand::random::<u64>().max(1);
            let state = self.state.as_ref().expect("generation state");
            let history = state.history().to_vec();
            let draws = state.sampler().draws();
            let sampling = crate::wire::sampling_spec(state.sampler().params());
            let mut failed = Vec::new();
            let opens = route.iter().enumerate().map(|(i, h)| {
                let open = SessionOpen {
                    session: wire,
                    model: self.model.hash,
                    start: h.start as u32,
                    end: h.end as u32,
                    max_tokens: (history.len() + self.max_tokens).min(self.model.config.context) as u32,
                    owner: NodeId::from(self.rt.local_peer()),
                    prev: i.checked_sub(1).map(|p| NodeId::from(route[p].peer.as_str())),
                    next: route.get(i + 1).map(|n| NodeId::from(n.peer.as_str())),
                    sampling: sampling.clone(),
                    history: history.clone(),
                    draws: draws.min(u32::MAX as u64) as u32,
                };
                let rt = self.rt.clone();
                let peer = h.peer.clone();
                async move { (peer.clone(), rt.call(&peer, Message::SessionOpen(open)).await) }
            });
            let mut reasons = Vec::new();
            let mut full = Vec::new();
            // The prefix every stage holds already, and the room they have.
            let (mut cached, mut bound) = (history.len(), usize::MAX);
            for (peer, r) in futures::future::join_all(opens).await {
                match r {
                    Ok(Message::ShardAdvert(a)) => (cached, bound) = (cached.min(a.cached as usize), bound.min(a.bound as usize)),
                    // Healthy, but its room for sessions is taken: wait.
                    Ok(Message::Error(e)) if e.code == ErrorCode::Full => full.push(format!("{peer}: {}", e.message)),
                    Ok(Message::Error(e)) => {
                        reasons.push(format!("{peer}: {}", e.message));
                        failed.push(peer);
                    }
                    Ok(other) => {
                        reasons.push(format!("{peer}: answered {:?}", other.kind()));
                        failed.push(peer);
                    }
                    Err(e) => {
                        reasons.push(e.to_string());
                        failed.push(peer);
                    }
                }
            }
            if failed.is_empty() && full.is_empty() {
                let view = self.rt.view().await;
                self.route_rtts = route
                    .iter()
                    .map(|h| view.iter().find(|p| p.peer == h.peer).and_then(|p| p.rtt_ms).and_then(|ms| std::time::Duration::try_from_secs_f32(ms / 1e3).ok()))
                    .collect();
                self.wire = wire;
                self.route = route;
                self.rt.register_session(wire, myself.clone());
                self.stalls = 0;
                self.busy_waits = 0;
                self.opened = Instant::now();
                if let Some(g) = self.state.as_mut() {
                    g.limit_positions(bound);
                }
                // Less than the whole history, so that the last token runs.
                let skip = cached.min(history.len().saturating_sub(1));
                metrics::counter!(crate::metrics::PREFIX_TOKENS).increment(skip as u64);
                self.send_tokens(myself, &history[skip..], skip).await;
                return Ok(());
            }
            for h in &route {
                let _ = self.rt.send(&h.peer, Message::SessionClose(SessionClose { session: wire })).await;
            }
            if failed.is_empty() {
                // Only full peers: ask again shortly, up to the wait bound.
                let (wait, why) = (self.rt.config().open_wait, full.join("; "));
                let Some(pause) = policy::full_pause(self.full_since.get_or_insert(now).elapsed(), wait, self.full_waits) else {
                    return Err(SessionError::Busy(format!("no route had room for this session's cache within {} s: {why}", wait.as_secs())));
                };
                self.full_waits += 1;
                tracing::debug!(pause_ms = pause.as_millis() as u64, reason = %why, "route full; waiting for room");
                tokio::time::sleep(pause).await;
                continue;
            }
            let reason = reasons.join("; ");
            self.note_failure(&failed, &reason).await?;
        }
    }

    /// Bans `peers` and counts a failover; errs when the budget is spent.
    async fn note_failure(&mut self, peers: &[PeerKey], reason: &str) -> Result<(), SessionError> {
        let now = Instant::now();
        self.failed_at.get_or_insert(now);
        self.failovers += 1;
        let local = self.rt.local_peer().to_string();
        let banned: Vec<PeerKey> = peers.iter().filter(|p| **p != local).cloned().collect();
        for p in &banned {
            let d = self.bans.ban(p, now);
            tracing::warn!(peer = %p, ban_ms = d.as_millis() as u64, reason, "banning peer");
        }
        if self.failovers > self.rt.config().max_failovers {
            return Err(SessionError::GaveUp { failovers: self.failovers - 1, last: reason.to_string() });
        }
        metrics::counter!(crate::metrics::FAILOVERS).increment(1);
        self.emit(SessionEvent::Failover { banned, reason: reason.to_string() }).await;
        Ok(())
    }

    /// Sends `tokens` (starting at position `pos` = cache length) to the first
    /// stage, in chunks; the last chunk asks for a sample.
    async fn send_tokens(&mut self, myself: &ActorRef<SessionMsg>, tokens: &[u32], pos: usize) {
        let chunk = self.rt.config().prefill_chunk.max(1);
        let Some(first) = self.route.first().map(|h| h.peer.clone()) else {
            let _ = myself.cast(SessionMsg::Failed(self.rt.local_peer().to_string(), StageError {
                session: self.wire,
                peer: None,
                code: ErrorCode::NotServed,
                reason: "the route has no hop".into(),
            }));
            return;
        };
        let n = tokens.len();
        if self.step_input.1 != pos || self.step_input.0 != tokens {
            self.step_input = (tokens.to_vec(), pos);
        }
        for (i, c) in tokens.chunks(chunk).enumerate() {
            let msg = Message::StageRequest(StageRequest {
                request: self.rt.next_id(),
                session: self.wire,
                step: self.step,
                stage: 0,
                position: (pos + i * chunk) as u32,
                sample: (i + 1) * chunk >= n,
                input: StageInput::Tokens(c.to_vec()),
            });
            if let Err(e) = self.rt.send(&first, msg).await {
                self.pending_tokens = n;
                let _ = myself.cast(SessionMsg::Failed(self.rt.local_peer().to_string(), StageError {
                    session: self.wire,
                    peer: Some(NodeId::from(first.as_str())),
                    code: ErrorCode::NotServed,
                    reason: e.to_string(),
                }));
                return;
            }
        }
        self.pending_tokens = n;
        self.arm(myself, n);
    }

    /// Probes every remote hop: the ones that did not answer, and whether
    /// any hop (this peer's included) has stage work waiting, i.e. the
    /// pipeline is busy rather than broken.
    async fn probe(&self) -> (Vec<PeerKey>, bool) {
        let local = self.rt.local_peer().to_string();
        let t = self.rt.config().probe_timeout;
        let probes = self.route.iter().filter(|h| h.peer != local).map(|h| {
            let rt = self.rt.clone();
            let peer = h.peer.clone();
            async move {
                let q = Message::LoadReport(fogmesh_protocols::LoadReport { peer: NodeId::default(), timestamp_ms: 0, shards: vec![] });
                match tokio::time::timeout(t, rt.call(&peer, q)).await {
                    Ok(Ok(Message::LoadReport(r))) => (peer, true, r.shards.iter().any(|s| s.queue_depth > 0)),
                    _ => (peer, false, false),
                }
            }
        });
        let answers = futures::future::join_all(probes).await;
        let local_busy = self.rt.local_busy().await;
        let busy = local_busy || answers.iter().any(|(_, _, b)| *b);
        (answers.into_iter().filter(|(_, ok, _)| !ok).map(|(p, _, _)| p).collect(), busy)
    }

    async fn trouble(&mut self, myself: &ActorRef<SessionMsg>, t: Trouble) -> Result<(), SessionError> {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        let (culprits, reason) = match t {
            Trouble::Culprits(c, r) => (c, r),
            Trouble::Rebuild(r) => (Vec::new(), r),
            Trouble::Unknown(r) => {
                let (dead, busy) = self.probe().await;
                let local = self.rt.local_peer().to_string();
                match policy::late_step(&r, dead, busy, self.busy_waits, self.stalls, &self.route, &local) {
                    LateStep::FailOver(culprits, reason) => (culprits, reason),
                    wait => {
                        // Every hop answers: the pipeline is loaded or slow,
                        // not broken; wait another deadline.
                        let busy = wait == LateStep::WaitBusy;
                        if busy {
                            self.busy_waits += 1;
                        } else {
                            self.stalls += 1;
                        }
                        if !busy {
                            // Nothing queued anywhere and everyone answers:
                            // the step's frames were lost (a cut stream, a
                            // dropped frame). Send it again under the same
                            // step id; every stage recomputes it from its
                            // position and the last one draws the same token.
                            metrics::counter!(crate::metrics::STEP_RESENDS).increment(1);
                            tracing::info!(session = self.wire, step = self.step, "step is late, nothing is queued and every hop answers: resending it");
                            let (tokens, pos) = self.step_input.clone();
                            self.send_tokens(myself, &tokens, pos).await;
                            return Ok(());
                        }
                        tracing::debug!(session = self.wire, step = self.step, busy, "step is late but every hop answers; waiting longer");
                        let n = self.pending_tokens;
                        self.arm(myself, n);
                        return Ok(());
                    }
                }
            }
        };
        // The surviving hops drop the old route's session before the new
        // one opens: a peer with little memory may have to swap the range
        // it served for the bigger one the new route gives it.
        self.close_route_now(&culprits).await;
        self.note_failure(&culprits, &reason).await?;
        self.establish(myself).await
    }

    async fn on_token(&mut self, myself: &ActorRef<SessionMsg>, t: TokenResult) -> Result<bool, SessionError> {
        if t.session != self.wire || t.step != self.step || self.done {
            return Ok(false);
        }
        if t.token as usize >= self.model.tokenizer.vocab_size() {
            let last = self.route.last().map(|h| h.peer.clone()).unwrap_or_default();
            let why = format!("last stage sent token id {} outside the vocabulary", t.token);
            self.trouble(myself, Trouble::Culprits(vec![last], why)).await?;
            return Ok(false);
        }
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        self.stalls = 0;
        self.busy_waits = 0;
        // The first token on a route settles its awarded hops' promises: each
        // is charged its share of the time to that token.
        if !self.promises.is_empty() {
            let actual = self.opened.elapsed().as_secs_f64();
            let total: f64 = self.promises.iter().map(|(_, p)| p).sum();
            for (peer, promised) in self.promises.drain(..) {
                if total > 0.0 {
                    self.rt.auction_outcome(&peer, promised, actual * promised / total);
                }
            }
        }
        let step = self.state().push_sampled(t.token).map_err(|e| SessionError::Generation(e.to_string()))?;
        let now = Instant::now();
        self.first_token.get_or_insert(now);
        if let Some(at) = self.failed_at.take() {
            let route = self.route.clone();
            let took = now.duration_since(at);
            metrics::histogram!(crate::metrics::RECOVERY_SECONDS).record(took.as_secs_f64());
            self.emit(SessionEvent::Recovered { route, recovery_ms: took.as_secs_f64() * 1e3 }).await;
        }
        let finished = step.finish.is_some();
        if !self.emit(SessionEvent::Token { step, logprob: t.logprob }).await {
            return Err(SessionError::CallerGone);
        }
        if finished {
            return Ok(true);
        }
        let pos = self.state.as_ref().map_or(0, |g| g.history().len()) - 1;
        if pos + 1 >= self.model.config.context {
            let step = self.state().end_context();
            self.emit(SessionEvent::Token { step, logprob: 0.0 }).await;
            return Ok(true);
        }
        self.step += 1;
        self.send_tokens(myself, &[t.token], pos).await;
        Ok(false)
    }

    async fn finish(&mut self, myself: &ActorRef<SessionMsg>, outcome: Result<(), SessionError>) {
        self.done = true;
        if let Some(t) = self.timer.take() {
            t.abort();
        }
        self.close_route();
        match outcome {
            Ok(()) => {
                let first = self.first_token.unwrap_or(self.started);
                let state = self.state.take().expect("generation state");
                let timings = Timings {
                    prefill_tokens: state.prompt().len(),
                    prefill_ms: first.duration_since(self.started).as_secs_f64() * 1e3,
                    decode_tokens: state.tokens().len().saturating_sub(1),
                    decode_ms: first.elapsed().as_secs_f64() * 1e3,
                };
                // The stages keep the history each session opened with.
                self.rt.remember_route(state.prompt(), &self.route);
                let generation = state.into_generation(timings);
                metrics::counter!(crate::metrics::SESSIONS, "outcome" => "done").increment(1);
                metrics::counter!(crate::metrics::PROMPT_TOKENS).increment(generation.prompt_tokens.len() as u64);
                metrics::counter!(crate::metrics::GENERATED_TOKENS).increment(generation.tokens.len() as u64);
                let route = self.route.clone();
                let failovers = self.failovers;
                self.emit(SessionEvent::Done { generation, route, failovers }).await;
            }
            Err(e) => {
                let busy = matches!(e, SessionError::Busy(_));
                metrics::counter!(crate::metrics::SESSIONS, "outcome" => if busy { "busy" } else { "error" }).increment(1);
                self.emit(match e {
                    SessionError::Busy(why) => SessionEvent::Busy(why),
                    e => SessionEvent::Error(e.to_string()),
                })
                .await;
            }
        }
        myself.stop(None);
    }
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = (Arc<dyn SessionHost>, Arc<ModelInfo>, GenerateRequest, mpsc::Sender<SessionEvent>);

    async fn pre_start(&self, myself: ActorRef<SessionMsg>, args: Self::Arguments) -> Result<SessionState, ActorProcessingErr> {
        let (rt, model, req, events) = args;
        let state =
            GenerationState::new(model.tokenizer.clone(), req.prompt, req.max_tokens, req.sampling, req.stop, 0)?;
        let cfg = rt.config();
        let bans = BanList::new(cfg.ban_base, cfg.ban_max);
        myself.cast(SessionMsg::Start)?;
        Ok(SessionState {
            rt,
            model,
            state: Some(state),
            max_tokens: req.max_tokens,
            events,
            route: Vec::new(),
            route_rtts: Vec::new(),
            wire: 0,
            step: 0,
            pending_tokens: 0,
            step_input: (Vec::new(), 0),
            stalls: 0,
            busy_waits: 0,
            full_since: None,
            full_waits: 0,
            bans,
            failovers: 0,
            failed_at: None,
            started: Instant::now(),
            first_token: None,
            timer: None,
            done: false,
            promises: Vec::new(),
            opened: Instant::now(),
        })
    }

    async fn handle(&self, myself: ActorRef<SessionMsg>, msg: SessionMsg, st: &mut SessionState) -> Result<(), ActorProcessingErr> {
        if st.done {
            return Ok(());
        }
        let r = match msg {
            SessionMsg::Start => {
                if st.state.as_ref().and_then(|g| g.finished()).is_some() {
                    Ok(true)
                } else {
                    match st.establish(&myself).await {
                        Ok(()) => {
                            let route = st.route.clone();
                            st.emit(SessionEvent::Started { route }).await;
                            Ok(false)
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            SessionMsg::Token(from, t) => {
                // Tokens come from the last hop only.
                if st.route.last().is_none_or(|h| h.peer != from) {
                    tracing::debug!(peer = %from, session = t.session, "token from a peer that is not the last hop ignored");
                    return Ok(());
                }
                st.on_token(&myself, t).await
            }
            SessionMsg::Failed(from, e) => {
                if e.session != st.wire {
                    return Ok(());
                }
                let local = st.rt.local_peer().to_string();
                let Some(i) = st.route.iter().position(|h| h.peer == from).or((from == local).then_some(usize::MAX)) else {
                    tracing::debug!(peer = %from, session = e.session, "stage error from a peer off the route ignored");
                    return Ok(());
                };
                // A hop may blame itself or a neighbour (an undecodable
                // input, an unreachable next hop); blaming anyone else
                // blames the reporter.
                let named = e.peer.as_ref().map_or("", NodeId::as_str);
                let neighbour = |j: Option<usize>| j.and_then(|j| st.route.get(j)).is_some_and(|h| h.peer == named);
                let trusted = named.is_empty() || from == local || named == from || neighbour(i.checked_add(1)) || neighbour(i.checked_sub(1));
                let culprit = if trusted { named } else { from.as_str() };
                let t = policy::stage_trouble(e.code, culprit, e.reason, st.rt.local_peer());
                match t {
                    Ok(t) => st.trouble(&myself, t).await.map(|()| false),
                    Err(e) => Err(e),
                }
            }
            SessionMsg::Timeout { wire, step } => {
                if wire != st.wire || step != st.step {
                    return Ok(());
                }
                let t = Trouble::Unknown(format!("step {step} took longer than {:?}", st.rt.config().deadlines.step_over(st.pending_tokens, &st.route_rtts)));
                st.trouble(&myself, t).await.map(|()| false)
            }
            SessionMsg::PeerLost(peer) => {
                if !st.route.iter().any(|h| h.peer == peer) || st.wire == 0 {
                    return Ok(());
                }
                let t = Trouble::Culprits(vec![peer], "its connection closed".into());
                st.trouble(&myself, t).await.map(|()| false)
            }
            SessionMsg::Cancel(reason) => Err(SessionError::Cancelled(reason)),
        };
        match r {
            Ok(false) => {}
            Ok(true) => st.finish(&myself, Ok(())).await,
            Err(e) => st.finish(&myself, Err(e)).await,
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<SessionMsg>, st: &mut SessionState) -> Result<(), ActorProcessingErr> {
        if !st.done {
            st.close_route();
        }
        Ok(())
    }
}
