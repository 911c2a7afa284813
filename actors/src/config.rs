//! Tunables of a peer's runtime: bounds, timeouts and intervals of its
//! actors.

use std::time::Duration;

use fogmesh_protocols::Limits;

use crate::policy::Deadlines;

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
    /// Bytes a shard may have queued for sending, over all its links; past
    /// it a send fails (a link that far behind is as good as gone).
    pub outbox_bytes: usize,
    /// Bytes of KV cache one shard's sessions may hold together; 0: a
    /// quarter of `memory_bytes`. Past it, a session's growth evicts the
    /// least recently used cache of whichever owner holds the most.
    pub cache_budget_bytes: usize,
    /// The share of a shard's cache budget one owner may hold (0 to 1).
    pub cache_owner_share: f64,
    /// How activations are encoded on the hops this peer sends.
    pub activations: crate::links::ActivationPolicy,
    /// A session cache untouched this long is dropped.
    pub session_ttl: Duration,
    /// Stage requests waiting (or in the running pass) per shard before new
    /// ones are refused (BUSY).
    pub max_queue: usize,
    /// Layer ranges this peer keeps loaded at most.
    pub max_shards: usize,
    /// Keep standby replicas: the ranges this peer would serve if one other
    /// peer were lost, while they fit in `max_shards` and half the free memory.
    pub standby_shards: bool,
    /// Prompt tokens per pipeline chunk.
    pub prefill_chunk: usize,
    /// Tokens one forward pass of a shard carries at most, over all the
    /// sessions batched into it (a single step bigger than this runs alone).
    pub max_batch_tokens: usize,
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
    /// How long a new session waits for room on a full route (running
    /// sessions' caches fill the budget) before it gives up as busy.
    pub open_wait: Duration,
    /// Where chunks of models fetched from peers are kept (none: this peer
    /// fetches no weights).
    pub chunk_dir: Option<std::path::PathBuf>,
    /// The most bytes of chunks kept there, over all models.
    pub chunk_cache_bytes: u64,
    /// Most bytes per second this peer uploads model chunks at (0: no bound).
    pub upload_rate: u64,
    /// Test hook: every forward pass holds the compute thread this many
    /// times as long as it took (1: none), so one host can play a slower
    /// device. Measured speeds and bids see it like real slowness.
    pub compute_slowdown: f32,
    /// How sessions owned here pick among a hop's holders (bids; the
    /// others are baselines for comparisons).
    pub hop_choice: crate::policy::HopChoice,
    /// Test hook: this peer's bids are scaled by this factor (1: honest;
    /// below 1 it underbids), so tests can show its record catching up.
    pub bid_scale: f32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gflops: 1.0,
            memory_bytes: 1 << 30,
            memory_cap: 0,
            max_sessions_per_shard: 64,
            outbox_bytes: 64 << 20,
            cache_budget_bytes: 0,
            cache_owner_share: 1.0,
            activations: crate::links::ActivationPolicy::Auto,
            session_ttl: Duration::from_secs(600),
            max_queue: 256,
            max_shards: 4,
            standby_shards: true,
            prefill_chunk: 64,
            max_batch_tokens: 256,
            deadlines: Deadlines::default(),
            max_failovers: 6,
            ban_base: Duration::from_secs(2),
            ban_max: Duration::from_secs(60),
            probe_timeout: Duration::from_millis(800),
            placement_interval: Duration::from_secs(1),
            limits: Limits::default(),
            bid_timeout: Duration::from_millis(150),
            event_capacity: 256,
            open_wait: Duration::from_secs(30),
            chunk_dir: None,
            chunk_cache_bytes: 16 << 30,
            upload_rate: 0,
            compute_slowdown: 1.0,
            hop_choice: crate::policy::HopChoice::Bids,
            bid_scale: 1.0,
        }
    }
}

impl RuntimeConfig {
    /// The KV cache budget of one shard: `cache_budget_bytes`, or a quarter
    /// of the memory this peer reports (at least 64 MiB).
    pub fn cache_budget(&self) -> usize {
        if self.cache_budget_bytes > 0 {
            return self.cache_budget_bytes;
        }
        usize::try_from(self.memory_bytes / 4).unwrap_or(usize::MAX).max(64 << 20)
    }
}
