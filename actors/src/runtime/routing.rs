//! Inbound traffic and calls: stage requests to the shard serving their
//! session, tokens and stage errors to the session owning them, session
//! opens, load probes, bids and awards; and sending, looped back in-process
//! when the peer is this one.

use std::time::Duration;

use fogmesh_protocols::{ErrorCode, Message, NodeId, SessionOpen, ShardAdvert, StageError, StageOutcome, StageReply};

use crate::shard_actor::ShardHost as _;

use super::{Runtime, Served, lock};
use crate::error::Refusal;
pub use crate::error::error_frame;
use crate::link::LinkError;
use crate::session::SessionMsg;
use crate::shard_actor::ShardMsg;

impl Runtime {
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

    /// Stage traffic from `from`.
    pub async fn deliver(&self, from: &str, msg: Message) {
        match msg {
            Message::StageRequest(req) => {
                tracing::trace!(session = req.session, step = req.step, stage = req.stage, "stage request in");
                let served = lock(&self.0.served).get(&req.session).cloned();
                let Some(Served { slot, owner, prev, .. }) = served else {
                    let err = StageError {
                        session: req.session,
                        peer: Some(NodeId::from(self.0.local.as_str())),
                        code: ErrorCode::UnknownSession,
                        reason: format!("session {} is not open on {}", req.session, self.0.local),
                    };
                    self.report(from, req.request, err).await;
                    return;
                };
                if from != prev {
                    // Only the previous hop (the owner, for the first stage)
                    // feeds a session: nobody else can write into its cache.
                    tracing::debug!(peer = from, session = req.session, "stage request from a peer that is not the previous hop");
                    let err = StageError {
                        session: req.session,
                        peer: Some(NodeId::from(self.0.local.as_str())),
                        code: ErrorCode::Malformed,
                        reason: format!("{from} is not the previous hop of session {} here", req.session),
                    };
                    self.report(from, req.request, err).await;
                    return;
                }
                if let Err(why) = slot.queued.enter(&owner, self.0.cfg.max_queue) {
                    let err = StageError {
                        session: req.session,
                        peer: Some(NodeId::from(self.0.local.as_str())),
                        code: ErrorCode::Busy,
                        reason: format!("{why} (layers {:?})", slot.range),
                    };
                    self.report(&owner, req.request, err).await;
                    return;
                }
                if slot.actor.cast(ShardMsg::Work(from.to_string(), owner.clone(), req)).is_err() {
                    slot.queued.leave(&owner);
                }
            }
            Message::TokenResult(t) => {
                tracing::trace!(session = t.session, step = t.step, "token in");
                if let Some(a) = lock(&self.0.sessions).get(&t.session) {
                    let _ = a.cast(SessionMsg::Token(from.to_string(), t));
                }
            }
            Message::StageReply(StageReply { outcome: StageOutcome::Error(e), request }) => {
                let owner_actor = lock(&self.0.sessions).get(&e.session).cloned();
                if let Some(a) = owner_actor {
                    let _ = a.cast(SessionMsg::Failed(from.to_string(), e));
                    return;
                }
                // A stage error from our next hop, for a session we serve,
                // goes on to its owner.
                let owner = lock(&self.0.served)
                    .get(&e.session)
                    .filter(|s| s.next.as_deref() == Some(from))
                    .map(|s| s.owner.clone());
                if let Some(owner) = owner.filter(|o| *o != from) {
                    self.report(&owner, request, e).await;
                }
            }
            Message::SessionClose(c) => self.close_served(from, c.session),
            Message::SessionCancel(c) => self.close_served(from, c.session),
            other => tracing::debug!(peer = from, kind = ?other.kind(), "unexpected stage traffic ignored"),
        }
    }

    /// Closes a served session at its owner's (or this peer's) request;
    /// anyone else's is ignored.
    fn close_served(&self, from: &str, session: u64) {
        let mut served = lock(&self.0.served);
        if served.get(&session).is_some_and(|s| s.owner == from || from == self.0.local) {
            if let Some(s) = served.remove(&session) {
                let _ = s.slot.actor.cast(ShardMsg::Close(session));
            }
        } else if served.contains_key(&session) {
            tracing::debug!(peer = from, session, "close of a session by a peer that does not own it ignored");
        }
    }

