//! The libp2p side of a fogmesh peer.
//!
//! One tokio task owns the [`Swarm`]; everything else talks to it through a
//! cloneable [`NetHandle`] (commands with oneshot replies over a bounded
//! channel; [`NetError::Stopped`] once the task has gone), and receives the
//! request-response calls peers send it from [`Net::inbound`], a bounded
//! channel: when it is full a request is answered `BUSY` at once instead of
//! queueing without bound.
//!
//! The swarm: TCP + noise + yamux, and QUIC as well when no cluster secret is
//! set; with a secret, every TCP connection first runs the pnet handshake
//! (XSalsa20 under the pre-shared key), so a peer without the secret never
//! completes a connection, and QUIC (which pnet cannot wrap) is off. mDNS
//! (optional), Kademlia under [`KAD_PROTOCOL`], identify, ping, gossipsub
//! (signed, strict, every message validated against the protocols crate and
//! its claimed sender) carrying [`Capabilities`] and [`LoadReport`]s,
//! request-response calls ([`RPC_PROTOCOL`], one limit-checked frame each
//! way), stage traffic on long-lived streams ([`STAGE_PROTOCOL`], framed by
//! [`StageStream`]; measured 2.6x faster per small message than a
//! request-response round trip), and connection limits.

pub mod codec;
pub mod keys;
pub mod membership;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use fogmesh_protocols::{
    Capabilities, ErrorCode, KAD_PROTOCOL, Limits, LoadReport, Message, RPC_PROTOCOL, STAGE_PROTOCOL, ShardLoad,
    encode_message, read_message,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, upgrade::Version};
use libp2p::core::{ConnectedPoint, Transport};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, gossipsub, identify, kad, mdns, noise, ping, quic,
    request_response, tcp, yamux,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::measure::SelfMeasurement;
use fogmesh_actors::runtime::error_frame;
use codec::StageCodec;
pub use membership::{Membership, PeerInfo, Source};

/// Gossipsub topic of [`Capabilities`] messages.
pub const CAPS_TOPIC: &str = "fogmesh/capabilities/1";
/// Gossipsub topic of [`LoadReport`] messages.
pub const LOAD_TOPIC: &str = "fogmesh/load/1";
/// The identify protocol version fogmesh peers announce; a peer announcing
/// another one is disconnected.
pub const IDENTIFY_PROTOCOL: &str = "/fogmesh/1.0.0";
/// Largest gossip message accepted.
pub const MAX_GOSSIP_BYTES: usize = 64 << 10;

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
    /// Most established connections.
    pub max_connections: u32,
    /// Frame limits for everything peers send us.
    pub limits: Limits,
    /// Capacity of the inbound request channel.
    pub inbound_capacity: usize,
    /// What this host measured about itself.
    pub measurement: SelfMeasurement,
    /// Models this node holds locally (gossiped in its capabilities).
    pub models: Vec<fogmesh_protocols::ModelHash>,
}

impl NetConfig {
    /// Defaults: mDNS on, 10 s peer TTL, 2 s announcements, 2 s pings with a
    /// 5 s timeout, 60 s idle timeout, 30 s calls, 128 connections.
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
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            max_connections: 128,
            limits: Limits::default(),
            inbound_capacity: 64,
            measurement,
            models: Vec::new(),
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
    reply: oneshot::Sender<Message>,
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
    /// This host's self-measurement.
    pub measurement: SelfMeasurement,
    /// The membership view.
    pub peers: Vec<PeerInfo>,
}

enum Command {
    Status(oneshot::Sender<NodeStatus>),
    Dial(Multiaddr, oneshot::Sender<Result<(), NetError>>),
    Request { peer: PeerId, message: Message, reply: oneshot::Sender<Result<Message, NetError>> },
    SetLoad(Vec<ShardLoad>),
    Shutdown,
}

