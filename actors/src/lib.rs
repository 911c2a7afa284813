//! # fogmesh-actors
//!
//! The ractor actors that serve a model across peers, and the sans-I/O cores
//! they are driven by.
//!
//! ## Layout
//! - `link.rs`: [`MeshLink`], the handle through which actors reach peers
//!   (`fogmesh-node` implements it over libp2p, `memnet.rs` in memory).
//! - `runtime.rs`: [`Runtime`], one peer's actors and the routing of inbound
//!   traffic and calls to them; loads shards on demand.
//! - `shard_actor.rs`: `ShardActor`, one loaded layer range with per-session KV
//!   caches (bounded, LRU + TTL), a bounded work queue; forwards activations
//!   to the next stage, samples on the last.
//! - `session.rs`: `SessionActor`, one generation: route, chunked prefill,
//!   decode, and failover by ban + new route + replay of the history.
//! - `placement_actor.rs`: `PlacementActor`, the plan from the view; loads and
//!   unloads this peer's shards.
//! - `policy.rs`: sans-I/O ban list, route choice and deadlines.
//! - `metrics.rs`: names of the metrics the actors record (the node's
//!   `/metrics` renders them).
//! - `memnet.rs`: an in-memory network with injectable faults (tests).
//! - `placement.rs`: the exact, deterministic linear partition of layers over
//!   peers (fastest slowest stage, then fewest stages) with replicas.
//! - `sched.rs`: the sans-I/O scheduling core (gossip views, auctions, awards,
//!   promise records).
//! - `sim.rs`: a seeded discrete-event simulator of a fog cluster comparing
//!   scheduling policies (`examples/schedsim.rs` is its command line).

pub use fogmesh_models as models;
pub use fogmesh_protocols as protocols;

pub mod link;
pub mod memnet;
pub mod metrics;
pub mod placement;
pub mod placement_actor;
pub mod policy;
pub mod runtime;
pub mod sched;
pub mod session;
pub mod shard_actor;
pub mod sim;

pub use link::{LinkError, MeshLink, PeerKey, PeerView};
pub use policy::Hop;
pub use runtime::{GenerateRequest, GenerationHandle, ModelInfo, Runtime, RuntimeConfig, RuntimeError};
pub use session::{SessionEvent, SessionMsg};
pub use ractor;
