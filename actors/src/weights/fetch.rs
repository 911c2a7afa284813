//! Fetching chunks from the peers that hold them: several at once, each
//! from the least busy holder that has it, every chunk checked before it is
//! stored; a holder whose bytes do not match is banned for the model and
//! the chunk asked of another; one that fails or lacks it is skipped for
//! that chunk. Waits (within a stall bound) while no holder is there, so a
//! fetch resumes when a holder comes back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_protocols::{Message, ModelHash, WeightChunkRequest};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::store::ChunkStore;
use super::{Progress, WeightsError};
use crate::link::{MeshLink, PeerKey, PeerView};

/// Chunk requests in flight at once, over all holders (bounds the memory
/// a fetch takes: this many chunks of at most `MAX_CHUNK_BYTES`).
pub const MAX_IN_FLIGHT: usize = 12;
/// Chunk requests in flight to one holder.
pub const PER_HOLDER: usize = 4;
/// How long a holder that answered busy is left alone.
const BUSY_REST: Duration = Duration::from_millis(200);
/// A fetch that has received nothing for this long gives up.
pub const STALL: Duration = Duration::from_secs(120);

/// A peer that holds some or all of a model's chunks.
#[derive(Debug, Clone)]
pub struct Holder {
    /// The peer.
    pub peer: PeerKey,
    /// Its chunks, one bit each; `None`: all of them.
    pub bitmap: Option<Vec<u8>>,
    /// Stage requests waiting at it (its gossiped load).
    pub queued: u32,
}

impl Holder {
    /// Whether it has chunk `i`.
    pub fn has(&self, i: usize) -> bool {
        self.bitmap.as_ref().is_none_or(|b| b.get(i / 8).is_some_and(|x| x & (1 << (i % 8)) != 0))
    }
}

/// The holders of `model` in `view`, banned peers left out.
pub fn holders(view: &[PeerView], model: &ModelHash, banned: &HashSet<PeerKey>) -> Vec<Holder> {
    view.iter()
        .filter(|p| p.models.contains(model) && !banned.contains(&p.peer))
        .map(|p| Holder {
            peer: p.peer.clone(),
            bitmap: p.partial.iter().find(|h| h.model == *model).map(|h| h.bitmap.clone()),
            queued: p.queued,
        })
        .collect()
}

/// What a fetch of some chunks needs beyond them.
pub struct Fetch<'a> {
    /// The network.
    pub link: Arc<dyn MeshLink>,
    /// Where verified chunks go.
    pub store: &'a ChunkStore,
    /// Peers banned for this model (grows when one lies).
    pub banned: &'a std::sync::Mutex<HashSet<PeerKey>>,
    /// Counters the node shows.
    pub progress: &'a Progress,
}

