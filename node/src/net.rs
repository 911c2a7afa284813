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

pub mod address_book;
pub mod announce;
pub mod codec;
pub mod connections;
pub mod invite;
pub mod keys;
pub mod membership;
pub mod reach;

mod behaviour;
pub mod dialer;
mod event_loop;
pub mod gossip;
mod handle;
mod relaying;
mod sighting;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::Swarm;
use tokio::sync::mpsc;

use behaviour::{build_behaviour, build_transport};
use dialer::Dialer;
use event_loop::Runner;
pub use gossip::{CAPS_TOPIC, DEPARTURE_TOPIC, LOAD_TOPIC};
pub use handle::{IncomingStageStreams, InboundRequest, Net, NetConfig, NetError, NetHandle, NetTask, NodeStatus, StageStream};
pub use membership::{Membership, PeerInfo, Source};

/// The identify protocol version fogmesh peers announce; a peer announcing
/// another one is disconnected.
pub const IDENTIFY_PROTOCOL: &str = "/fogmesh/1.0.0";
/// Largest gossip message accepted.
pub const MAX_GOSSIP_BYTES: usize = 64 << 10;

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
    let (relay_transport, relay_client) = libp2p::relay::client::new(local);
    let transport = build_transport(&cfg.keypair, cfg.secret, relay_transport)?;
    let behaviour = build_behaviour(&cfg, relay_client)?;
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
    let stream_use = connections::StreamUse::default();
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
        cadence: announce::Cadence::new(cfg.announce_interval, std::time::Instant::now()),
        keeper: connections::Keeper::default(),
        stream_use: stream_use.clone(),
        gossip_rx_bytes: 0,
        recent_calls: HashMap::new(),
        reach: reach::Reach::new(),
        reservations: HashMap::new(),
        candidates: Dialer::new(membership::MAX_ADDRS_PER_PEER),
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
    Ok(Net { handle: NetHandle { tx, local, streams, limits, lost, stream_use }, inbound, listen_addrs, task })
}
