//! The transport (TCP + noise + yamux, pnet under a cluster secret, QUIC
//! without one, and circuits through a relay peer) and the composed
//! behaviour of a fogmesh peer.

use std::time::Duration;

use fogmesh_protocols::{KAD_PROTOCOL, RPC_PROTOCOL};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, upgrade::Version};
use libp2p::core::Transport;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, StreamProtocol, autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns, noise, ping, quic, relay,
    request_response, tcp, yamux,
};

use super::address_book::AddressBook;
use super::codec::StageCodec;
use super::gossip::TOPICS;
use super::handle::{NetConfig, NetError};
use super::sighting::Identify;
use super::{IDENTIFY_PROTOCOL, MAX_GOSSIP_BYTES};

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: connection_limits::Behaviour,
    pub(super) book: AddressBook,
    pub(super) identify: Identify,
    pub(super) ping: ping::Behaviour,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) rpc: request_response::Behaviour<StageCodec>,
    pub(super) streams: libp2p_stream::Behaviour,
    pub(super) relay: relay::Behaviour,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) dcutr: dcutr::Behaviour,
    pub(super) autonat: autonat::Behaviour,
}

/// The transport: TCP, and circuits through relay peers (`relay`, from
/// [`relay::client::new`]), each secured by noise and multiplexed by yamux;
/// under a cluster secret both run the pnet handshake first (so a circuit
/// proves the secret end to end, not only to the relay), without one QUIC
/// is added.
pub(super) fn build_transport(
    key: &Keypair,
    secret: Option<PreSharedKey>,
    relay: relay::client::Transport,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let setup = |e: noise::Error| NetError::Setup(e.to_string());
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let timeout = Duration::from_secs(20);
    match secret {
        Some(psk) => {
            let tcp = tcp.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket));
            let relay = relay.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket));
            Ok(tcp
                .or_transport(relay)
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(key).map_err(setup)?)
                .multiplex(yamux::Config::default())
                .timeout(timeout)
                .map(|(p, m), _| (p, StreamMuxerBox::new(m)))
                .boxed())
        }
        None => {
            let tcp = tcp
                .or_transport(relay)
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

/// Circuits this peer relays at once, in all and per peer.
pub(super) const MAX_CIRCUITS: usize = 32;
/// Reservations this node holds for peers behind NAT, at most.
pub(super) const MAX_RESERVATIONS: usize = 128;
/// Bytes one relayed circuit may carry (both ways) before the relay closes
/// it; the two ends then reconnect (or have moved to a direct connection).
pub(super) const MAX_CIRCUIT_BYTES: u64 = 4 << 30;
/// How long one relayed circuit may stay open.
pub(super) const MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(60 * 60);

/// The relay service every fogmesh peer offers (it is used only once the
/// peer has a confirmed public address: a reservation carries that
/// address). Only peers holding the cluster secret can reach it at all.
/// Bounded: 128 reservations (4 per peer, an hour each), [`MAX_CIRCUITS`]
/// circuits (8 per peer) of at most [`MAX_CIRCUIT_BYTES`] and
/// [`MAX_CIRCUIT_DURATION`], and rates per peer.
fn relay_config() -> relay::Config {
    let n = |x: u32| std::num::NonZeroU32::new(x).expect("nonzero");
    relay::Config {
        max_reservations: MAX_RESERVATIONS,
        max_reservations_per_peer: 4,
        reservation_duration: Duration::from_secs(60 * 60),
        reservation_rate_limiters: Vec::new(),
        max_circuits: MAX_CIRCUITS,
        max_circuits_per_peer: 8,
        max_circuit_duration: MAX_CIRCUIT_DURATION,
        max_circuit_bytes: MAX_CIRCUIT_BYTES,
        circuit_src_rate_limiters: Vec::new(),
    }
    .reservation_rate_per_peer(n(10), Duration::from_secs(60))
    .circuit_src_per_peer(n(30), Duration::from_secs(60))
}

/// AutoNAT (v1): peers dial this one back on the addresses it believes
/// are its own, and it serves the same check for them. Addresses are judged
/// by what the dials show, never by their range (a "public" subnet may use
/// private addresses), and probes start two seconds after start.
fn autonat_config() -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(2),
        retry_interval: Duration::from_secs(15),
        refresh_interval: Duration::from_secs(5 * 60),
        throttle_server_period: Duration::from_secs(5),
        timeout: Duration::from_secs(25),
        only_global_ips: false,
        confidence_max: 2,
        ..Default::default()
    }
}

