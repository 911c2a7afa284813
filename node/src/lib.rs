//! # fogmesh-node
//!
//! The fogmesh peer: the command line, model fetching, the libp2p swarm
//! (mDNS, Kademlia, gossipsub, identify, ping, pnet and the stage-traffic
//! protocol) with its membership view, self-measurement, the HTTP API, and
//! [`mesh::Mesh`], a peer with its actors. It holds no inference logic: that
//! lives in `fogmesh-models` and `fogmesh-actors`.
//!
//! Arrows point one way: `cli` → `cluster` → `client` → `api` → `mesh` →
//! `net`.
//!
//! ## Layout
//! - `cli.rs` (+ `cli/`): the `fogmesh` command line: clap definitions,
//!   shared flags and dispatch; one file per command: `generate.rs`,
//!   `score.rs`, `bench.rs`, `node.rs`, `invite.rs`, `peers.rs`,
//!   `status.rs`, `run.rs`, `demo.rs`, `tokenize.rs`, `id.rs`.
//! - `cluster.rs`: peer processes on this host (demo, tests, benchmarks).
//! - `client.rs`: the HTTP client side of the API (`fogmesh run`, `status`,
//!   local clusters): a node's address, GETs, streamed generations.
//! - `api.rs` (+ `api/`): the HTTP API: router, state, the error builder;
//!   `access.rs` (API key, Host names, JSON-only POSTs), `serve.rs` (the
//!   accept loop: connection cap, header and write-stall timeouts),
//!   `openai.rs` (the
//!   OpenAI-compatible API), `fogmesh.rs` (status, peers,
//!   plan, dashboard data, streamed generation), `types.rs` (every JSON body
//!   written and read back), `dashboard.html` (the page at `/`).
//! - `mesh.rs` (+ `mesh/`): [`mesh::Mesh`] (builder, start, generate,
//!   shutdown; a model from a file or fetched from the mesh);
//!   `netlink.rs` (`NetLink`, the actors' `MeshLink` over the swarm).
//! - `net.rs` (+ `net/`): the swarm task and its [`net::NetHandle`];
//!   `membership.rs` (the sans-I/O peer view), `codec.rs` (framed stage
//!   traffic), `keys.rs` (identity and cluster secret), `behaviour.rs` (the
//!   transport and behaviours), `event_loop.rs` (the swarm task),
//!   `dialer.rs` (redial backoff, sans-I/O), `gossip.rs` (gossip
//!   validation), `handle.rs` (public types and the handle), `reach.rs`
//!   (AutoNAT verdict, relay reservations, link kinds; sans-I/O),
//!   `relaying.rs` (the swarm task's side of relays, hole punches and
//!   invites), `invite.rs` (invite tokens), `connections.rs` (which
//!   connections a member keeps; probes and departure notices),
//!   `announce.rs` (when a member gossips about itself: a cadence that
//!   slows with the mesh), `address_book.rs` (addresses for dials to
//!   members known only by gossip), `sighting.rs` (identify, with the
//!   addresses peers saw us at made dialable).
//! - `config.rs`: `FOGMESH_*` variables and the TOML config file, both
//!   mirroring the flags.
//! - `fetch.rs`: obtaining the catalogue's models through pip, verified by
//!   SHA-256.
//! - `heap.rs`: handing freed heap pages back to the system.
//! - `measure.rs`: what a host measures about itself at start.
//! - `metrics.rs`: the Prometheus recorder and the node's metric names.

pub mod api;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod fetch;
pub mod heap;
pub mod measure;
pub mod metrics;
pub mod mesh;
pub mod net;
