//! The swarm task's side of reaching peers through NAT: AutoNAT verdicts,
//! relay reservations (as a client behind NAT) and circuits (as a public
//! relay), hole punches, the kind of each link, and invites.

use std::time::Instant;

use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::core::transport::ListenerId;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId, autonat, dcutr, relay};

use super::behaviour::MAX_RESERVATIONS;
use super::dialer::is_loopback;
use super::event_loop::Runner;
use super::invite::{Invite, MAX_ADDRS};
use super::keys::secret_bytes;
use super::reach::{Nat, is_relayed};

impl Runner {
    /// Refreshes the link kind the view shows for `peer`.
    fn relink(&mut self, peer: PeerId) {
        let link = self.reach.link(&peer);
        self.membership.set_link(peer, link);
    }

    /// A connection opened: note its kind.
    pub(super) fn reach_connected(&mut self, id: ConnectionId, peer: PeerId, endpoint: &ConnectedPoint, now: Instant) {
        let dialed = match endpoint {
            ConnectedPoint::Dialer { address, .. } => Some(address),
            ConnectedPoint::Listener { .. } => None,
        };
        self.reach.connected(id, peer, dialed, endpoint.is_relayed(), now);
        self.relink(peer);
    }

    /// A connection closed.
    pub(super) fn reach_closed(&mut self, id: ConnectionId, peer: PeerId) {
        self.reach.closed(id);
        self.relink(peer);
    }

