//! The network's public types and its handle: errors, configuration,
//! inbound calls, the status, [`NetHandle`] (commands to the swarm task) and
//! framed stage streams.

use std::time::Duration;

use fogmesh_protocols::{Limits, Message, STAGE_PROTOCOL, ShardLoad};
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::invite::Invite;
use super::reach::Nat;

use futures::StreamExt;

use super::codec;
use super::connections::{InUse, StreamUse};
use super::membership::{self, PeerInfo};
use crate::measure::SelfMeasurement;

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The swarm task has stopped.
    #[error("the network task has stopped")]
    Stopped,
    /// Building the transport or behaviours failed.
    #[error("network setup failed: {0}")]
    Setup(String),
    /// A listen address could not be used.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A dial could not be started.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A request to a peer failed.
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
}

/// Everything [`start`] needs.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The node's identity.
    pub keypair: Keypair,
    /// Addresses to listen on; empty means all IPv4 interfaces on a free TCP
    /// port (and a free QUIC port without a secret).
    pub listen: Vec<Multiaddr>,
    /// Peers to contact at start (and again while we have no connection).
    pub bootstrap: Vec<Multiaddr>,
    /// The cluster secret.
    pub secret: Option<PreSharedKey>,
    /// Discover peers on the local link by mDNS.
    pub mdns: bool,
    /// How long an unconnected, silent peer stays in the view.
    pub peer_ttl: Duration,
    /// How often capabilities and load are gossiped.
    pub announce_interval: Duration,
    /// Ping interval (RTT measurement and liveness).
    pub ping_interval: Duration,
    /// Ping timeout.
    pub ping_timeout: Duration,
    /// How long a connection no protocol uses stays open.
    pub idle_timeout: Duration,
    /// How long a request-response call may take.
    pub request_timeout: Duration,
    /// Most established connections (a bootstrap peer's room for
    /// newcomers; beyond `max_peers` they are trimmed after a while).
    pub max_connections: u32,
    /// Peers this node dials on its own (for gossip and the DHT) while it
    /// holds fewer connected peers.
    pub target_peers: usize,
    /// Connected peers above which idle connections close.
    pub max_peers: usize,
    /// Frame limits for everything peers send us.
    pub limits: Limits,
    /// Capacity of the inbound request channel.
    pub inbound_capacity: usize,
    /// What this host measured about itself.
    pub measurement: SelfMeasurement,
    /// Models this node serves (gossiped in its capabilities).
    pub models: Vec<fogmesh_protocols::ModelHash>,
    /// Of those, the ones it holds only some chunks of, and which.
    pub partial: Vec<fogmesh_protocols::HeldChunks>,
}

impl NetConfig {
    /// Defaults: mDNS on, 10 s peer TTL, 2 s announcements, 2 s pings with a
    /// 5 s timeout, 10 min idle timeout (the peer bounds trim first), 30 s calls, 128 connections, 6
    /// peers dialed, idle ones trimmed above 16.
    pub fn new(keypair: Keypair, measurement: SelfMeasurement) -> Self {
        NetConfig {
            keypair,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            secret: None,
            mdns: true,
            peer_ttl: Duration::from_secs(10),
            announce_interval: Duration::from_secs(2),
            ping_interval: Duration::from_secs(2),
            ping_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            max_connections: 128,
            target_peers: super::connections::DEFAULT_TARGET_PEERS,
            max_peers: super::connections::DEFAULT_MAX_PEERS,
            limits: Limits::default(),
            inbound_capacity: 64,
            measurement,
            models: Vec::new(),
            partial: Vec::new(),
        }
    }

    /// The documented bound on how long a peer that stopped abruptly (without
    /// closing its connections) stays in the view.
    pub fn departure_bound(&self) -> Duration {
        self.peer_ttl
            + (self.ping_interval + self.ping_timeout) * membership::MAX_PING_FAILURES
            + self.announce_interval
    }
}

/// A request-response call from a peer; answer it with [`InboundRequest::respond`].
/// Dropping it unanswered sends the peer an `INTERNAL` error.
#[derive(Debug)]
pub struct InboundRequest {
    /// The requesting peer.
    pub peer: PeerId,
    /// The request.
    pub message: Message,
    pub(super) reply: oneshot::Sender<Message>,
}

