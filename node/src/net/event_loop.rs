//! The swarm task: it owns the [`Swarm`], serves the handle's commands,
//! publishes this peer's gossip, keeps the membership view and the dialer,
//! and routes inbound calls to the node.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fogmesh_actors::runtime::error_frame;
use fogmesh_protocols::{Departure, ErrorCode, KAD_PROTOCOL, Message, NodeId, ShardLoad};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, gossipsub, identify, kad, mdns, ping, request_response};
use tokio::sync::{mpsc, oneshot};

use super::announce::Cadence;
use super::behaviour::{Behaviour, BehaviourEvent};
use super::connections::{Keeper, StreamUse};
use super::dialer::{Dialer, dialable};
use super::gossip::{self, CAPS_TOPIC, DEPARTURE_TOPIC, Gossip};
use super::handle::{Command, InboundRequest, NetConfig, NetError, NodeStatus};
use super::membership::{self, Membership, Source};
use super::reach::Reach;
use super::IDENTIFY_PROTOCOL;

type Pending = FuturesUnordered<BoxFuture<'static, (request_response::ResponseChannel<Message>, Option<Message>)>>;

pub(super) struct Runner {
    pub(super) cfg: NetConfig,
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) membership: Membership,
    pub(super) inbound_tx: mpsc::Sender<InboundRequest>,
    pub(super) pending: HashMap<request_response::OutboundRequestId, (PeerId, oneshot::Sender<Result<Message, NetError>>)>,
    pub(super) responses: Pending,
    pub(super) ping_failures: HashMap<PeerId, u32>,
    pub(super) remotes: HashMap<PeerId, Multiaddr>,
    pub(super) load: Vec<ShardLoad>,
    pub(super) listen_addrs: Vec<Multiaddr>,
    pub(super) connections: u32,
    pub(super) cadence: Cadence,
    pub(super) keeper: Keeper,
    pub(super) stream_use: StreamUse,
    /// Bytes of gossip messages received (each message once).
    pub(super) gossip_rx_bytes: u64,
    /// Peers called, or calling, lately (their connections are in use).
    pub(super) recent_calls: HashMap<PeerId, Instant>,
    pub(super) candidates: Dialer<PeerId>,
    pub(super) lost: tokio::sync::broadcast::Sender<PeerId>,
    pub(super) reach: Reach,
    /// Listeners that are relay reservations, by the relay.
    pub(super) reservations: HashMap<ListenerId, PeerId>,
}

