//! Addresses for dials by peer id. A member this node holds no connection
//! to is still reachable: its gossiped capabilities announce where it
//! listens, and this behaviour offers those addresses to every dial the
//! swarm makes by peer id alone (a call, a stage stream, a fetch to a
//! member known only by gossip). It holds no connections and makes no
//! events; the swarm task keeps it in step with the membership view.

use std::collections::HashMap;
use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use super::membership::{MAX_ADDRS_PER_PEER, MAX_MEMBERS};

/// The known addresses of members, by peer (bounded like the view).
#[derive(Debug, Default)]
pub struct AddressBook {
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
}

impl AddressBook {
    /// Sets the addresses of `peer` (at most [`MAX_ADDRS_PER_PEER`]); an
    /// empty list forgets it. A full book takes no new peer.
    pub fn set(&mut self, peer: PeerId, mut addrs: Vec<Multiaddr>) {
        if addrs.is_empty() {
            self.addrs.remove(&peer);
            return;
        }
        if !self.addrs.contains_key(&peer) && self.addrs.len() >= MAX_MEMBERS {
            return;
        }
        addrs.truncate(MAX_ADDRS_PER_PEER);
        self.addrs.insert(peer, addrs);
    }

    /// The addresses known for `peer`.
    pub fn get(&self, peer: &PeerId) -> &[Multiaddr] {
        self.addrs.get(peer).map_or(&[], Vec::as_slice)
    }
}

impl NetworkBehaviour for AddressBook {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer.map(|p| self.get(&p).to_vec()).unwrap_or_default())
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_what_it_knows_and_stays_bounded() {
        let mut b = AddressBook::default();
        let p = PeerId::random();
        let a: Multiaddr = "/ip4/10.0.0.2/tcp/4001".parse().unwrap();
        b.set(p, vec![a.clone(); MAX_ADDRS_PER_PEER + 3]);
        assert_eq!(b.get(&p).len(), MAX_ADDRS_PER_PEER);
        let offered = b.handle_pending_outbound_connection(ConnectionId::new_unchecked(1), Some(p), &[], Endpoint::Dialer).unwrap();
        assert_eq!(offered[0], a);
        assert!(b.handle_pending_outbound_connection(ConnectionId::new_unchecked(2), None, &[], Endpoint::Dialer).unwrap().is_empty());
        b.set(p, vec![]);
        assert!(b.get(&p).is_empty());
        for _ in 0..MAX_MEMBERS + 5 {
            b.set(PeerId::random(), vec![a.clone()]);
        }
        assert_eq!(b.addrs.len(), MAX_MEMBERS);
    }
}