/// A cloneable handle to the swarm task.
#[derive(Clone)]
pub struct NetHandle {
    lost: tokio::sync::broadcast::Sender<PeerId>,
    tx: mpsc::Sender<Command>,
    local: PeerId,
    streams: libp2p_stream::Control,
    limits: Limits,
}

/// A stage-traffic stream: framed [`Message`]s both ways, every frame checked
/// against the node's [`Limits`] before its payload is read.
pub struct StageStream {
    peer: PeerId,
    io: libp2p::Stream,
    limits: Limits,
}

impl std::fmt::Debug for StageStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageStream").field("peer", &self.peer).finish()
    }
}

impl StageStream {
    fn new(peer: PeerId, io: libp2p::Stream, limits: Limits) -> Self {
        StageStream { peer, io, limits }
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
}

/// Stage streams other peers open to this node.
pub struct IncomingStageStreams {
    inner: libp2p_stream::IncomingStreams,
    limits: Limits,
}

impl IncomingStageStreams {
    /// The next stream a peer opened; `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<StageStream> {
        let (peer, io) = self.inner.next().await?;
        Some(StageStream::new(peer, io, self.limits))
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

    /// Opens a stage-traffic stream to `peer` (dialing it if needed).
    pub async fn open_stage_stream(&self, peer: PeerId) -> Result<StageStream, NetError> {
        let mut control = self.streams.clone();
        let stream = control
            .open_stream(peer, StreamProtocol::new(STAGE_PROTOCOL))
            .await
            .map_err(|e| NetError::Request { peer, reason: format!("cannot open a stage stream: {e}") })?;
        Ok(StageStream::new(peer, stream, self.limits))
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
        Some(IncomingStageStreams { inner, limits: self.limits })
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
pub struct NetTask(tokio::task::JoinHandle<()>);

impl NetTask {
    /// Waits for the swarm task to end (after [`NetHandle::shutdown`]).
    pub async fn join(self) {
        let _ = self.0.await;
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    rpc: request_response::Behaviour<StageCodec>,
    streams: libp2p_stream::Behaviour,
}

fn build_transport(key: &Keypair, secret: Option<PreSharedKey>) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let setup = |e: noise::Error| NetError::Setup(e.to_string());
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let timeout = Duration::from_secs(20);
    match secret {
        Some(psk) => Ok(tcp
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise::Config::new(key).map_err(setup)?)
            .multiplex(yamux::Config::default())
            .timeout(timeout)
            .map(|(p, m), _| (p, StreamMuxerBox::new(m)))
            .boxed()),
        None => {
            let tcp = tcp
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(key).map_err(setup)?)
                .multiplex(yamux::Config::default())
                .timeout(timeout)
                .map(|(p, m), _| (p, StreamMuxerBox::new(m)));
            let quic = quic::tokio::Transport::new(quic::Config::new(key)).map(|(p, c), _| (p, StreamMuxerBox::new(c)));
            Ok(tcp.or_transport(quic).map(|either, _| either.into_inner()).boxed())
        }
    }
}

fn build_behaviour(cfg: &NetConfig) -> Result<Behaviour, NetError> {
    let key = &cfg.keypair;
    let local = key.public().to_peer_id();
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(cfg.max_connections))
        .with_max_established_per_peer(Some(4))
        .with_max_pending_incoming(Some(32))
        .with_max_pending_outgoing(Some(32));
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
            .with_agent_version(format!("fogmesh/{}", crate::measure::VERSION))
            .with_push_listen_addr_updates(true),
    );
    let ping = ping::Behaviour::new(ping::Config::new().with_interval(cfg.ping_interval).with_timeout(cfg.ping_timeout));
    let mdns = if cfg.mdns {
        let mc = mdns::Config { query_interval: Duration::from_secs(5), ..Default::default() };
        Some(mdns::tokio::Behaviour::new(mc, local).map_err(|e| setup(&e))?)
    } else {
        None
    };
    let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_cfg.set_query_timeout(Duration::from_secs(10));
    kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(30)));
    let mut kad = kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_cfg);
    // A LAN has no confirmed external address, so kad would stay a client
    // and answer nobody's queries; every fogmesh peer serves the DHT.
    kad.set_mode(Some(kad::Mode::Server));
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(700))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .build()
        .map_err(|e| setup(&e))?;
    let mut gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_cfg).map_err(|e| setup(&e))?;
    for t in [CAPS_TOPIC, LOAD_TOPIC] {
        gossipsub.subscribe(&gossipsub::IdentTopic::new(t)).map_err(|e| setup(&e))?;
    }
    let rpc = request_response::Behaviour::with_codec(
        StageCodec::new(cfg.limits),
        [(StreamProtocol::new(RPC_PROTOCOL), request_response::ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(cfg.request_timeout).with_max_concurrent_streams(256),
    );
    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        identify,
        ping,
        mdns: Toggle::from(mdns),
        kad,
        gossipsub,
        rpc,
        streams: libp2p_stream::Behaviour::new(),
    })
}