impl InboundRequest {
    /// Sends `response` back to the peer.
    pub fn respond(self, response: Message) {
        // The swarm task may have stopped; nothing to do then.
        let _ = self.reply.send(response);
    }
}

/// The node as the status endpoint shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NodeStatus {
    /// Our peer id.
    pub peer_id: String,
    /// Addresses we listen on.
    pub listen_addrs: Vec<String>,
    /// Whether mDNS is on.
    pub mdns: bool,
    /// Whether a cluster secret is set.
    pub secret: bool,
    /// Open connections.
    pub connections: u32,
    /// Peers with at least one open connection.
    #[serde(default)]
    pub connected_peers: u32,
    /// Bytes of gossip received since the node started (each message
    /// once, as delivered; gossipsub's own control traffic and duplicates
    /// not counted).
    #[serde(default)]
    pub gossip_rx_bytes: u64,
    /// This host's self-measurement.
    pub measurement: SelfMeasurement,
    /// The membership view.
    pub peers: Vec<PeerInfo>,
    /// Whether peers can dial this node (AutoNAT's verdict).
    #[serde(default)]
    pub nat: Nat,
    /// Addresses peers confirmed they can reach this node at.
    #[serde(default)]
    pub external_addrs: Vec<String>,
    /// Relays holding a reservation for this node (it is reachable through
    /// them while behind NAT).
    #[serde(default)]
    pub relays: Vec<String>,
    /// Model weights: the chunk cache, fetch progress, bytes fetched and
    /// served (filled in by the API from the runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<fogmesh_actors::weights::WeightsStatus>,
}

pub(super) enum Command {
    Status(oneshot::Sender<NodeStatus>),
    Dial(Multiaddr, oneshot::Sender<Result<(), NetError>>),
    Request { peer: PeerId, message: Message, reply: oneshot::Sender<Result<Message, NetError>> },
    SetLoad(Vec<ShardLoad>),
    SetModels(Vec<fogmesh_protocols::ModelHash>, Vec<fogmesh_protocols::HeldChunks>),
    FindHolders(fogmesh_protocols::ModelHash),
    Invite(oneshot::Sender<Invite>),
    Shutdown,
}

/// A cloneable handle to the swarm task.
#[derive(Clone)]
pub struct NetHandle {
    pub(super) lost: tokio::sync::broadcast::Sender<PeerId>,
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) local: PeerId,
    pub(super) streams: libp2p_stream::Control,
    pub(super) limits: Limits,
    pub(super) stream_use: StreamUse,
}

/// A stage-traffic stream: framed [`Message`]s both ways, every frame checked
/// against the node's [`Limits`] before its payload is read.
pub struct StageStream {
    peer: PeerId,
    io: libp2p::Stream,
    limits: Limits,
    /// Keeps the connection it runs on from being trimmed.
    _use: InUse,
}

impl std::fmt::Debug for StageStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageStream").field("peer", &self.peer).finish()
    }
}

impl StageStream {
    fn new(peer: PeerId, io: libp2p::Stream, limits: Limits, book: &StreamUse) -> Self {
        StageStream { peer, io, limits, _use: InUse::new(peer, book) }
    }

    /// The peer at the other end.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        codec::write_framed(&mut self.io, msg, &self.limits).await
    }

    /// Receives one message; an error for a closed stream or a bad frame.
    pub async fn recv(&mut self) -> std::io::Result<Message> {
        codec::read_framed(&mut self.io, &self.limits).await
    }

    /// Closes the sending side.
    pub async fn close(&mut self) -> std::io::Result<()> {
        futures::AsyncWriteExt::close(&mut self.io).await
    }

    /// The underlying stream, to read and write bytes unframed (no longer
    /// counted as keeping its connection in use).
    pub fn into_inner(self) -> libp2p::Stream {
        self.io
    }
}

/// Stage streams other peers open to this node.
pub struct IncomingStageStreams {
    inner: libp2p_stream::IncomingStreams,
    limits: Limits,
    stream_use: StreamUse,
}

