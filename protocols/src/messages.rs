//! Every message peers exchange, as rkyv archives validated on receipt.
//!
//! Wire types stay simple on purpose (primitives, fixed arrays, `Vec`s of
//! primitives, `String`, plain structs and enums): rkyv's validator is most
//! trustworthy there. A received payload is copied into an aligned buffer and
//! checked by bytecheck (`rkyv::from_bytes`) before anything reads it; nothing
//! here calls `access_unchecked` on peer bytes.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::error::{ProtocolError, Result};
use crate::frame::{Limits, MessageKind, read_frame, write_frame};

/// SHA-256 of a model file: the identity of a model across peers.
pub type ModelHash = [u8; 32];

/// A peer's identity on the wire, the same in every message: the text form
/// of its libp2p peer id (`12D3KooW…`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub String);

impl NodeId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        NodeId(s.to_string())
    }
}

impl From<String> for NodeId {
    fn from(s: String) -> Self {
        NodeId(s)
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A peer's description of itself, gossiped when it joins.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Capabilities {
    /// The peer.
    pub peer: NodeId,
    /// CPU cores.
    pub cores: u32,
    /// Free memory in bytes.
    pub memory_bytes: u64,
    /// Measured matmul speed.
    pub gflops: f32,
    /// fogmesh version string.
    pub version: String,
    /// Models this peer serves: those it holds whole, and those it fetches
    /// from the mesh (it can serve any range of either).
    pub models: Vec<ModelHash>,
    /// For a model of `models` it holds only in part: which chunks.
    pub partial: Vec<HeldChunks>,
    /// Addresses it listens on (multiaddrs), so that members it holds no
    /// connection to can reach it when they need to.
    pub addrs: Vec<String>,
    /// It joined lately: each member hearing of it for the first time
    /// announces itself soon, so that its view fills within seconds (a
    /// member heard of late, its first announcement lost, does not set
    /// off a mesh-wide round of announcements).
    pub joining: bool,
}

/// A member's notice that another one has left the mesh: it held a
/// connection to `gone`, lost it, and could not reach it again. Signed (by
/// gossip) by its reporter; `gone` refutes it by gossiping anything newer
/// than `last_heard_ms`. A member leaving of its own accord sends one
/// naming itself.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Departure {
    /// The reporter.
    pub peer: NodeId,
    /// The member that left.
    pub gone: NodeId,
    /// The reporter's clock (Unix ms) when it last heard from `gone`.
    pub last_heard_ms: u64,
}

/// A member's request for the capabilities of members it hears from (their
/// load reports) but whose capabilities never reached it: each member named
/// announces its capabilities again. Signed (by gossip) by its sender.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CapsWanted {
    /// The sender.
    pub peer: NodeId,
    /// The members whose capabilities it lacks.
    pub wanted: Vec<NodeId>,
}

/// Load of one served shard.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ShardLoad {
    /// Model identity.
    pub model: ModelHash,
    /// First layer.
    pub start: u32,
    /// Last layer (exclusive).
    pub end: u32,
    /// Requests waiting.
    pub queue_depth: u32,
    /// Recent throughput.
    pub tokens_per_s: f32,
}

/// A peer's periodic load report (gossip).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Reporting peer.
    pub peer: NodeId,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// One entry per shard it serves.
    pub shards: Vec<ShardLoad>,
}

/// "I serve these layers of this model."
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ShardAdvert {
    /// Serving peer.
    pub peer: NodeId,
    /// Model identity.
    pub model: ModelHash,
    /// First layer.
    pub start: u32,
    /// Last layer (exclusive).
    pub end: u32,
    /// Answering a session open: the tokens of the session's history this
    /// stage already holds keys and values for (a prefix shared with an
    /// earlier session), which the owner need not send; 0 otherwise.
    pub cached: u32,
    /// Answering a session open: the positions (history plus answer) this
    /// stage holds room for; less than asked when it could never hold that
    /// much, and the session then ends there. 0 otherwise.
    pub bound: u32,
}

/// A session owner asks holders of a range to bid for a task.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CallForBids {
    /// Auction id, unique per owner.
    pub auction: u64,
    /// Session the task belongs to.
    pub session: u64,
    /// Model identity.
    pub model: ModelHash,
    /// First layer.
    pub start: u32,
    /// Last layer (exclusive).
    pub end: u32,
    /// Tokens in the task.
    pub tokens: u32,
    /// Bytes of activation the winner will receive.
    pub activation_bytes: u64,
    /// Bids later than this many milliseconds are ignored.
    pub deadline_ms: u32,
}