/// Builds the swarm, starts listening, waits until every listener has an
/// address, and spawns the swarm task.
pub async fn start(mut cfg: NetConfig) -> Result<Net, NetError> {
    if cfg.listen.is_empty() {
        cfg.listen.push("/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"));
        if cfg.secret.is_none() {
            cfg.listen.push("/ip4/0.0.0.0/udp/0/quic-v1".parse().expect("valid multiaddr"));
        }
    }
    let quic = cfg.listen.iter().find(|a| a.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic)));
    if let (Some(a), Some(_)) = (quic, cfg.secret) {
        return Err(NetError::Listen {
            addr: a.clone(),
            reason: "QUIC cannot carry the cluster secret (pnet works over TCP only); listen on TCP".into(),
        });
    }
    let local = cfg.keypair.public().to_peer_id();
    let transport = build_transport(&cfg.keypair, cfg.secret)?;
    let behaviour = build_behaviour(&cfg)?;
    let swarm_cfg = libp2p::swarm::Config::with_tokio_executor().with_idle_connection_timeout(cfg.idle_timeout);
    let mut swarm = Swarm::new(transport, behaviour, local, swarm_cfg);
    let mut listeners = HashSet::new();
    for addr in &cfg.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen { addr: addr.clone(), reason: e.to_string() })?;
        listeners.insert((id, addr.clone()));
    }
    let streams = swarm.behaviour().streams.new_control();
    let (tx, rx) = mpsc::channel(256);
    let (inbound_tx, inbound) = mpsc::channel(cfg.inbound_capacity.max(1));
    let (lost, _) = tokio::sync::broadcast::channel(64);
    let mut runner = Runner {
        lost: lost.clone(),
        membership: Membership::new(local, cfg.peer_ttl),
        swarm,
        inbound_tx,
        pending: HashMap::new(),
        responses: FuturesUnordered::new(),
        ping_failures: HashMap::new(),
        remotes: HashMap::new(),
        load: Vec::new(),
        listen_addrs: Vec::new(),
        connections: 0,
        kad_bootstrapped: None,
        caps_due: false,
        candidates: HashMap::new(),
        cfg,
    };
    // Wait (bounded) until each listener reports an address or fails.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !listeners.is_empty() {
        let ev = tokio::time::timeout_at(deadline, runner.swarm.select_next_some()).await.map_err(|_| {
            NetError::Setup("listeners did not come up within 10 s".into())
        })?;
        match &ev {
            SwarmEvent::NewListenAddr { listener_id, .. } => listeners.retain(|(id, _)| id != listener_id),
            SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                if let Some((_, addr)) = listeners.iter().find(|(id, _)| id == listener_id) {
                    let reason = match reason {
                        Err(e) => e.to_string(),
                        Ok(()) => "listener closed".into(),
                    };
                    return Err(NetError::Listen { addr: addr.clone(), reason });
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                if let Some((_, addr)) = listeners.iter().find(|(id, _)| id == listener_id) {
                    return Err(NetError::Listen { addr: addr.clone(), reason: error.to_string() });
                }
            }
            _ => {}
        }
        runner.on_swarm_event(ev);
    }
    for addr in runner.cfg.bootstrap.clone() {
        if let Err(e) = runner.dial_addr(addr.clone()) {
            tracing::warn!(%addr, error = %e, "cannot dial bootstrap address");
        }
    }
    let listen_addrs = runner.listen_addrs.clone();
    let limits = runner.cfg.limits;
    let task = NetTask(tokio::spawn(runner.run(rx)));
    Ok(Net { handle: NetHandle { tx, local, streams, limits, lost }, inbound, listen_addrs, task })
}

