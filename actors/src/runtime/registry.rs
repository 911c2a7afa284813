//! The shards loaded on this peer: loading on demand (within the shard
//! bound), standby room, unloading what the plan no longer needs.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fogmesh_models::Shard;
use ractor::{Actor, ActorRef};

use super::{Runtime, lock};
use crate::error::RuntimeError;
use crate::shard_actor::{ShardActor, ShardArgs, ShardMsg, ShardStatus, WorkQueue};
use crate::weights::WeightSource;
use crate::weights::store::ChunkReader;

/// A loaded layer range on this peer.
#[derive(Debug, Clone)]
pub struct ShardSlot {
    /// Its layers.
    pub range: Range<usize>,
    /// Its actor.
    pub actor: ActorRef<ShardMsg>,
    /// Stage requests delivered but not yet taken up.
    pub queued: Arc<WorkQueue>,
    /// Bytes of weights it holds.
    pub memory_bytes: usize,
    /// Measured compute time per token (EWMA, microseconds; 0 = none yet).
    pub us_per_token: Arc<AtomicU64>,
    /// Tokens processed since load.
    pub tokens: Arc<AtomicU64>,
    /// Sessions open on it (each one shares its passes).
    pub active: Arc<std::sync::atomic::AtomicUsize>,
    /// The last (time, tokens) sample the load report's rate is taken from.
    pub(super) rate: Arc<Mutex<(Instant, u64)>>,
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

impl Runtime {
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

    /// The shard serving exactly `range`, loading it if needed: within the
    /// shard bound and the memory this peer offers (idle shards make room),
    /// one load at a time, and with the shard list free while the weights
    /// are read (status, gossip and routing go on meanwhile).
    pub async fn ensure_shard(&self, range: Range<usize>) -> Result<ShardSlot, RuntimeError> {
        let model = self.0.model.get().cloned().ok_or(RuntimeError::NoModel)?;
        if let Some(s) = self.0.shards.lock().await.iter().find(|s| s.range == range) {
            return Ok(s.clone());
        }
        let _loading = self.0.loading.lock().await;
        {
            let mut shards = self.0.shards.lock().await;
            // Another caller may have loaded it while this one waited.
            if let Some(s) = shards.iter().find(|s| s.range == range) {
                return Ok(s.clone());
            }
            let need = model.costs.stage_bytes(range.clone());
            let offered = self.0.cfg.memory_bytes;
            let busy: Vec<u64> = lock(&self.0.served).values().map(|s| s.slot.actor.get_id().pid()).collect();
            let held = |shards: &[ShardSlot]| shards.iter().map(|s| s.memory_bytes as u64).sum::<u64>();
            while shards.len() >= self.0.cfg.max_shards || held(&shards) + need > offered {
                // Drop the first shard that serves no session.
                let Some(i) = shards.iter().position(|s| !busy.contains(&s.actor.get_id().pid())) else {
                    return Err(RuntimeError::Invalid(format!(
                        "layers {range:?} ({} MiB) do not fit: this peer serves {} layer ranges ({} MiB of the {} MiB it offers), all in use",
                        need >> 20,
                        shards.len(),
                        held(&shards) >> 20,
                        offered >> 20
                    )));
                };
                let old = shards.remove(i);
                tracing::info!(layers = ?old.range, "unloading shard");
                old.actor.stop(None);
            }
        }
        let started = Instant::now();
        self.0
            .weights
            .fetch_range(&self.0.link, &model.source, range.clone())
            .await
            .map_err(|e| RuntimeError::Invalid(format!("weights of layers {range:?}: {e}")))?;
        let pool = self.0.pool.clone();
        let r = range.clone();
        let source = model.source.clone();
        let shard = tokio::task::spawn_blocking(move || match source {
            WeightSource::File(path) => Shard::load(&path, r, pool),
            WeightSource::Chunks { store, gguf } => {
                Shard::load_from(&gguf, std::io::BufReader::with_capacity(1 << 20, ChunkReader::new(store)), r, pool)
            }
        })
        .await
        .map_err(|e| RuntimeError::Actor(e.to_string()))??;
        let memory_bytes = shard.memory_bytes();
        tracing::info!(layers = ?range, ms = started.elapsed().as_millis() as u64, memory_mib = memory_bytes >> 20, "shard loaded");
        let queued = Arc::new(WorkQueue::default());
        let us_per_token = Arc::new(AtomicU64::new(0));
        let tokens = Arc::new(AtomicU64::new(0));
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let args = ShardArgs {
            shard: Arc::new(shard),
            host: Arc::new(self.clone()),
            compute: self.0.compute.clone(),
            queued: queued.clone(),
            us_per_token: us_per_token.clone(),
            tokens: tokens.clone(),
            active: active.clone(),
            links: self.0.links.clone(),
        };
        let (actor, _) = Actor::spawn(None, ShardActor, args).await.map_err(|e| RuntimeError::Actor(e.to_string()))?;
        let rate = Arc::new(Mutex::new((Instant::now(), 0)));
        let slot = ShardSlot { range, actor, queued, memory_bytes, us_per_token, tokens, active, rate };
        self.0.shards.lock().await.push(slot.clone());
        Ok(slot)
    }

    /// Whether a standby copy of `range` fits: a free shard slot, and all
    /// shards here within half the memory this peer reported.
    pub async fn room_for(&self, range: Range<usize>) -> bool {
        let Some(m) = self.0.model.get() else { return false };
        // A standby copy of weights fetched from peers would cost a fetch
        // of bytes the plan does not need.
        if matches!(m.source, WeightSource::Chunks { .. }) {
            return false;
        }
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
        let busy: Vec<u64> = lock(&self.0.served).values().map(|s| s.slot.actor.get_id().pid()).collect();
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

}