/// A bid: the bidder's expected completion time, broken down.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Bid {
    /// The auction bid for.
    pub auction: u64,
    /// Bidding peer.
    pub peer: NodeId,
    /// Expected wait in the bidder's queue.
    pub queue_ms: f32,
    /// Expected compute time.
    pub service_ms: f32,
    /// Expected transfer time of the activation.
    pub transfer_ms: f32,
}

/// The auction's result.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Award {
    /// The auction.
    pub auction: u64,
    /// The winner.
    pub peer: NodeId,
}

/// What a stage receives: token ids (first stage) or an encoded activation.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum StageInput {
    /// Token ids.
    Tokens(Vec<u32>),
    /// Hidden states in the activation codec's format.
    Activation(Vec<u8>),
}

/// Run these tokens through your layers.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StageRequest {
    /// Idempotency key: a retried request carries the same id.
    pub request: u64,
    /// The session.
    pub session: u64,
    /// Generation step.
    pub step: u32,
    /// Stage index in the route.
    pub stage: u32,
    /// Position of the first token in the session.
    pub position: u32,
    /// Whether the last stage samples a token after this input (the final
    /// chunk of a prompt, or a decode step).
    pub sample: bool,
    /// The input.
    pub input: StageInput,
}

/// Why a stage could not serve a request.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StageError {
    /// The session concerned.
    pub session: u64,
    /// The peer at fault in the reporter's view (itself, or an unreachable
    /// next hop), if known.
    pub peer: Option<NodeId>,
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub reason: String,
}

/// What a stage answers.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum StageOutcome {
    /// Hidden states for the next stage.
    Activation(Vec<u8>),
    /// The sampled token (last stage).
    Token(TokenResult),
    /// Failure.
    Error(StageError),
}

/// A stage's answer to a [`StageRequest`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StageReply {
    /// The request answered.
    pub request: u64,
    /// The result.
    pub outcome: StageOutcome,
}

/// A generated token, sent to the session's peer.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TokenResult {
    /// The session.
    pub session: u64,
    /// Generation step.
    pub step: u32,
    /// Token id.
    pub token: u32,
    /// Log-probability of the token.
    pub logprob: f32,
}

/// Sampling parameters, as the last stage applies them.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SamplingSpec {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no limit.
    pub top_k: u32,
    /// Nucleus mass.
    pub top_p: f32,
    /// 1 = none.
    pub repetition_penalty: f32,
    /// Window of the repetition penalty.
    pub repeat_last_n: u32,
    /// RNG seed.
    pub seed: u64,
}

/// Open per-session state (KV cache) on a stage. The stage loads the range
/// if it does not hold it yet, and answers with a [`ShardAdvert`] or an
/// [`ErrorFrame`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionOpen {
    /// The session.
    pub session: u64,
    /// Model identity.
    pub model: ModelHash,
    /// First layer.
    pub start: u32,
    /// Last layer (exclusive).
    pub end: u32,
    /// Most tokens the session may hold.
    pub max_tokens: u32,
    /// The session's owner (tokens and errors go there).
    pub owner: NodeId,
    /// The previous stage: the only peer whose stage requests this stage
    /// takes; none for the first stage, which takes the owner's.
    pub prev: Option<NodeId>,
    /// The next stage; none for the last stage.
    pub next: Option<NodeId>,
    /// Sampling (used by the last stage).
    pub sampling: SamplingSpec,
    /// Tokens of the session so far (the last stage's repetition window).
    pub history: Vec<u32>,
    /// Random draws the session's sampler has made so far (replay).
    pub draws: u32,
}

/// Release a session's state.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionClose {
    /// The session.
    pub session: u64,
}

/// Abandon a session everywhere.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionCancel {
    /// The session.
    pub session: u64,
    /// Why.
    pub reason: String,
}

/// Ask for one chunk of a model file (its index in the model's manifest), or
/// for the manifest itself ([`crate::MANIFEST_CHUNK`]).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WeightChunkRequest {
    /// Model identity.
    pub model: ModelHash,
    /// Chunk index, or [`crate::MANIFEST_CHUNK`].
    pub chunk: u32,
}

