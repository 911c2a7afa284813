//! # fogmesh-node
//!
//! The fogmesh peer: the command line, model fetching, the libp2p swarm
//! (mDNS, Kademlia, gossipsub, identify, ping, pnet and the stage-traffic
//! protocol) with its membership view, self-measurement, and the local HTTP
//! endpoint, and [`mesh::Mesh`], a peer with its actors. It holds no
//! inference logic: that lives in `fogmesh-models` and `fogmesh-actors`.
//!
//! ## Layout
//! - `cli.rs`: the `fogmesh` command line (`fetch`, `generate`, `score`,
//!   `bench`, `node`, `peers`, `status`, `run`, `demo`) and the shared
//!   generation flags.
//! - `mesh.rs`: [`mesh::Mesh`] (builder, start, generate, shutdown) and
//!   `NetLink`, the actors' `MeshLink` over the swarm.
//! - `run.rs`: `fogmesh run` and `fogmesh demo`.
//! - `cluster.rs`: peer processes on this host (demo, tests, benchmarks).
//! - `config.rs`: `FOGMESH_*` variables and the TOML config file, both
//!   mirroring the flags.
//! - `fetch.rs`: obtaining the default model through pip, verified by SHA-256.
//! - `net/`: the swarm task and its [`net::NetHandle`]; `membership.rs` (the
//!   sans-I/O peer view), `codec.rs` (framed stage traffic), `keys.rs`
//!   (identity and cluster secret).
//! - `measure.rs`: what a host measures about itself at start.
//! - `http.rs`: the local HTTP endpoint (status, plan, streamed generation).
//! - `node.rs`: `fogmesh node` and `fogmesh peers`.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod fetch;
pub mod http;
pub mod measure;
pub mod metrics;
pub mod openai;
pub mod mesh;
pub mod net;
pub mod node;
pub mod run;
