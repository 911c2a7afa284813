//! # fogmesh
//!
//! A peer-to-peer runtime for AI inference on edge and fog devices. This crate
//! is the facade embedders use; it holds no logic of its own.
//!
//! ## Layout
//! - [`models`]: the model engine (`fogmesh-models`).
//! - [`protocols`]: wire types and codecs (`fogmesh-protocols`).
//! - [`actors`]: shard, session, placement and scheduling actors (`fogmesh-actors`).
//! - [`node`]: the peer, CLI and HTTP API (`fogmesh-node`).

pub use fogmesh_actors as actors;
pub use fogmesh_models as models;
pub use fogmesh_node as node;
pub use fogmesh_protocols as protocols;
