//! Sessions opening on a shard: the room for their whole cache reserved
//! within the budget (idle caches and shared prefixes give way, running
//! sessions never do), and the longest shared prefix of their history
//! loaded.

use std::time::Instant;

use fogmesh_models::Sampler;
use fogmesh_protocols::{ErrorCode, SessionOpen, StageError};

use super::{Session, ShardState, stage_error};
use crate::policy;

/// A session opened here: the tokens of its history a shared prefix
/// covers, and the positions it may fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// History tokens already held.
    pub cached: u32,
    /// Positions reserved.
    pub bound: u32,
}

impl ShardState {
    /// Opens a session here: its whole cache reserved, the longest shared
    /// prefix of its history loaded; answers how many tokens that covers and
    /// the session's bound here.
    pub(super) fn open(&mut self, open: SessionOpen) -> Result<Opened, StageError> {
        let local = self.rt.local_peer().to_string();
        let now = Instant::now();
        if self.sessions.contains_key(&open.session) {
            return Err(stage_error(open.session, &local, ErrorCode::Malformed, "a live session cannot be reopened"));
        }
        // The whole bound is reserved now, so that the session never has
        // to make room for itself mid-generation.
        // A bound this stage could never hold (a request without
        // max_tokens on a small device) is cut to what it can: the session
        // then ends there, as at the end of a context.
        let wanted = (open.max_tokens as usize).min(self.shard.config().context);
        let most = self.bounds().owner_bytes() / self.shard.cache_bytes_per_token().max(1);
        let max_tokens = if wanted > most && most > open.history.len() { most } else { wanted };
        self.reserve(open.session, open.owner.as_str(), max_tokens)?;
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
        let history = open.history;
        let mut cache = self.shard.new_session();
        cache.reserve(max_tokens);
        let cached = self.prefixes.load_into(open.owner.as_str(), &history, &mut cache);
        self.sessions.insert(
            open.session,
            Session {
                cache: Some(cache),
                next: open.next.map(|n| n.0),
                owner: open.owner.0,
                sampler,
                open_len: history.len(),
                history,
                params,
                open_draws: u64::from(open.draws),
                max_tokens,
                last_used: now,
                held: cached,
                delivered: None,
                gap: None,
            },
        );
        if cached > 0 {
            self.prefix_hits += 1;
            metrics::counter!(crate::metrics::PREFIX_HITS, "layers" => self.label.clone()).increment(1);
        }
        Ok(Opened { cached: cached as u32, bound: max_tokens as u32 })
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

    /// Reserves a new session's whole cache (its token bound) within the
    /// shard's budget, dropping idle caches if need be (never a running
    /// one), or says why not: [`ErrorCode::Full`] when running sessions hold
    /// the room (the owner waits and asks again), [`ErrorCode::Busy`] when
    /// it could never fit here.
    fn reserve(&mut self, session: u64, owner: &str, tokens: usize) -> Result<(), StageError> {
        let per = self.shard.cache_bytes_per_token();
        let held: Vec<policy::Held<'_>> = self
            .sessions
            .iter()
            .filter(|(k, _)| **k != session)
            .map(|(k, s)| policy::Held { session: *k, owner: &s.owner, bytes: s.max_tokens * per, last_used: s.last_used })
            .collect();
        let local = self.rt.local_peer().to_string();
        // Shared prefixes count against the budget and give way first.
        let evict = loop {
            let bounds = policy::CacheBounds { budget_bytes: self.cache_budget.saturating_sub(self.prefixes.bytes()), ..self.bounds() };
            match policy::reserve(&held, owner, tokens * per, Instant::now(), &bounds) {
                Err(_) if self.prefixes.drop_oldest() => continue,
                Ok(evict) => break evict,
                Err(policy::NoRoom::Never(why)) => return Err(stage_error(session, &local, ErrorCode::Busy, why)),
                Err(policy::NoRoom::Now(why)) => return Err(stage_error(session, &local, ErrorCode::Full, why)),
            }
        };
        for k in evict {
            tracing::info!(session = k, "dropping an idle session cache to make room for a new session");
            self.sessions.remove(&k);
            self.rt.forget_served(k);
        }
        Ok(())
    }
}