impl Runner {
    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut redial = tokio::time::interval(Duration::from_secs(5));
        redial.tick().await;
        let mut refill = tokio::time::interval(Duration::from_secs(5));
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
                    let now = Instant::now();
                    self.keep_connections(now);
                    self.reserve_due(now);
                    self.announce_due(now);
                    for p in self.membership.expire(now) {
                        tracing::info!(peer = %p, "peer left the view");
                        self.swarm.behaviour_mut().book.set(p, Vec::new());
                    }
                }
                _ = redial.tick() => self.redial_bootstrap(),
                _ = refill.tick() => self.refill_kad(),
            }
        }
        self.farewell().await;
        tracing::info!("network task stopping");
        for (_, (peer, reply)) in self.pending.drain() {
            let _ = reply.send(Err(NetError::Request { peer, reason: "node shutting down".into() }));
        }
    }

    fn status(&self) -> NodeStatus {
        let (nat, external_addrs, relays) = self.reach_status();
        NodeStatus {
            nat,
            external_addrs,
            relays,
            peer_id: self.swarm.local_peer_id().to_string(),
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            mdns: self.cfg.mdns,
            secret: self.cfg.secret.is_some(),
            connections: self.connections,
            connected_peers: self.swarm.connected_peers().count() as u32,
            gossip_rx_bytes: self.gossip_rx_bytes,
            measurement: self.cfg.measurement.clone(),
            peers: self.membership.snapshot(Instant::now()),
            weights: None,
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
                self.note_call(peer);
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, message);
                self.pending.insert(id, (peer, reply));
            }
            Command::SetLoad(shards) => {
                if shards != self.load {
                    self.load = shards;
                    self.cadence.load_changed();
                }
            }
            Command::FindHolders(model) => {
                self.swarm.behaviour_mut().kad.get_providers(libp2p::kad::RecordKey::new(&model));
            }
            Command::SetModels(models, partial) => {
                if models != self.cfg.models || partial != self.cfg.partial {
                    for m in models.iter().filter(|m| !self.cfg.models.contains(m)) {
                        // Beyond the LAN, peers find holders through the DHT.
                        if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(libp2p::kad::RecordKey::new(m)) {
                            tracing::debug!(error = %e, "no provider record for the model");
                        }
                    }
                    self.cfg.models = models;
                    self.cfg.partial = partial;
                    self.cadence.at_once(Instant::now());
                }
            }
            Command::Invite(reply) => {
                let _ = reply.send(self.invite());
            }
            Command::Shutdown => {}
        }
    }

    /// A call to or from `peer` keeps its connection in use for a while.
    fn note_call(&mut self, peer: PeerId) {
        if self.recent_calls.len() < membership::MAX_MEMBERS || self.recent_calls.contains_key(&peer) {
            self.recent_calls.insert(peer, Instant::now());
        }
    }

    /// Tells the mesh this member leaves (a departure notice naming
    /// itself), and gives the swarm a moment to send it.
    async fn farewell(&mut self) {
        let me = NodeId::from(self.swarm.local_peer_id().to_string());
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.publish(DEPARTURE_TOPIC, &Message::Departure(Departure { peer: me.clone(), gone: me, last_heard_ms: now_ms }));
        let until = tokio::time::Instant::now() + Duration::from_millis(200);
        while tokio::time::timeout_at(until, self.swarm.select_next_some()).await.is_ok() {}
    }

    /// Puts every member the view knows an address of into the DHT's
    /// table (kad drops entries whose dials fail): kad looks the mesh up
    /// again each time a peer joins a table of fewer than 20, and each
    /// lookup connects to many members.
    fn refill_kad(&mut self) {
        let in_table: std::collections::HashSet<PeerId> =
            self.swarm.behaviour_mut().kad.kbuckets().flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>()).collect();
        let missing: Vec<(PeerId, Multiaddr)> = self
            .membership
            .members()
            .filter(|p| !in_table.contains(p))
            .filter_map(|p| Some((*p, self.membership.addrs(p).first()?.clone())))
            .collect();
        for (p, a) in missing {
            self.kad_learn(p, a);
        }
    }

    /// Adds `peer` at `addr` to the DHT's table where its bucket has room:
    /// into a full bucket kad would dial the bucket's stalest entry to see
    /// whether it may be replaced, one connection per member added.
    fn kad_learn(&mut self, peer: PeerId, addr: Multiaddr) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        if kad.kbucket(peer).is_some_and(|b| b.num_entries() < libp2p::kad::K_VALUE.get()) {
            kad.add_address(&peer, addr);
        }
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
    pub(super) fn dial_addr(&mut self, addr: Multiaddr) -> Result<(), libp2p::swarm::DialError> {
        self.swarm.dial(DialOpts::unknown_peer_id().address(addr).allocate_new_port().build())
    }

    /// Remembers `addrs` of a discovered peer, and dials it now when this
    /// node holds fewer connections than its target (else
    /// [`Runner::keep_connections`] may pick it later).
    fn discovered(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, source: Source) {
        if peer == *self.swarm.local_peer_id() || addrs.is_empty() {
            return;
        }
        for a in &addrs {
            self.membership.discovered(peer, a.clone(), source);
        }
        let addrs = self.candidates.discovered(peer, addrs, Instant::now());
        let held = self.swarm.connected_peers().count()
            + self.swarm.network_info().connection_counters().num_pending_outgoing() as usize;
        if held < self.cfg.target_peers {
            self.dial_peer(peer, addrs);
        }
    }

    pub(super) fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
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

    pub(super) fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        let now = Instant::now();
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                    // The mesh hears of a new address (a relayed one among
                    // them) with the next announcement, now.
                    self.cadence.at_once(now);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => self.listen_addrs.retain(|a| *a != address),
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, connection_id, num_established, .. } => {
                self.connections += 1;
                if num_established.get() == 1 {
                    self.connection_up(peer_id, now);
                }
                self.remotes.insert(peer_id, endpoint.get_remote_address().clone());
                let addr = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => Some(address.clone()),
                    ConnectedPoint::Listener { .. } => None,
                };
                self.candidates.connected(&peer_id, now);
                let new = !self.membership.contains(&peer_id);
                self.membership.connected(peer_id, addr, now);
                self.reach_connected(connection_id, peer_id, &endpoint, now);
                if new {
                    tracing::info!(peer = %peer_id, remote = %endpoint.get_remote_address(), "peer joined the view");
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, num_established, connection_id, .. } => {
                self.connections = self.connections.saturating_sub(1);
                self.membership.disconnected(peer_id);
                if num_established == 0 {
                    self.remotes.remove(&peer_id);
                    self.connection_down(peer_id, now);
                }
                self.reach_closed(connection_id, peer_id);
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if let Some(p) = peer_id {
                    self.dial_failed(p, now);
                }
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                tracing::debug!(%send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev, now),
            SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                let why = match &reason {
                    Ok(()) => "closed".to_string(),
                    Err(e) => e.to_string(),
                };
                self.reservation_closed(listener_id, &why);
            }
            SwarmEvent::ListenerError { error, .. } => tracing::debug!(%error, "listener error"),
            SwarmEvent::ExternalAddrConfirmed { address } => tracing::info!(%address, "external address confirmed"),
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
                self.reach.observed(&info.observed_addr, &self.listen_addrs, now);
                let remote = self.remotes.get(&peer_id);
                let addrs: Vec<Multiaddr> =
                    info.listen_addrs.iter().filter(|a| dialable(a, remote)).take(16).cloned().collect();
                self.membership.identified(peer_id, &addrs, &info.agent_version, now);
                let known = self.membership.addrs(&peer_id).to_vec();
                self.swarm.behaviour_mut().book.set(peer_id, known);
                let kad_name = StreamProtocol::new(KAD_PROTOCOL);
                if info.protocols.contains(&kad_name) {
                    for a in &addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                    }
                    // No lookup from here: kad looks the mesh up by itself
                    // while its table holds fewer than 20 peers, and the
                    // gossiped members fill it.
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
                    self.candidates.expired(&peer, &addr);
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, addresses, .. }) => {
                let addrs: Vec<Multiaddr> = addresses.iter().cloned().collect();
                self.discovered(peer, addrs, Source::Kad);
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders { providers, .. })),
                ..
            }) => {
                // Holders of a model this node is looking for, beyond the
                // LAN: meet them (their gossip then says what they hold).
                for peer in providers {
                    if peer != *self.swarm.local_peer_id() && !self.swarm.is_connected(&peer) {
                        tracing::info!(%peer, "a holder of the model found through the DHT; dialing it");
                        if let Err(e) = self.swarm.dial(DialOpts::peer_id(peer).build()) {
                            tracing::debug!(%peer, error = %e, "could not dial a model holder");
                        }
                    }
                }
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
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic })
                if topic == gossipsub::IdentTopic::new(CAPS_TOPIC).hash() =>
            {
                // While this member joins, its first connections' members
                // hear its capabilities soon (its first announcement, made
                // before any connection, reached no one), and answer them.
                // Later, a new connection is no reason to tell the whole
                // mesh again (the trims and dials of a large mesh make
                // many): a joining newcomer says so, and gets its answer.
                if self.cadence.joining(now) && !self.membership.has_capabilities(&peer_id) {
                    self.answer_soon(now);
                }
            }
            BehaviourEvent::Gossipsub(_) => {}
            BehaviourEvent::Rpc(ev) => self.on_rpc_event(ev),
            BehaviourEvent::Limits(never) | BehaviourEvent::Book(never) => match never {},
            BehaviourEvent::Streams(()) => {}
            BehaviourEvent::Relay(ev) => self.on_relay_server(ev),
            BehaviourEvent::RelayClient(ev) => self.on_relay_client(ev),
            BehaviourEvent::Dcutr(ev) => self.on_dcutr(ev),
            BehaviourEvent::Autonat(ev) => self.on_autonat(ev, now),
        }
    }

    /// Validates one gossip message ([`gossip::validate`]) and hands it to
    /// the membership view.
    fn on_gossip(&mut self, message: &gossipsub::Message, now: Instant) -> Result<(), &'static str> {
        let source = message.source.ok_or("unsigned")?;
        self.gossip_rx_bytes += message.data.len() as u64;
        match gossip::validate(&message.data, message.topic.as_str(), &source, &self.cfg.limits)? {
            Gossip::Capabilities(c) => {
                let addrs: Vec<Multiaddr> =
                    c.addrs.iter().filter_map(|a| a.parse().ok()).filter(|a| dialable(a, None)).collect();
                let joining = c.joining;
                if self.membership.capabilities(source, c, addrs.clone(), now) {
                    tracing::info!(peer = %source, joining, "peer's capabilities heard for the first time");
                    if joining {
                        self.answer_soon(now);
                    }
                    // Into the DHT's table too (see `refill_kad`).
                    if let Some(a) = addrs.first() {
                        self.kad_learn(source, a.clone());
                    }
                }
                if !addrs.is_empty() {
                    self.candidates.discovered(source, addrs, now);
                    let known = self.membership.addrs(&source).to_vec();
                    self.swarm.behaviour_mut().book.set(source, known);
                }
            }
            Gossip::Load(r) => self.membership.load(source, r, now),
            Gossip::Departure(d) => {
                let gone: PeerId = d.gone.as_str().parse().map_err(|_| "the departed member is not a peer id")?;
                if gone == *self.swarm.local_peer_id() {
                    tracing::info!(reporter = %source, "a departure notice names this node; refuting it");
                    self.cadence.at_once(now);
                } else if self.membership.departed(gone, d.last_heard_ms, now) {
                    tracing::info!(peer = %gone, reporter = %source, "peer left the view (departure notice)");
                    self.swarm.behaviour_mut().book.set(gone, Vec::new());
                    let _ = self.lost.send(gone);
                }
            }
            Gossip::Wanted(wanted) => {
                if wanted.contains(self.swarm.local_peer_id()) {
                    tracing::debug!(by = %source, "capabilities asked for");
                    self.answer_soon(now);
                }
            }
        }
        Ok(())
    }

    fn on_rpc_event(&mut self, ev: request_response::Event<Message, Message>) {
        use request_response::{Event, Message as RrMessage};
        match ev {
            Event::Message { peer, message: RrMessage::Request { request, channel, .. }, .. } => {
                self.note_call(peer);
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
