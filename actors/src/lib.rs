//! # fogmesh-actors
//!
//! The ractor actors that serve a model across peers, and the sans-I/O cores
//! they are driven by.
//!
//! What it will own (see the distributed-inference and scheduling issues):
//! - `ShardActor`: one loaded layer range ([`fogmesh_models::Shard`]), per-session
//!   KV caches with eviction, a bounded work queue, load reports;
//! - `SessionActor`: tokenize, route, drive prefill and decode, retry and fail over
//!   by replaying a session's history;
//! - `PlacementActor`: the exact linear-partition plan of layer ranges over peers;
//! - the scheduler: gossiped load, calls for bids, awards;
//! - the handle trait through which actors reach peers (implemented by
//!   `fogmesh-node` over libp2p and by tests in memory).
//!
//! ## Layout
//! - `placement.rs`: the exact, deterministic linear partition of layers over
//!   peers (fastest slowest stage, then fewest stages) with replicas.
//! - `sched.rs`: the sans-I/O scheduling core (gossip views, auctions, awards,
//!   promise records).
//! - `sim.rs`: a seeded discrete-event simulator of a fog cluster comparing
//!   scheduling policies (`examples/schedsim.rs` is its command line).

pub use fogmesh_models as models;
pub use fogmesh_protocols as protocols;

pub mod placement;
pub mod sched;
pub mod sim;