type Pending = FuturesUnordered<BoxFuture<'static, (request_response::ResponseChannel<Message>, Option<Message>)>>;

struct Runner {
    cfg: NetConfig,
    swarm: Swarm<Behaviour>,
    membership: Membership,
    inbound_tx: mpsc::Sender<InboundRequest>,
    pending: HashMap<request_response::OutboundRequestId, (PeerId, oneshot::Sender<Result<Message, NetError>>)>,
    responses: Pending,
    ping_failures: HashMap<PeerId, u32>,
    remotes: HashMap<PeerId, Multiaddr>,
    load: Vec<ShardLoad>,
    listen_addrs: Vec<Multiaddr>,
    connections: u32,
    kad_bootstrapped: Option<Instant>,
    caps_due: bool,
    candidates: HashMap<PeerId, Candidate>,
    lost: tokio::sync::broadcast::Sender<PeerId>,
}

/// A discovered peer we want a connection to.
struct Candidate {
    addrs: Vec<Multiaddr>,
    next: Instant,
    backoff: Duration,
    failures: u32,
}

/// Most discovered-but-unconnected peers remembered for redialing.
const MAX_CANDIDATES: usize = 1024;
/// First redial delay of a discovered peer (doubling per attempt).
const MIN_REDIAL: Duration = Duration::from_secs(1);
/// Longest redial delay.
const MAX_REDIAL: Duration = Duration::from_secs(30);
/// Failed dials in a row after which a candidate is forgotten.
const MAX_REDIALS: u32 = 10;

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Whether an address a peer announced is worth dialing from a connection
/// at `remote`: never unspecified, and loopback only when that connection
/// is itself loopback (another host's 127.0.0.1 is not that host).
fn dialable(addr: &Multiaddr, remote: Option<&Multiaddr>) -> bool {
    match ip_of(addr) {
        Some(ip) if ip.is_unspecified() => false,
        Some(ip) if ip.is_loopback() => remote.is_none_or(is_loopback),
        _ => true,
    }
}