impl Fetch<'_> {
    fn banned(&self) -> HashSet<PeerKey> {
        self.banned.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches every chunk of `wanted` not yet held.
    pub async fn run(&self, wanted: &[usize]) -> Result<(), WeightsError> {
        let model = self.store.manifest().model;
        let manifest = self.store.manifest().clone();
        let mut todo: VecDeque<usize> = wanted.iter().copied().filter(|&i| !self.store.has(i)).collect();
        self.store.pin(wanted);
        let want_bytes: u64 = todo.iter().map(|&i| manifest.chunks[i].len as u64).sum();
        self.progress.begin(todo.len(), want_bytes);
        let mut in_flight = FuturesUnordered::new();
        let mut per_peer: HashMap<PeerKey, usize> = HashMap::new();
        let mut skip: HashMap<usize, HashSet<PeerKey>> = HashMap::new();
        // Holders that answered busy rest a moment.
        let mut resting: HashMap<PeerKey, Instant> = HashMap::new();
        let mut logged = Instant::now();
        let mut known: Vec<Holder> = Vec::new();
        // When the view was last looked at for holders (never yet).
        let mut looked: Option<Instant> = None;
        let mut last_got = Instant::now();
        let mut said_waiting = Instant::now();
        while !todo.is_empty() || !in_flight.is_empty() {
            if looked.is_none_or(|t| t.elapsed() > Duration::from_millis(500)) {
                known = holders(&self.link.view().await, &model, &self.banned());
                looked = Some(Instant::now());
            }
            // Hand out chunks to free holders.
            let mut waiting = VecDeque::new();
            while in_flight.len() < MAX_IN_FLIGHT
                && let Some(i) = todo.pop_front()
            {
                let no = skip.get(&i);
                let pick = known
                    .iter()
                    .filter(|h| h.has(i) && no.is_none_or(|s| !s.contains(&h.peer)))
                    .filter(|h| per_peer.get(&h.peer).copied().unwrap_or(0) < PER_HOLDER)
                    .filter(|h| resting.get(&h.peer).is_none_or(|t| t.elapsed() > BUSY_REST))
                    .min_by_key(|h| (per_peer.get(&h.peer).copied().unwrap_or(0), h.queued));
                let Some(h) = pick else {
                    waiting.push_back(i);
                    continue;
                };
                *per_peer.entry(h.peer.clone()).or_default() += 1;
                let (link, peer) = (self.link.clone(), h.peer.clone());
                in_flight.push(async move {
                    let r = link.call(&peer, Message::WeightChunkRequest(WeightChunkRequest { model, chunk: i as u32 })).await;
                    (i, peer, r)
                });
            }
            todo.extend(waiting);
            if in_flight.is_empty() {
                if last_got.elapsed() > STALL {
                    return Err(WeightsError::NoHolder { missing: todo.len(), waited: STALL });
                }
                if said_waiting.elapsed() > Duration::from_secs(10) {
                    tracing::warn!(missing = todo.len(), holders = known.len(), "weights: no holder has the chunks still missing; waiting for one");
                    said_waiting = Instant::now();
                }
                // Every holder was tried for these: try them all again.
                skip.clear();
                tokio::time::sleep(Duration::from_millis(250)).await;
                looked = None;
                continue;
            }
            let Ok(Some((i, peer, r))) = tokio::time::timeout(Duration::from_millis(500), in_flight.next()).await else {
                continue;
            };
            if let Some(n) = per_peer.get_mut(&peer) {
                *n = n.saturating_sub(1);
            }
            match r {
                Ok(Message::WeightChunkReply(rep)) if rep.model == model && rep.chunk as usize == i => {
                    match self.store.put(i, &rep.data) {
                        Ok(()) => {
                            last_got = Instant::now();
                            self.progress.got(&peer, rep.data.len() as u64);
                            if logged.elapsed() > Duration::from_secs(2) {
                                logged = Instant::now();
                                if let Some(st) = self.progress.status() {
                                    tracing::info!(
                                        mib = format!("{:.1}/{:.1}", st.bytes_done as f64 / 1048576.0, st.bytes_wanted as f64 / 1048576.0),
                                        peers = st.peers,
                                        eta_s = st.eta_s.unwrap_or(0.0),
                                        "weights: fetching"
                                    );
                                }
                            }
                        }
                        Err(WeightsError::Corrupt { .. }) => {
                            tracing::warn!(peer = %peer, chunk = i, "weights: chunk does not match its hash; peer banned for this model");
                            self.banned.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.clone());
                            self.progress.rejected();
                            known.retain(|h| h.peer != peer);
                            todo.push_front(i);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(Message::Error(e)) if e.code == fogmesh_protocols::ErrorCode::Busy => {
                    resting.insert(peer, Instant::now());
                    todo.push_back(i);
                }
                other => {
                    let why = match other {
                        Ok(Message::Error(e)) => e.message,
                        Ok(m) => format!("unexpected {:?}", m.kind()),
                        Err(e) => e.to_string(),
                    };
                    tracing::debug!(peer = %peer, chunk = i, why, "weights: chunk not fetched; asking another holder");
                    skip.entry(i).or_default().insert(peer);
                    todo.push_back(i);
                }
            }
        }
        Ok(())
    }
}
