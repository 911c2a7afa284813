//! The handle through which actors reach other peers. `fogmesh-node`
//! implements it over libp2p; [`crate::memnet`] implements it in memory for
//! tests.

use async_trait::async_trait;
use fogmesh_protocols::{Message, ModelHash};

/// A peer's identity as actors see it (the libp2p peer id string).
pub type PeerKey = String;

/// What placement needs to know about a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    /// Its id.
    pub peer: PeerKey,
    /// Measured matmul speed.
    pub gflops: f32,
    /// Free memory it reported.
    pub memory_bytes: u64,
    /// Models it holds locally.
    pub models: Vec<ModelHash>,
    /// Layer ranges it has loaded (from its gossiped load), as `(start, end)`.
    pub shards: Vec<(u32, u32)>,
    /// Stage requests waiting at it, over all its shards (gossiped load).
    pub queued: u32,
    /// Round-trip time to it, from pings (milliseconds), when measured.
    pub rtt_ms: Option<f32>,
    /// For models of `models` it holds only in part: which chunks.
    pub partial: Vec<fogmesh_protocols::HeldChunks>,
}

/// Why a message did not reach a peer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    /// No connection, or it broke.
    #[error("peer {0} is unreachable: {1}")]
    Unreachable(PeerKey, String),
    /// A call got no answer in time.
    #[error("peer {0} did not answer in time")]
    Timeout(PeerKey),
    /// This peer's network task is gone.
    #[error("the mesh link has stopped")]
    Stopped,
}

/// The network as actors use it.
#[async_trait]
pub trait MeshLink: Send + Sync + 'static {
    /// This peer's id.
    fn local_peer(&self) -> PeerKey;
    /// Delivers stage traffic (stage requests, tokens, stage errors, session
    /// closes) to `peer`, in order per peer. `Ok` means it was written to the
    /// connection, not that it was processed.
    async fn send(&self, peer: &str, msg: Message) -> Result<(), LinkError>;
    /// One request, one reply (session opens, load queries).
    async fn call(&self, peer: &str, msg: Message) -> Result<Message, LinkError>;
    /// The connected peers that reported their capabilities (this peer
    /// excluded).
    async fn view(&self) -> Vec<PeerView>;
}