/// One chunk of a model file (or its manifest's canonical bytes).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WeightChunkReply {
    /// Model identity.
    pub model: ModelHash,
    /// Chunk index, or [`crate::MANIFEST_CHUNK`].
    pub chunk: u32,
    /// The bytes.
    pub data: Vec<u8>,
}

/// The chunks of a model a peer holds when it holds only some of them.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct HeldChunks {
    /// Model identity.
    pub model: ModelHash,
    /// One bit per chunk of its manifest (bit `i % 8` of byte `i / 8`).
    pub bitmap: Vec<u8>,
}

/// Reasons carried by error frames and stage errors. An unknown code fails
/// validation of the whole message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(compare(PartialEq), derive(Debug))]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame could not be decoded.
    Malformed = 1,
    /// The peer does not serve what was asked.
    NotServed = 2,
    /// The peer is overloaded; retry elsewhere.
    Busy = 3,
    /// The session is unknown (evicted or never opened).
    UnknownSession = 4,
    /// The model failed on the input.
    Model = 5,
    /// Anything else.
    Internal = 6,
    /// The peer's memory for session caches is taken by running sessions;
    /// retry later (the peer is healthy: no reason to avoid it).
    Full = 7,
}

/// A peer's complaint about something it received.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorFrame {
    /// The request concerned (0 if none).
    pub request: u64,
    /// Reason code.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
}

/// Any message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Message {
    Capabilities(Capabilities),
    LoadReport(LoadReport),
    ShardAdvert(ShardAdvert),
    CallForBids(CallForBids),
    Bid(Bid),
    Award(Award),
    StageRequest(StageRequest),
    StageReply(StageReply),
    TokenResult(TokenResult),
    SessionOpen(SessionOpen),
    SessionClose(SessionClose),
    SessionCancel(SessionCancel),
    WeightChunkRequest(WeightChunkRequest),
    WeightChunkReply(WeightChunkReply),
    Error(ErrorFrame),
    Departure(Departure),
    CapsWanted(CapsWanted),
}

impl Message {
    /// This message's kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Capabilities(_) => MessageKind::Capabilities,
            Message::LoadReport(_) => MessageKind::LoadReport,
            Message::ShardAdvert(_) => MessageKind::ShardAdvert,
            Message::CallForBids(_) => MessageKind::CallForBids,
            Message::Bid(_) => MessageKind::Bid,
            Message::Award(_) => MessageKind::Award,
            Message::StageRequest(_) => MessageKind::StageRequest,
            Message::StageReply(_) => MessageKind::StageReply,
            Message::TokenResult(_) => MessageKind::TokenResult,
            Message::SessionOpen(_) => MessageKind::SessionOpen,
            Message::SessionClose(_) => MessageKind::SessionClose,
            Message::SessionCancel(_) => MessageKind::SessionCancel,
            Message::WeightChunkRequest(_) => MessageKind::WeightChunkRequest,
            Message::WeightChunkReply(_) => MessageKind::WeightChunkReply,
            Message::Error(_) => MessageKind::Error,
            Message::Departure(_) => MessageKind::Departure,
            Message::CapsWanted(_) => MessageKind::CapsWanted,
        }
    }
}

/// Appends `msg` as one frame to `out`.
pub fn encode_message(msg: &Message, limits: &Limits, out: &mut Vec<u8>) -> Result<()> {
    let bytes = rkyv::to_bytes::<rancor::Error>(msg).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    write_frame(msg.kind(), &bytes, limits, out)
}

/// Validates and decodes the payload of a frame of kind `kind`.
pub fn decode_payload(kind: MessageKind, payload: &[u8]) -> Result<Message> {
    // rkyv needs aligned bytes; peers' bytes arrive at any offset.
    let mut aligned = AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    let msg = rkyv::from_bytes::<Message, rancor::Error>(&aligned)
        .map_err(|e| ProtocolError::InvalidMessage(e.to_string()))?;
    if msg.kind() != kind {
        return Err(ProtocolError::KindMismatch { header: kind as u16, payload: msg.kind() as u16 });
    }
    Ok(msg)
}

/// Reads one message from the start of `buf`: `Ok(None)` while its frame is
/// incomplete, else the message and the bytes it took.
pub fn read_message(buf: &[u8], limits: &Limits) -> Result<Option<(Message, usize)>> {
    match read_frame(buf, limits)? {
        None => Ok(None),
        Some((h, payload, n)) => Ok(Some((decode_payload(h.kind, payload)?, n))),
    }
}