/// Gossipsub peer scoring: a peer that relays messages our validation
/// rejects (undecodable, forged, implausible) loses score fast (one gets it
/// ignored for gossip, two graylist it), and earns it back within seconds;
/// nothing else counts against it. Delivery-rate penalties are off (the mesh
/// gossips rarely, and would penalise honest quiet peers) and so is the
/// same-IP penalty (peers behind one NAT, or one host in tests).
fn peer_score() -> gossipsub::PeerScoreParams {
    let mut params = gossipsub::PeerScoreParams { ip_colocation_factor_weight: 0.0, ..Default::default() };
    for t in TOPICS {
        let topic = gossipsub::TopicScoreParams {
            topic_weight: 1.0,
            time_in_mesh_weight: 0.0,
            first_message_deliveries_weight: 0.0,
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            invalid_message_deliveries_weight: -20.0,
            invalid_message_deliveries_decay: 0.5,
            ..Default::default()
        };
        params.topics.insert(gossipsub::IdentTopic::new(t).hash(), topic);
    }
    params
}

pub(super) fn build_behaviour(cfg: &NetConfig, relay_client: relay::client::Behaviour) -> Result<Behaviour, NetError> {
    let key = &cfg.keypair;
    let local = key.public().to_peer_id();
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(cfg.max_connections))
        .with_max_established_per_peer(Some(4))
        .with_max_pending_incoming(Some(32))
        .with_max_pending_outgoing(Some(32));
    let identify = Identify::new(identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
            .with_agent_version(format!("fogmesh/{}", crate::measure::VERSION))
            .with_push_listen_addr_updates(true),
    ));
    let ping = ping::Behaviour::new(ping::Config::new().with_interval(cfg.ping_interval).with_timeout(cfg.ping_timeout));
    let mdns = if cfg.mdns {
        let mc = mdns::Config { query_interval: Duration::from_secs(5), ..Default::default() };
        Some(mdns::tokio::Behaviour::new(mc, local).map_err(|e| setup(&e))?)
    } else {
        None
    };
    let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_cfg.set_query_timeout(Duration::from_secs(10));
    kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(300)));
    // A lookup seeks the 8 closest peers, not 20: each peer it asks is a
    // connection, and members learn each other by gossip anyway.
    kad_cfg.set_replication_factor(std::num::NonZeroUsize::new(8).expect("nonzero"));
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
    for t in TOPICS {
        gossipsub.subscribe(&gossipsub::IdentTopic::new(t)).map_err(|e| setup(&e))?;
    }
    gossipsub.with_peer_score(peer_score(), gossipsub::PeerScoreThresholds::default()).map_err(|e| setup(&e))?;
    let rpc = request_response::Behaviour::with_codec(
        StageCodec::new(cfg.limits),
        [(StreamProtocol::new(RPC_PROTOCOL), request_response::ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(cfg.request_timeout).with_max_concurrent_streams(256),
    );
    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        book: AddressBook::default(),
        identify,
        ping,
        mdns: Toggle::from(mdns),
        kad,
        gossipsub,
        rpc,
        streams: libp2p_stream::Behaviour::new(),
        relay: relay::Behaviour::new(local, relay_config()),
        relay_client,
        dcutr: dcutr::Behaviour::new(local),
        autonat: autonat::Behaviour::new(local, autonat_config()),
    })
}

