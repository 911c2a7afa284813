//! # fogmesh-protocols
//!
//! Every byte that crosses between fogmesh peers is defined here, and nothing in
//! this crate does I/O or depends on an async runtime.
//!
//! What it will own (see the wire-protocol issue):
//! - the framing (magic, protocol version, message kind, bounded length, checksum);
//! - every wire message as a validated rkyv archive (capabilities, load reports,
//!   shard adverts, bids, stage requests and replies, sessions, weight chunks,
//!   errors);
//! - the activation codec (f32, f16, bf16, int8 with per-row scale, then zstd) and
//!   the choice of encoding for a link;
//! - the protocol names and size limits shared by every peer.
//!
//! ## Layout
//! - `lib.rs`: this overview and the protocol names.

/// The libp2p protocol name of the stage-traffic protocol.
pub const STAGE_PROTOCOL: &str = "/fogmesh/stage/1.0.0";
/// The libp2p protocol name of the Kademlia DHT fogmesh peers use.
pub const KAD_PROTOCOL: &str = "/fogmesh/kad/1.0.0";
