//! # fogmesh-actors
//!
//! The ractor actors that serve a model across peers, and the sans-I/O cores
//! they are driven by.
//!
//! ## Layout
//! - `link.rs`: [`MeshLink`], the handle through which actors reach peers
//!   (`fogmesh-node` implements it over libp2p, `memnet.rs` in memory).
//! - `runtime.rs` (+ `runtime/`): [`Runtime`], one peer's actors: starting
//!   sessions and placement; `registry.rs` (shards loaded here, on demand),
//!   `routing.rs` (inbound traffic, calls, session opens), `bidding.rs`
//!   (bids, auctions, load report), `hosts.rs` (the actors' host traits over
//!   the runtime).
//! - `shard_actor.rs` (+ `shard_actor/`): `ShardActor` and its `ShardHost`:
//!   one loaded layer range with per-session KV caches (bounded, LRU + TTL);
//!   continuous batching: every pass carries all its sessions' ready steps;
//!   `batch.rs` (which steps share a pass), `queue.rs` (the bounded work
//!   queue, per owner), `open.rs` (a session's whole cache reserved at open
//!   within the KV budget), `prefix.rs` (finished prompts kept as shared,
//!   read-only prefixes), `output.rs` (activations to the next stage,
//!   tokens sampled on the last).
//! - `session.rs` (+ `session/`): `SessionActor` and its `SessionHost`: one
//!   generation: route (waiting while its stages are full), chunked prefill
//!   of what no shared prefix covers, decode, resends of lost steps, and
//!   failover by ban + new route + replay of the history; `award.rs` (hops
//!   awarded by bids), `close.rs` (closing a route's hops, awaited before a
//!   failover reopens), `event.rs` (what a generation reports to its caller).
//! - `placement_actor.rs`: `PlacementActor` and its `PlacementHost`: the plan
//!   from the view; loads and unloads this peer's shards.
//! - `weights.rs` (+ `weights/`): model weights by content (cold start):
//!   the manifest, the chunk cache on disk (`store.rs`), fetching chunks
//!   from peers (`fetch.rs`), the manifest and chunks of a file held here
//!   (`local.rs`); serving chunks to peers.
//! - `host.rs`: [`host::Host`], what every actor needs of its peer (each
//!   actor's host trait extends it).
//! - `links.rs`: [`links::LinkMeter`], what sends measure of each link
//!   (a blocked write marks the bottleneck and its rate), and the
//!   activation encoding per hop under `--activations`.
//! - `outbox.rs`: [`outbox::Outbox`], an actor's sends queued per
//!   destination (bounded in bytes), so that no actor waits on a link.
//! - `compute.rs`: [`Compute`], the thread every forward pass runs on.
//! - `config.rs`: [`RuntimeConfig`]. `error.rs`: [`RuntimeError`].
//!   `model.rs`: [`ModelInfo`]. `wire.rs`: engine types to and from their
//!   wire forms.
//! - `policy.rs`: sans-I/O ban list, route choice (by gossip among the
//!   layout's routes; the round-robin and least-queued baselines),
//!   deadlines, the failover decision, cache eviction and standby ranges;
//!   `policy/affinity.rs`: where an owner's finished conversations left
//!   their keys and values (follow-ups bid there for the new tokens only).
//! - `metrics.rs`: names of the metrics the actors record (the node's
//!   `/metrics` renders them).
//! - `memnet.rs`: an in-memory network with injectable faults (feature
//!   `testing`).
//! - `placement.rs`: the exact, deterministic linear partition of layers over
//!   peers (fastest slowest stage, then fewest stages) with replicas;
//!   `placement/routes.rs`: the layout of every route serving a model
//!   (whole replicas where a peer holds it, pipelines of the peers too
//!   small, stage copies from the rest).
//! - `sched.rs`: the sans-I/O scheduling core (gossip views, auctions, awards,
//!   promise records).
//! - `sim.rs` (+ `sim/`): a seeded discrete-event simulator of a fog cluster
//!   comparing scheduling policies (feature `sim`; `examples/schedsim.rs` is
//!   its command line); `cluster.rs` (simulated peers), `engine.rs` (the
//!   event loop).

pub use fogmesh_models as models;
pub use fogmesh_protocols as protocols;

pub mod compute;
pub mod config;
pub mod error;
pub mod host;
pub mod link;
pub mod links;
#[cfg(any(test, feature = "testing"))]
pub mod memnet;
pub mod metrics;
pub mod model;
pub mod outbox;
pub mod placement;
pub mod placement_actor;
pub mod policy;
pub mod runtime;
pub mod sched;
pub mod session;
pub mod shard_actor;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod weights;
pub mod wire;

pub use compute::Compute;
pub use config::RuntimeConfig;
pub use error::RuntimeError;
pub use fogmesh_models::GenerateRequest;
pub use link::{LinkError, MeshLink, PeerKey, PeerView};
pub use model::ModelInfo;
pub use policy::Hop;
pub use runtime::{GenerationHandle, Runtime};
pub use session::{SessionEvent, SessionMsg};
pub use ractor;
