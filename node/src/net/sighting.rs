//! Identify, with each address a peer saw us at made one that can be
//! dialed. A second TCP connection to a peer cannot reuse the listen port
//! (that pair of ports is taken), so it leaves from an ephemeral port, and
//! identify reports the peer's sighting of it untranslated. AutoNAT probes
//! such candidates first and sends at most 16 addresses, so a node that
//! opened a few dozen connections (a join on a busy LAN) had its listen
//! addresses pushed out of its probes, every dial-back refused, and a false
//! "private" verdict (then relay reservations it did not need). A sighting at
//! one of our own IPs (no NAT between) on a port we do not listen on becomes
//! our listen address there; a sighting at any other IP (a NAT's) is left as
//! it is: hole punching needs the port the NAT chose.

use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::ListenAddresses;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, identify};

/// [`identify::Behaviour`] with its address candidates corrected.
pub(super) struct Identify {
    inner: identify::Behaviour,
    listen: ListenAddresses,
}

impl Identify {
    pub(super) fn new(inner: identify::Behaviour) -> Self {
        Identify { inner, listen: ListenAddresses::default() }
    }
}

/// The transport of an address: its IP, whether it runs over UDP, and its
/// port.
fn endpoint(addr: &Multiaddr) -> Option<(IpAddr, bool, u16)> {
    let mut it = addr.iter();
    let ip: IpAddr = match it.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    match it.next()? {
        Protocol::Tcp(port) => Some((ip, false, port)),
        Protocol::Udp(port) => Some((ip, true, port)),
        _ => None,
    }
}

/// What a peer's sighting of us at `seen` is worth as an address candidate
/// (see the module's doc): itself; our listen address at that IP and
/// transport when the port is none we listen on there; nothing when we
/// listen at that IP but not on that transport.
pub(super) fn candidate<'a>(seen: &Multiaddr, listen: impl Iterator<Item = &'a Multiaddr>) -> Option<Multiaddr> {
    let Some((ip, udp, port)) = endpoint(seen) else { return Some(seen.clone()) };
    let mut ours_at_ip = false;
    let mut same_transport = None;
    for a in listen {
        let Some((lip, ludp, lport)) = endpoint(a) else { continue };
        if lip != ip {
            continue;
        }
        ours_at_ip = true;
        if ludp == udp {
            if lport == port {
                return Some(seen.clone());
            }
            same_transport.get_or_insert(a);
        }
    }
    if !ours_at_ip {
        return Some(seen.clone());
    }
    same_transport.cloned()
}

impl NetworkBehaviour for Identify {
    type ConnectionHandler = THandler<identify::Behaviour>;
    type ToSwarm = identify::Event;

    fn handle_pending_inbound_connection(&mut self, id: ConnectionId, local: &Multiaddr, remote: &Multiaddr) -> Result<(), ConnectionDenied> {
        self.inner.handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.listen.on_swarm_event(&event);
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, id: ConnectionId, event: THandlerOutEvent<Self>) {
        self.inner.on_connection_handler_event(peer, id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::NewExternalAddrCandidate(seen)) => match candidate(&seen, self.listen.iter()) {
                    Some(addr) => {
                        if addr != seen {
                            tracing::trace!(%seen, %addr, "a sighting at an ephemeral port taken as the listen address");
                        }
                        return Poll::Ready(ToSwarm::NewExternalAddrCandidate(addr));
                    }
                    None => continue,
                },
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_sighting_at_an_ephemeral_port_of_our_own_ip_becomes_the_listen_address() {
        let listen = [a("/ip4/127.0.0.1/tcp/4001"), a("/ip4/10.0.0.2/tcp/4001"), a("/ip4/10.0.0.2/udp/4002/quic-v1")];
        // An ephemeral TCP port at our LAN IP: the listen port there.
        assert_eq!(candidate(&a("/ip4/10.0.0.2/tcp/51234"), listen.iter()), Some(a("/ip4/10.0.0.2/tcp/4001")));
        assert_eq!(candidate(&a("/ip4/127.0.0.1/tcp/40000"), listen.iter()), Some(a("/ip4/127.0.0.1/tcp/4001")));
        // The listen port itself, on either transport: as it is.
        assert_eq!(candidate(&a("/ip4/10.0.0.2/tcp/4001"), listen.iter()), Some(a("/ip4/10.0.0.2/tcp/4001")));
        assert_eq!(candidate(&a("/ip4/10.0.0.2/udp/4002/quic-v1"), listen.iter()), Some(a("/ip4/10.0.0.2/udp/4002/quic-v1")));
        // A UDP port at our IP where only TCP is listened on: no candidate.
        assert_eq!(candidate(&a("/ip4/127.0.0.1/udp/5000/quic-v1"), listen.iter()), None);
        // A NAT's IP: the NAT chose the port, hole punching needs it.
        assert_eq!(candidate(&a("/ip4/203.0.113.7/tcp/61000"), listen.iter()), Some(a("/ip4/203.0.113.7/tcp/61000")));
        // No IP to judge by: as it is.
        assert_eq!(candidate(&a("/dns4/example.test/tcp/1"), listen.iter()), Some(a("/dns4/example.test/tcp/1")));
    }
}
