//! The actors' host traits over [`Runtime`]: each actor sees only what its
//! trait names.

use std::ops::Range;
use std::sync::Arc;

use fogmesh_protocols::Message;
use ractor::ActorRef;

use super::{Runtime, lock};
use crate::config::RuntimeConfig;
use crate::error::RuntimeError;
use crate::host::Host;
use crate::link::{LinkError, PeerKey, PeerView};
use crate::model::ModelInfo;
use crate::placement_actor::PlacementHost;
use crate::policy::Hop;
use crate::session::{SessionHost, SessionMsg};
use crate::shard_actor::ShardHost;

#[async_trait::async_trait]
impl Host for Runtime {
    fn local_peer(&self) -> &str {
        Runtime::local_peer(self)
    }
    fn config(&self) -> &RuntimeConfig {
        Runtime::config(self)
    }
    async fn send(&self, peer: &str, msg: Message) -> Result<(), LinkError> {
        Runtime::send(self, peer, msg).await
    }
}

#[async_trait::async_trait]
impl ShardHost for Runtime {
    fn forget_served(&self, session: u64) {
        lock(&self.0.served).remove(&session);
    }
}

#[async_trait::async_trait]
impl SessionHost for Runtime {
    fn next_id(&self) -> u64 {
        Runtime::next_id(self)
    }
    async fn routes(&self, excluded: &[PeerKey]) -> Result<Vec<Vec<Hop>>, RuntimeError> {
        Runtime::routes(self, excluded).await
    }
    async fn view(&self) -> Vec<PeerView> {
        Runtime::view(self).await
    }
    async fn auction(&self, candidates: &[PeerKey], range: Range<usize>, tokens: usize, cached: Option<(&str, usize)>) -> Option<(PeerKey, f64)> {
        Runtime::auction(self, candidates, range, tokens, cached).await
    }
    fn remember_route(&self, history: &[u32], route: &[Hop]) {
        lock(&self.0.affinity).remember(history, route);
    }
    fn prefix_holders(&self, history: &[u32]) -> Vec<crate::policy::affinity::Held> {
        lock(&self.0.affinity).holders(history)
    }
    fn auction_outcome(&self, peer: &str, promised_s: f64, actual_s: f64) {
        Runtime::auction_outcome(self, peer, promised_s, actual_s);
    }
    async fn call(&self, peer: &str, msg: Message) -> Result<Message, LinkError> {
        Runtime::call(self, peer, msg).await
    }
    fn register_session(&self, wire: u64, actor: ActorRef<SessionMsg>) {
        lock(&self.0.sessions).insert(wire, actor);
    }
    fn unregister_session(&self, wire: u64) {
        lock(&self.0.sessions).remove(&wire);
    }
    async fn local_busy(&self) -> bool {
        self.shards().await.iter().any(|s| !s.queued.is_empty())
    }
}

#[async_trait::async_trait]
impl PlacementHost for Runtime {
    fn model(&self) -> Option<&Arc<ModelInfo>> {
        Runtime::model(self)
    }
    async fn view(&self) -> Vec<PeerView> {
        Runtime::view(self).await
    }
    async fn unload_except(&self, keep: &[Range<usize>]) {
        Runtime::unload_except(self, keep).await;
    }
    async fn load(&self, range: Range<usize>) -> Result<(), RuntimeError> {
        self.ensure_shard(range).await.map(|_| ())
    }
    async fn room_for(&self, range: Range<usize>) -> bool {
        Runtime::room_for(self, range).await
    }
    fn holds(&self, range: Range<usize>) -> bool {
        Runtime::model(self).is_some_and(|m| crate::weights::holds(&m.source, range))
    }
}
