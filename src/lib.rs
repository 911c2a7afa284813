//! # fogmesh
//!
//! A peer-to-peer runtime for AI inference on edge and fog devices. This crate
//! is the facade embedders use; it holds no logic of its own.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use fogmesh::{Mesh, SessionEvent, models::SamplingParams};
//! let mesh = Mesh::builder().model(fogmesh::models::default_model_path()).start().await?;
//! let mut g = mesh.chat("What is fog computing?", 64, SamplingParams::greedy()).await?;
//! while let Some(e) = g.next().await {
//!     if let SessionEvent::Token { step, .. } = e {
//!         print!("{}", step.text);
//!     }
//! }
//! mesh.shutdown().await;
//! # Ok(()) }
//! ```
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

pub use fogmesh_actors::{GenerateRequest, GenerationHandle, Hop, Runtime, RuntimeConfig, SessionEvent};
pub use fogmesh_node::mesh::{Mesh, MeshBuilder};
