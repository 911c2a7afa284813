//! # fogmesh-protocols
//!
//! Every byte that crosses between fogmesh peers is defined here, and nothing in
//! this crate does I/O or depends on an async runtime. Everything received is
//! checked against [`Limits`] before anything is allocated for it.
//!
//! ## Layout
//! - `frame.rs`: framing (magic, version, kind, bounded length, CRC-32) and
//!   [`Limits`].
//! - `messages.rs`: every wire message as a validated rkyv archive.
//! - `activation.rs`: the activation codec (f32, f16, bf16, int8 with per-row
//!   scale, then optional zstd).
//! - `choose.rs`: picking the activation encoding for a link.
//! - `manifest.rs`: content addressing of model files ([`Manifest`]: verifiable
//!   chunks).
//! - `error.rs`: [`ProtocolError`].

mod activation;
mod choose;
mod error;
mod frame;
mod manifest;
mod messages;

pub use activation::{ACT_HEADER_LEN, ActivationCodec, ActivationInfo, Encoding, WireDType};
pub use choose::{CodecProfile, LinkStats, choose_encoding, default_profiles};
pub use error::{ProtocolError, Result};
pub use frame::{FrameHeader, HEADER_LEN, Limits, MAGIC, MessageKind, VERSION, read_frame, write_frame};
pub use manifest::{CHUNK_BYTES, ChunkEntry, MANIFEST_CHUNK, MAX_CHUNK_BYTES, MAX_CHUNKS, Manifest, cut, sha256};
pub use messages::*;

/// The libp2p protocol name of the stage-traffic protocol: a long-lived
/// stream per (session, hop) carrying one frame per message each way. Chosen
/// over request-response after measuring both (BENCHMARKS.md, "stage
/// traffic"): 2.6x lower round trip for a 4 KB decode-step message.
pub const STAGE_PROTOCOL: &str = "/fogmesh/stage/1.0.0";
/// The libp2p protocol name of request-response calls between peers (bids,
/// session control): one frame for the request, one for the reply.
pub const RPC_PROTOCOL: &str = "/fogmesh/rpc/1.0.0";
/// The libp2p protocol name of the Kademlia DHT fogmesh peers use.
pub const KAD_PROTOCOL: &str = "/fogmesh/kad/1.0.0";

/// Lower-case hex of `bytes` (model hashes, secrets).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