    /// A call from `from`; returns the answer.
    pub async fn handle_call(&self, from: &str, msg: Message) -> Message {
        match msg {
            Message::SessionOpen(open) => match self.open_served(from, open).await {
                Ok(m) => m,
                Err(r) => error_frame(r.code, r.reason),
            },
            Message::LoadReport(_) => Message::LoadReport(self.load_report().await),
            Message::WeightChunkRequest(r) => {
                let busy = self.shards().await.iter().any(|s| s.queued.len() > 0);
                self.0.weights.serve(self.0.model.get().map(|m| (m.hash, &m.source)), r, busy).await
            }
            Message::CallForBids(c) => match self.bid(from, &c).await {
                Some(b) => Message::Bid(b),
                None => error_frame(ErrorCode::NotServed, "this peer holds no such model or range"),
            },
            // An auction this peer bid in is decided: its bid no longer holds.
            Message::Award(a) => {
                lock(&self.0.bids).release(&(from.to_string(), a.auction));
                Message::Award(a)
            }
            Message::SessionClose(c) => {
                self.close_served(from, c.session);
                Message::SessionClose(c)
            }
            other => error_frame(ErrorCode::NotServed, format!("{:?} is not a call this peer answers", other.kind())),
        }
    }

    async fn open_served(&self, from: &str, open: SessionOpen) -> Result<Message, Refusal> {
        let model = self.0.model.get().ok_or_else(|| Refusal::new(ErrorCode::NotServed, "this peer holds no model"))?;
        if open.model != model.hash {
            return Err(Refusal::new(ErrorCode::NotServed, format!("this peer does not hold model {}", fogmesh_protocols::hex(&open.model))));
        }
        let (start, end) = (open.start as usize, open.end as usize);
        if start >= end || end > model.config.layers {
            return Err(Refusal::new(ErrorCode::Malformed, format!("layers {start}..{end} are not a range of a {}-layer model", model.config.layers)));
        }
        if open.owner.as_str().is_empty() || open.owner.as_str() != from && from != self.0.local {
            return Err(Refusal::new(ErrorCode::Malformed, "a session is opened by its owner".to_string()));
        }
        if open.next.as_ref().is_some_and(|n| n.as_str() == self.0.local) {
            return Err(Refusal::new(ErrorCode::Malformed, "a session's next hop cannot be the stage itself"));
        }
        if u64::from(open.draws) > u64::from(open.max_tokens) {
            return Err(Refusal::new(ErrorCode::Malformed, format!("{} draws for a session of at most {} tokens", open.draws, open.max_tokens)));
        }
        if lock(&self.0.served).contains_key(&open.session) {
            return Err(Refusal::new(ErrorCode::Malformed, format!("session {} is already open here", open.session)));
        }
        let slot = self.ensure_shard(start..end).await.map_err(|e| Refusal::new(ErrorCode::Busy, e.to_string()))?;
        let session = open.session;
        let owner = open.owner.as_str().to_string();
        let prev = open.prev.as_ref().map_or_else(|| owner.clone(), |p| p.as_str().to_string());
        let next = open.next.as_ref().map(|n| n.as_str().to_string());
        let opened = match slot.actor.call(|port| ShardMsg::Open(Box::new(open), port), Some(Duration::from_secs(10))).await {
            Ok(ractor::rpc::CallResult::Success(Ok(opened))) => opened,
            Ok(ractor::rpc::CallResult::Success(Err(e))) => return Err(Refusal::new(e.code, e.reason)),
            _ => return Err(Refusal::new(ErrorCode::Internal, "shard actor did not answer".to_string())),
        };
        // The shard actor refuses an id it holds, so two opens racing past
        // the check above cannot both get here.
        lock(&self.0.served).insert(session, Served { slot, owner, prev, next });
        Ok(Message::ShardAdvert(ShardAdvert {
            peer: NodeId::from(self.0.local.as_str()),
            model: model.hash,
            start: start as u32,
            end: end as u32,
            cached: opened.cached,
            bound: opened.bound,
        }))
    }

}