    /// Asks for the relay reservations that are due (behind NAT only).
    pub(super) fn reserve_due(&mut self, now: Instant) {
        let swarm = &self.swarm;
        let due = self.reach.due(now, |p| swarm.is_connected(p));
        for (relay, addr) in due {
            match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    tracing::debug!(%relay, "asking for a relay reservation");
                    self.reservations.insert(id, relay);
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "cannot listen through the relay");
                    self.reach.reservation_lost(relay);
                }
            }
        }
    }

    /// A listener closed or failed: when it was a relay reservation, the
    /// relay may be asked again later.
    pub(super) fn reservation_closed(&mut self, listener: ListenerId, reason: &str) {
        if let Some(relay) = self.reservations.remove(&listener) {
            tracing::info!(%relay, reason, "relay reservation ended");
            self.reach.reservation_lost(relay);
        }
    }

    pub(super) fn on_autonat(&mut self, ev: autonat::Event, now: Instant) {
        if let autonat::Event::InboundProbe(autonat::InboundProbeEvent::Response { peer, .. }) = &ev {
            // The probe is answered: its connection has done its job.
            if let Some(id) = self.reach.dial_back_done(peer) {
                self.swarm.close_connection(id);
            }
            return;
        }
        if let autonat::Event::OutboundProbe(autonat::OutboundProbeEvent::Error { peer, error, .. }) = &ev {
            tracing::debug!(?peer, ?error, "AutoNAT probe failed");
            return;
        }
        if let autonat::Event::InboundProbe(autonat::InboundProbeEvent::Error { peer, error, .. }) = &ev {
            tracing::debug!(%peer, ?error, "AutoNAT dial-back for a peer failed");
            return;
        }
        let autonat::Event::StatusChanged { new, .. } = ev else { return };
        let nat = match &new {
            autonat::NatStatus::Public(addr) => {
                tracing::info!(%addr, "reachable: peers can dial this node (AutoNAT); it relays for peers behind NAT");
                Nat::Public
            }
            autonat::NatStatus::Private => {
                tracing::info!("behind NAT or a firewall (AutoNAT): reserving a slot on a relay peer");
                Nat::Private
            }
            autonat::NatStatus::Unknown => Nat::Unknown,
        };
        self.reach.set_nat(nat, now);
        if nat == Nat::Public {
            for (id, _) in std::mem::take(&mut self.reservations) {
                self.swarm.remove_listener(id);
            }
        }
    }

    pub(super) fn on_relay_client(&mut self, ev: relay::client::Event) {
        match ev {
            relay::client::Event::ReservationReqAccepted { relay_peer_id, renewal, .. } => {
                self.reach.reserved(relay_peer_id);
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "reachable through a relay");
                    // The mesh learns the relayed address from our next
                    // announcement, sent now (a DHT bootstrap here would
                    // connect to most of the mesh each time a reservation
                    // is renewed from scratch).
                    self.cadence.at_once(std::time::Instant::now());
                }
            }
            relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                tracing::debug!(relay = %relay_peer_id, "circuit through a relay opened");
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                tracing::debug!(peer = %src_peer_id, "a peer reached us through a relay");
            }
        }
    }

    pub(super) fn on_relay_server(&mut self, ev: relay::Event) {
        match ev {
            relay::Event::ReservationReqAccepted { src_peer_id, renewed } => {
                if !renewed {
                    tracing::info!(peer = %src_peer_id, "relaying for a peer behind NAT");
                }
                self.reach.hosting(src_peer_id, MAX_RESERVATIONS);
            }
            relay::Event::ReservationClosed { src_peer_id } | relay::Event::ReservationTimedOut { src_peer_id } => {
                tracing::debug!(peer = %src_peer_id, "a reservation on this node ended");
                self.reach.hosting_ended(&src_peer_id);
            }
            relay::Event::CircuitReqAccepted { src_peer_id, dst_peer_id } => {
                metrics::counter!(crate::metrics::RELAY_CIRCUITS).increment(1);
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relaying a circuit");
            }
            ev => tracing::debug!(?ev, "relay"),
        }
    }

    pub(super) fn on_dcutr(&mut self, ev: dcutr::Event) {
        let peer = ev.remote_peer_id;
        match ev.result {
            Ok(_) => {
                metrics::counter!(crate::metrics::HOLE_PUNCHES, "result" => "direct").increment(1);
                let relayed = self.reach.hole_punched(peer);
                tracing::info!(%peer, "hole punch succeeded: direct connection; closing the relayed one");
                for id in relayed {
                    self.swarm.close_connection(id);
                }
                self.relink(peer);
            }
            Err(e) => {
                metrics::counter!(crate::metrics::HOLE_PUNCHES, "result" => "failed").increment(1);
                tracing::info!(%peer, error = %e, "hole punch failed: traffic stays on the relay");
            }
        }
    }

    /// This node's invite: its secret and where it can be reached —
    /// confirmed public addresses, then relayed ones, then its other
    /// listen addresses, each ending in its peer id.
    pub(super) fn invite(&self) -> Invite {
        let me = *self.swarm.local_peer_id();
        let mut addrs: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        let (relayed, direct): (Vec<&Multiaddr>, Vec<&Multiaddr>) = self.listen_addrs.iter().partition(|a| is_relayed(a));
        addrs.extend(relayed.into_iter().cloned());
        // Loopback only for a node with no other address (another host's
        // 127.0.0.1 is that host itself).
        let (lo, other): (Vec<&Multiaddr>, Vec<&Multiaddr>) = direct.into_iter().partition(|a| is_loopback(a));
        let only_loopback = other.is_empty() && addrs.is_empty();
        addrs.extend(other.into_iter().cloned());
        if only_loopback {
            addrs.extend(lo.into_iter().cloned());
        }
        let mut out: Vec<Multiaddr> = Vec::new();
        for a in addrs {
            let a = match a.iter().last() {
                Some(Protocol::P2p(_)) => a,
                _ => a.with(Protocol::P2p(me)),
            };
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out.truncate(MAX_ADDRS);
        Invite { secret: self.cfg.secret.as_ref().map(secret_bytes), addrs: out }
    }

    /// The reachability part of the status.
    pub(super) fn reach_status(&self) -> (Nat, Vec<String>, Vec<String>) {
        let external = self.swarm.external_addresses().map(|a| a.to_string()).collect();
        let relays = self.reach.reservations().iter().map(|p| p.to_string()).collect();
        (self.reach.nat(), external, relays)
    }
}
