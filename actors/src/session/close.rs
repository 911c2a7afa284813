//! Closing a session's route on its hops: in the background when the
//! generation ends, and awaited (each hop within the probe timeout) before a
//! failover opens the next route.

use fogmesh_protocols::{Message, SessionClose};

use super::SessionState;
use crate::link::PeerKey;

impl SessionState {
    /// Closes the current route's session on every hop, in the background.
    pub(super) fn close_route(&self) {
        let (rt, wire, route) = (self.rt.clone(), self.wire, self.route.clone());
        rt.unregister_session(wire);
        tokio::spawn(async move {
            for h in route {
                let _ = rt.send(&h.peer, Message::SessionClose(SessionClose { session: wire })).await;
            }
        });
    }

    /// Closes the current route's session on its hops and waits for each
    /// but `skip` (the ones that failed: told in the background) to
    /// confirm, within the probe timeout: once a hop has answered, the room
    /// the session held there is free.
    pub(super) async fn close_route_now(&self, skip: &[PeerKey]) {
        let wire = self.wire;
        self.rt.unregister_session(wire);
        let failed: Vec<PeerKey> = self.route.iter().map(|h| h.peer.clone()).filter(|p| skip.contains(p)).collect();
        let rt = self.rt.clone();
        tokio::spawn(async move {
            for peer in failed {
                let _ = rt.send(&peer, Message::SessionClose(SessionClose { session: wire })).await;
            }
        });
        let wait = self.rt.config().probe_timeout;
        let closes = self.route.iter().filter(|h| !skip.contains(&h.peer)).map(|h| {
            let (rt, peer) = (self.rt.clone(), h.peer.clone());
            async move {
                let _ = tokio::time::timeout(wait, rt.call(&peer, Message::SessionClose(SessionClose { session: wire }))).await;
            }
        });
        futures::future::join_all(closes).await;
    }
}
