//! An in-memory [`MeshLink`] for tests: peers are runtimes in one process;
//! faults (a dead peer, one that swallows everything, one that corrupts what
//! it sends, one behind a slow or lossy link) are injected per peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fogmesh_protocols::{Message, StageInput};

use crate::link::{LinkError, MeshLink, PeerKey, PeerView};
use crate::runtime::Runtime;

/// How a peer misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Behaves.
    None,
    /// Gone: nothing reaches it, it is out of every view.
    Dead,
    /// Accepts everything and never answers or forwards anything.
    Silent,
    /// Flips bytes in every activation and weight chunk it sends.
    Garbage,
    /// Every message to it takes this long to write (a slow link); the
    /// sender waits, as on a real connection.
    Slow(Duration),
    /// Each stage message to it is lost with this probability, in percent
    /// (a cut stream, a dropped frame); calls get through.
    Lossy(u8),
}

struct Peer {
    rt: Option<Runtime>,
    view: PeerView,
    fault: Fault,
}

/// The in-memory network.
#[derive(Default)]
pub struct MemNet {
    peers: Mutex<HashMap<PeerKey, Peer>>,
    call_timeout: Duration,
}

impl MemNet {
    /// A network whose calls time out after `call_timeout`.
    pub fn new(call_timeout: Duration) -> Arc<Self> {
        Arc::new(MemNet { peers: Mutex::new(HashMap::new()), call_timeout })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerKey, Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a peer described by `view`; returns its link (attach its runtime
    /// with [`MemNet::attach`]).
    pub fn add(self: &Arc<Self>, view: PeerView) -> Arc<MemLink> {
        let me = view.peer.clone();
        self.lock().insert(me.clone(), Peer { rt: None, view, fault: Fault::None });
        Arc::new(MemLink { net: self.clone(), me })
    }

    /// Connects a peer's runtime.
    pub fn attach(&self, peer: &str, rt: Runtime) {
        if let Some(p) = self.lock().get_mut(peer) {
            p.rt = Some(rt);
        }
    }

    /// Makes `peer` misbehave.
    pub fn set_fault(&self, peer: &str, fault: Fault) {
        if let Some(p) = self.lock().get_mut(peer) {
            p.fault = fault;
        }
    }

    fn target(&self, from: &str, to: &str) -> Result<(Runtime, Fault, Fault), LinkError> {
        let peers = self.lock();
        let src = peers.get(from).map_or(Fault::Dead, |p| p.fault);
        let dst = peers.get(to).ok_or_else(|| LinkError::Unreachable(to.into(), "unknown peer".into()))?;
        if dst.fault == Fault::Dead || src == Fault::Dead {
            return Err(LinkError::Unreachable(to.into(), "connection refused".into()));
        }
        let rt = dst.rt.clone().ok_or_else(|| LinkError::Unreachable(to.into(), "not started".into()))?;
        Ok((rt, src, dst.fault))
    }
}

/// One peer's end of a [`MemNet`].
pub struct MemLink {
    net: Arc<MemNet>,
    me: PeerKey,
}

#[async_trait]
impl MeshLink for MemLink {
    fn local_peer(&self) -> PeerKey {
        self.me.clone()
    }

    async fn send(&self, peer: &str, mut msg: Message) -> Result<(), LinkError> {
        let (rt, src, dst) = self.net.target(&self.me, peer)?;
        match src {
            Fault::Silent => return Ok(()),
            Fault::Garbage => {
                if let Message::StageRequest(r) = &mut msg
                    && let StageInput::Activation(b) = &mut r.input
                {
                    for x in b.iter_mut().skip(3).step_by(7) {
                        *x ^= 0x5a;
                    }
                }
            }
            _ => {}
        }
        match dst {
            Fault::Silent => return Ok(()),
            Fault::Slow(d) => tokio::time::sleep(d).await,
            Fault::Lossy(p) if rand::random::<f64>() * 100.0 < f64::from(p) => return Ok(()),
            _ => {}
        }
        rt.deliver(&self.me, msg).await;
        Ok(())
    }

    async fn call(&self, peer: &str, msg: Message) -> Result<Message, LinkError> {
        let (rt, src, dst) = self.net.target(&self.me, peer)?;
        if src == Fault::Silent || dst == Fault::Silent {
            tokio::time::sleep(self.net.call_timeout).await;
            return Err(LinkError::Timeout(peer.into()));
        }
        let me = self.me.clone();
        match tokio::time::timeout(self.net.call_timeout, async move { rt.handle_call(&me, msg).await }).await {
            Ok(Message::WeightChunkReply(mut r)) if dst == Fault::Garbage && r.chunk != fogmesh_protocols::MANIFEST_CHUNK => {
                if let Some(b) = r.data.first_mut() {
                    *b ^= 0x5a;
                }
                Ok(Message::WeightChunkReply(r))
            }
            Ok(m) => Ok(m),
            Err(_) => Err(LinkError::Timeout(peer.into())),
        }
    }

    async fn view(&self) -> Vec<PeerView> {
        let peers: Vec<(PeerView, Runtime)> = self
            .net
            .lock()
            .iter()
            .filter(|(k, p)| **k != self.me && p.fault != Fault::Dead)
            .filter_map(|(_, p)| p.rt.clone().map(|rt| (p.view.clone(), rt)))
            .collect();
        let mut out = Vec::new();
        for (mut v, rt) in peers {
            v.shards = rt.shards().await.iter().map(|s| (s.range.start as u32, s.range.end as u32)).collect();
            out.push(v);
        }
        out
    }
}
