//! [`NetLink`]: the actors' [`MeshLink`] over the swarm (stage traffic on
//! one long-lived stream per peer, calls as request-response, the view from
//! the membership), and each peer's share of the inbound stage streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fogmesh_actors::{LinkError, MeshLink, PeerKey, PeerView};
use fogmesh_protocols::{Message, ModelHash};
use libp2p::PeerId;

use crate::net::{NetError, NetHandle, StageStream};

/// How long opening a stage stream or a call may take.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound stage streams open at once from one peer (it keeps one per
/// connection; a few more cover reconnects).
pub(super) const MAX_STAGE_STREAMS_PER_PEER: usize = 4;

/// One peer's share of the inbound stage streams; dropping it gives the
/// slot back.
pub(super) struct PeerStreams {
    table: Arc<Mutex<HashMap<PeerId, usize>>>,
    peer: PeerId,
}

impl PeerStreams {
    /// A slot for one more stream from `peer`, if it has fewer than
    /// [`MAX_STAGE_STREAMS_PER_PEER`] open.
    pub(super) fn take(table: &Arc<Mutex<HashMap<PeerId, usize>>>, peer: PeerId) -> Option<PeerStreams> {
        let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.entry(peer).or_insert(0);
        if *n >= MAX_STAGE_STREAMS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerStreams { table: table.clone(), peer })
    }
}

impl Drop for PeerStreams {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = t.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.peer);
            }
        }
    }
}

/// [`MeshLink`] over the node's swarm.
pub struct NetLink {
    handle: NetHandle,
    local: PeerKey,
    streams: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<Option<StageStream>>>>>,
}

impl NetLink {
    /// A link over `handle`.
    pub fn new(handle: NetHandle) -> Self {
        let local = handle.local_peer_id().to_string();
        NetLink { handle, local, streams: Mutex::new(HashMap::new()) }
    }

    fn slot(&self, peer: PeerId) -> Arc<tokio::sync::Mutex<Option<StageStream>>> {
        let mut m = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 4096 {
            m.retain(|_, s| Arc::strong_count(s) > 1 || s.try_lock().is_ok_and(|g| g.is_some()));
        }
        m.entry(peer).or_default().clone()
    }
}

fn parse_peer(peer: &str) -> Result<PeerId, LinkError> {
    peer.parse().map_err(|_| LinkError::Unreachable(peer.into(), "not a peer id".into()))
}

#[async_trait]
impl MeshLink for NetLink {
    fn local_peer(&self) -> PeerKey {
        self.local.clone()
    }

    async fn send(&self, peer: &str, msg: Message) -> Result<(), LinkError> {
        let id = parse_peer(peer)?;
        let slot = self.slot(id);
        let mut s = slot.lock().await;
        // One retry on a fresh stream: a stream can break while its
        // connection is replaced.
        let mut last = String::new();
        for _ in 0..2 {
            if s.is_none() {
                match tokio::time::timeout(LINK_TIMEOUT, self.handle.open_stage_stream(id)).await {
                    Ok(Ok(st)) => *s = Some(st),
                    Ok(Err(e)) => return Err(LinkError::Unreachable(peer.into(), e.to_string())),
                    Err(_) => return Err(LinkError::Timeout(peer.into())),
                }
            }
            let st = s.as_mut().expect("stream just opened");
            match tokio::time::timeout(LINK_TIMEOUT, st.send(&msg)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "write timed out".into(),
            }
            *s = None;
        }
        Err(LinkError::Unreachable(peer.into(), last))
    }

    async fn call(&self, peer: &str, msg: Message) -> Result<Message, LinkError> {
        let id = parse_peer(peer)?;
        match tokio::time::timeout(LINK_TIMEOUT * 2, self.handle.request(id, msg)).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(NetError::Stopped)) => Err(LinkError::Stopped),
            Ok(Err(e)) => Err(LinkError::Unreachable(peer.into(), e.to_string())),
            Err(_) => Err(LinkError::Timeout(peer.into())),
        }
    }

    async fn view(&self) -> Vec<PeerView> {
        let Ok(peers) = self.handle.peers().await else { return Vec::new() };
        peers
            .into_iter()
            // Every member whose capabilities arrived, connected or not:
            // calls and stage streams dial on demand (the address book), so
            // that every peer plans over the same members.
            .filter(|p| p.gflops > 0.0)
            .map(|p| PeerView {
                peer: p.peer_id,
                gflops: p.gflops,
                memory_bytes: p.memory_bytes,
                models: p
                    .models
                    .iter()
                    .filter_map(|h| hex::decode(h).ok().and_then(|b| <ModelHash>::try_from(b).ok()))
                    .collect(),
                shards: p.shards.iter().map(|s| (s[0], s[1])).collect(),
                queued: p.shards.iter().fold(0u32, |q, s| q.saturating_add(s[2])),
                rtt_ms: p.rtt_ms.map(|r| r as f32),
                partial: p
                    .partial
                    .iter()
                    .filter_map(|h| {
                        let model = hex::decode(&h.model).ok().and_then(|b| <ModelHash>::try_from(b).ok())?;
                        Some(fogmesh_protocols::HeldChunks { model, bitmap: hex::decode(&h.bitmap).ok()? })
                    })
                    .collect(),
            })
            .collect()
    }
}

