//! # fogmesh-node
//!
//! The fogmesh peer: the command line, model fetching, and (in later issues)
//! the libp2p swarm with mDNS, Kademlia, gossipsub, identify, pnet and the
//! stage-traffic protocol, plus the HTTP API and dashboard. It holds no
//! inference logic: that lives in `fogmesh-models` and `fogmesh-actors`.
//!
//! ## Layout
//! - `cli.rs`: the `fogmesh` command line (`fetch`, `generate`, `score`).
//! - `fetch.rs`: obtaining the default model through pip, verified by SHA-256.

pub mod cli;
pub mod fetch;