impl Runner {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announce = tokio::time::interval(self.cfg.announce_interval);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut redial = tokio::time::interval(Duration::from_secs(5));
        redial.tick().await;
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Shutdown) => break,
                    Some(cmd) => self.on_command(cmd),
                },
                Some((channel, response)) = self.responses.next(), if !self.responses.is_empty() => {
                    let response = response.unwrap_or_else(|| error_frame(ErrorCode::Internal, "request dropped unanswered"));
                    if self.swarm.behaviour_mut().rpc.send_response(channel, response).is_err() {
                        tracing::debug!("rpc response dropped: the requester has gone");
                    }
                }
                _ = tick.tick() => {
                    self.redial_candidates(Instant::now());
                    if std::mem::take(&mut self.caps_due) {
                        self.announce_caps();
                    }
                    for p in self.membership.expire(Instant::now()) {
                        tracing::info!(peer = %p, "peer left the view");
                    }
                }
                _ = announce.tick() => self.announce(),
                _ = redial.tick() => self.redial_bootstrap(),
            }
        }
        tracing::info!("network task stopping");
        for (_, (peer, reply)) in self.pending.drain() {
            let _ = reply.send(Err(NetError::Request { peer, reason: "node shutting down".into() }));
        }
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            peer_id: self.swarm.local_peer_id().to_string(),
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            mdns: self.cfg.mdns,
            secret: self.cfg.secret.is_some(),
            connections: self.connections,
            measurement: self.cfg.measurement.clone(),
            peers: self.membership.snapshot(Instant::now()),
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Dial(addr, reply) => {
                let r = self.dial_addr(addr.clone()).map_err(|e| NetError::Dial { addr, reason: e.to_string() });
                let _ = reply.send(r);
            }
            Command::Request { peer, message, reply } => {
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, message);
                self.pending.insert(id, (peer, reply));
            }
            Command::SetLoad(shards) => self.load = shards,
            Command::Shutdown => {}
        }
    }

    fn publish(&mut self, topic: &str, msg: &Message) {
        let mut buf = Vec::new();
        if let Err(e) = encode_message(msg, &self.cfg.limits, &mut buf) {
            tracing::warn!(error = %e, "cannot encode gossip");
            return;
        }
        match self.swarm.behaviour_mut().gossipsub.publish(gossipsub::IdentTopic::new(topic), buf) {
            Ok(_) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => tracing::debug!(topic, error = %e, "gossip not published"),
        }
    }

    fn announce_caps(&mut self) {
        let m = &self.cfg.measurement;
        let caps = Message::Capabilities(Capabilities {
            peer: self.swarm.local_peer_id().to_bytes(),
            cores: m.cores,
            memory_bytes: m.memory_bytes,
            gflops: m.gflops,
            version: m.version.clone(),
            models: self.cfg.models.clone(),
        });
        self.publish(CAPS_TOPIC, &caps);
    }

    fn announce(&mut self) {
        self.caps_due = false;
        self.announce_caps();
        let me = self.swarm.local_peer_id().to_bytes();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let load = Message::LoadReport(LoadReport { peer: me, timestamp_ms: now_ms, shards: self.load.clone() });
        self.publish(LOAD_TOPIC, &load);
    }

    fn redial_bootstrap(&mut self) {
        if self.connections > 0 {
            return;
        }
        for addr in self.cfg.bootstrap.clone() {
            if let Err(e) = self.dial_addr(addr.clone()) {
                tracing::debug!(%addr, error = %e, "bootstrap redial failed");
            }
        }
    }

    /// Dials an address from a fresh local port. (libp2p's default reuses the
    /// listening port; two peers that find each other at the same moment by
    /// mDNS then dial listen port to listen port, TCP merges the two dials
    /// into one simultaneous-open connection where both sides are the
    /// initiator, and the noise handshake fails on both.)
    fn dial_addr(&mut self, addr: Multiaddr) -> Result<(), libp2p::swarm::DialError> {
        self.swarm.dial(DialOpts::unknown_peer_id().address(addr).allocate_new_port().build())
    }

    /// Remembers `addrs` of a discovered peer and dials it now unless
    /// connected; `tick` retries unconnected candidates with backoff.
    fn discovered(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, source: Source) {
        if peer == *self.swarm.local_peer_id() || addrs.is_empty() {
            return;
        }
        for a in &addrs {
            self.membership.discovered(peer, a.clone(), source);
        }
        if !self.candidates.contains_key(&peer) && self.candidates.len() >= MAX_CANDIDATES {
            tracing::debug!(%peer, "candidate table full; not remembering");
            self.dial_peer(peer, addrs);
            return;
        }
        let c = self.candidates.entry(peer).or_insert_with(|| Candidate {
            addrs: Vec::new(),
            next: Instant::now(),
            backoff: MIN_REDIAL,
            failures: 0,
        });
        for a in addrs {
            if !c.addrs.contains(&a) {
                if c.addrs.len() >= membership::MAX_ADDRS_PER_PEER {
                    c.addrs.remove(0);
                }
                c.addrs.push(a);
            }
        }
        c.failures = 0;
        let addrs = c.addrs.clone();
        self.dial_peer(peer, addrs);
    }

    /// Redials unconnected candidates whose backoff has passed; forgets one
    /// after [`MAX_REDIALS`] failures in a row (rediscovery brings it back).
    fn redial_candidates(&mut self, now: Instant) {
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .candidates
            .iter_mut()
            .filter(|(p, c)| c.next <= now && !self.swarm.is_connected(p))
            .map(|(p, c)| {
                c.next = now + c.backoff;
                c.backoff = (c.backoff * 2).min(MAX_REDIAL);
                (*p, c.addrs.clone())
            })
            .collect();
        for (peer, addrs) in due {
            self.dial_peer(peer, addrs);
        }
        self.candidates.retain(|_, c| c.failures < MAX_REDIALS);
    }

    fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == *self.swarm.local_peer_id() || self.swarm.is_connected(&peer) || addrs.is_empty() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .allocate_new_port()
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "dial not started");
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        let now = Instant::now();
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => self.listen_addrs.retain(|a| *a != address),
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                self.connections += 1;
                self.remotes.insert(peer_id, endpoint.get_remote_address().clone());
                let addr = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => Some(address.clone()),
                    ConnectedPoint::Listener { .. } => None,
                };
                if let Some(c) = self.candidates.get_mut(&peer_id) {
                    c.failures = 0;
                    c.backoff = MIN_REDIAL;
                    c.next = now + MIN_REDIAL;
                }
                let new = !self.membership.contains(&peer_id);
                self.membership.connected(peer_id, addr, now);
                if new {
                    tracing::info!(peer = %peer_id, remote = %endpoint.get_remote_address(), "peer joined the view");
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, num_established, .. } => {
                self.connections = self.connections.saturating_sub(1);
                if num_established == 0 {
                    self.remotes.remove(&peer_id);
                    let _ = self.lost.send(peer_id);
                }
                self.membership.disconnected(peer_id);
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if let Some(c) = peer_id.and_then(|p| self.candidates.get_mut(&p)) {
                    c.failures += 1;
                }
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                tracing::debug!(%send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev, now),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, ev: BehaviourEvent, now: Instant) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, connection_id }) => {
                if info.protocol_version != IDENTIFY_PROTOCOL {
                    tracing::info!(peer = %peer_id, protocol = %info.protocol_version, "not a fogmesh peer; disconnecting");
                    self.swarm.close_connection(connection_id);
                    return;
                }
                let remote = self.remotes.get(&peer_id);
                let addrs: Vec<Multiaddr> =
                    info.listen_addrs.iter().filter(|a| dialable(a, remote)).take(16).cloned().collect();
                self.membership.identified(peer_id, &addrs, &info.agent_version, now);
                let kad_name = StreamProtocol::new(KAD_PROTOCOL);
                if info.protocols.contains(&kad_name) {
                    for a in &addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                    }
                    let due = self.kad_bootstrapped.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10));
                    if due && !self.cfg.bootstrap.is_empty() {
                        self.kad_bootstrapped = Some(now);
                        if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                            tracing::debug!(error = ?e, "kad bootstrap not started");
                        }
                    }
                }
            }
            BehaviourEvent::Identify(_) => {}
            BehaviourEvent::Ping(ping::Event { peer, connection, result }) => match result {
                Ok(rtt) => {
                    self.ping_failures.remove(&peer);
                    self.membership.ping(peer, rtt, now);
                }
                Err(e) => {
                    let n = self.ping_failures.entry(peer).or_insert(0);
                    *n += 1;
                    tracing::debug!(%peer, error = %e, failures = *n, "ping failed");
                    if *n >= membership::MAX_PING_FAILURES {
                        self.ping_failures.remove(&peer);
                        self.swarm.close_connection(connection);
                    }
                }
            },
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in list {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    tracing::debug!(%peer, n = addrs.len(), "mDNS found a peer");
                    self.discovered(peer, addrs, Source::Mdns);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(list)) => {
                for (peer, addr) in list {
                    if let Some(c) = self.candidates.get_mut(&peer) {
                        c.addrs.retain(|a| *a != addr);
                        if c.addrs.is_empty() {
                            self.candidates.remove(&peer);
                        }
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, addresses, .. }) => {
                let addrs: Vec<Multiaddr> = addresses.iter().cloned().collect();
                self.discovered(peer, addrs, Source::Kad);
            }
            BehaviourEvent::Kad(ev) => tracing::trace!(?ev, "kad"),
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message_id, message }) => {
                let verdict = self.on_gossip(&message, now);
                let acceptance = match verdict {
                    Ok(()) => gossipsub::MessageAcceptance::Accept,
                    Err(reason) => {
                        tracing::warn!(source = ?message.source, %propagation_source, reason, "gossip rejected");
                        gossipsub::MessageAcceptance::Reject
                    }
                };
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })
                if topic == gossipsub::IdentTopic::new(CAPS_TOPIC).hash() =>
            {
                // A new subscriber learns our capabilities now, not at the
                // next announcement (rate-limited: see `tick`).
                self.caps_due = true;
            }
            BehaviourEvent::Gossipsub(_) => {}
            BehaviourEvent::Rpc(ev) => self.on_rpc_event(ev),
            BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::Streams(()) => {}
        }
    }

    /// Validates one gossip message: it must decode, fill its frame exactly,
    /// sit on its kind's topic, and name the peer that signed it.
    fn on_gossip(&mut self, message: &gossipsub::Message, now: Instant) -> Result<(), &'static str> {
        let source = message.source.ok_or("unsigned")?;
        let (msg, used) = match read_message(&message.data, &self.cfg.limits) {
            Ok(Some(x)) => x,
            Ok(None) => return Err("truncated frame"),
            Err(_) => return Err("undecodable"),
        };
        if used != message.data.len() {
            return Err("trailing bytes");
        }
        let topic = message.topic.as_str();
        match msg {
            Message::Capabilities(c) if topic == CAPS_TOPIC => {
                if c.peer != source.to_bytes() {
                    return Err("capabilities name another peer");
                }
                if c.version.len() > 64 {
                    return Err("version string too long");
                }
                self.membership.capabilities(source, c, now);
            }
            Message::LoadReport(r) if topic == LOAD_TOPIC => {
                if r.peer != source.to_bytes() {
                    return Err("load report names another peer");
                }
                if r.shards.len() > 1024 {
                    return Err("too many shards");
                }
                self.membership.load(source, r, now);
            }
            _ => return Err("message kind does not belong on this topic"),
        }
        Ok(())
    }

    fn on_rpc_event(&mut self, ev: request_response::Event<Message, Message>) {
        use request_response::{Event, Message as RrMessage};
        match ev {
            Event::Message { peer, message: RrMessage::Request { request, channel, .. }, .. } => {
                let (tx, rx) = oneshot::channel();
                let inbound = InboundRequest { peer, message: request, reply: tx };
                match self.inbound_tx.try_send(inbound) {
                    Ok(()) => self.responses.push(Box::pin(async move { (channel, rx.await.ok()) })),
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .rpc
                            .send_response(channel, error_frame(ErrorCode::Busy, "inbound queue full"));
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .rpc
                            .send_response(channel, error_frame(ErrorCode::NotServed, "this node serves no stages"));
                    }
                }
            }
            Event::Message { message: RrMessage::Response { request_id, response }, .. } => {
                if let Some((_, reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some((_, reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request { peer, reason: error.to_string() }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound rpc request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialable_addresses() {
        let lan: Multiaddr = "/ip4/10.1.0.2/tcp/4001".parse().unwrap();
        let lo: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let any: Multiaddr = "/ip4/0.0.0.0/tcp/4001".parse().unwrap();
        assert!(dialable(&lan, Some(&lo)));
        assert!(dialable(&lo, Some(&lo)));
        assert!(!dialable(&lo, Some(&lan)));
        assert!(dialable(&lo, None));
        assert!(!dialable(&any, None));
    }
}
