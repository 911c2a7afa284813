//! Where a step's output goes when its pass ends: hidden states to the next
//! stage, encoded for that hop; on the last stage, a token sampled and sent
//! to the session's owner.

use std::time::Instant;

use fogmesh_models::{ModelError, Sampler, SessionCache, ShardOutput, log_prob};
use fogmesh_protocols::{ErrorCode, Message, StageInput, StageRequest, TokenResult};

use super::{ShardMsg, ShardState, Step, report, stage_error};

impl ShardState {
    /// One step's output: hidden states to the next stage, or a sampled
    /// token to the session's owner; its cache back in place.
    pub(super) fn deliver(&mut self, step: Step, cache: SessionCache, out: Result<ShardOutput, ModelError>, took: f64) {
        let local = self.rt.local_peer().to_string();
        let d = self.shard.config().hidden;
        let Step { owner, req, tokens: n, .. } = step;
        let pos = req.position as usize;
        let Some(sess) = self.sessions.get_mut(&req.session) else { return };
        sess.held = cache.pos();
        sess.cache = Some(cache);
        sess.delivered = Some(Instant::now());
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
                let encoding = self.links.encoding(&next, h.len() * 4, took);
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