impl IncomingStageStreams {
    /// The next stream a peer opened; `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<StageStream> {
        let (peer, io) = self.inner.next().await?;
        Some(StageStream::new(peer, io, self.limits, &self.stream_use))
    }
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle").field("local", &self.local).finish()
    }
}

impl NetHandle {
    /// Our peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// The node's status and membership view.
    pub async fn status(&self) -> Result<NodeStatus, NetError> {
        self.ask(Command::Status).await
    }

    /// The membership view.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetError> {
        Ok(self.status().await?.peers)
    }

    /// An invite to this mesh: the cluster secret (if any) and the
    /// addresses this node can be reached at, best first.
    pub async fn invite(&self) -> Result<Invite, NetError> {
        self.ask(Command::Invite).await
    }

    /// Starts dialing `addr` (it joins the view once connected).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|tx| Command::Dial(addr, tx)).await?
    }

    /// Sends a request to `peer` (protocol [`RPC_PROTOCOL`]) and waits for its answer.
    pub async fn request(&self, peer: PeerId, message: Message) -> Result<Message, NetError> {
        self.ask(|reply| Command::Request { peer, message, reply }).await?
    }

    /// Sets the shard load this node gossips from now on.
    pub async fn set_load(&self, shards: Vec<ShardLoad>) -> Result<(), NetError> {
        self.tx.send(Command::SetLoad(shards)).await.map_err(|_| NetError::Stopped)
    }

    /// Sets the models this node serves and the chunks it holds of those it
    /// holds in part (gossiped again when they change).
    pub async fn set_models(&self, models: Vec<fogmesh_protocols::ModelHash>, partial: Vec<fogmesh_protocols::HeldChunks>) -> Result<(), NetError> {
        self.tx.send(Command::SetModels(models, partial)).await.map_err(|_| NetError::Stopped)
    }

    /// Looks up the holders of `model` in the DHT (their provider records)
    /// and dials those found.
    pub async fn find_holders(&self, model: fogmesh_protocols::ModelHash) -> Result<(), NetError> {
        self.tx.send(Command::FindHolders(model)).await.map_err(|_| NetError::Stopped)
    }

    /// Opens a stage-traffic stream to `peer` (dialing it if needed).
    pub async fn open_stage_stream(&self, peer: PeerId) -> Result<StageStream, NetError> {
        let mut control = self.streams.clone();
        let stream = control
            .open_stream(peer, StreamProtocol::new(STAGE_PROTOCOL))
            .await
            .map_err(|e| NetError::Request { peer, reason: format!("cannot open a stage stream: {e}") })?;
        Ok(StageStream::new(peer, stream, self.limits, &self.stream_use))
    }

    /// Peers as their last connection closes (a lagging receiver misses
    /// some: the session deadlines still catch those).
    pub fn subscribe_lost(&self) -> tokio::sync::broadcast::Receiver<PeerId> {
        self.lost.subscribe()
    }

    /// Starts accepting stage-traffic streams; `None` when something else
    /// already accepts them (only one acceptor per node).
    pub fn accept_stage_streams(&self) -> Option<IncomingStageStreams> {
        let mut control = self.streams.clone();
        let inner = control.accept(StreamProtocol::new(STAGE_PROTOCOL)).ok()?;
        Some(IncomingStageStreams { inner, limits: self.limits, stream_use: self.stream_use.clone() })
    }

    /// Asks the swarm task to stop (closing every connection).
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}

/// A started network: its handle, its inbound requests and its task.
pub struct Net {
    /// Handle to the swarm task.
    pub handle: NetHandle,
    /// Requests from peers.
    pub inbound: mpsc::Receiver<InboundRequest>,
    /// The addresses the node listens on.
    pub listen_addrs: Vec<Multiaddr>,
    /// The swarm task.
    pub task: NetTask,
}

/// The swarm task of a [`Net`].
#[derive(Debug)]
pub struct NetTask(pub(super) tokio::task::JoinHandle<()>);

impl NetTask {
    /// Waits for the swarm task to end (after [`NetHandle::shutdown`]).
    pub async fn join(self) {
        let _ = self.0.await;
    }

    /// Stops the swarm task at once, without a farewell: its connections
    /// just close, as if the process had been killed (for tests).
    pub fn abort(&self) {
        self.0.abort();
    }
}

