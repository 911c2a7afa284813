//! Model weights by content (cold start): a peer without the model file
//! gets the model's manifest from the peers that hold it, checks it, and
//! fetches only the chunks its layers need, from several peers at once,
//! each chunk checked before use; it serves what it holds to others.
//!
//! - `store.rs`: the chunk cache on disk (bounded, least recently used
//!   out) and [`store::ChunkReader`], a model's chunks read as its file.
//! - `fetch.rs`: fetching chunks from their holders (parallel, verified,
//!   liars banned, resumable).
//! - `local.rs`: the manifest of a file held here, and reading its chunks.

pub mod fetch;
pub mod local;
pub mod store;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fogmesh_models::Shard;
use fogmesh_models::gguf::Gguf;
use fogmesh_protocols::{ErrorCode, MANIFEST_CHUNK, Manifest, Message, ModelHash, WeightChunkReply, WeightChunkRequest, hex};

use crate::link::{MeshLink, PeerKey};
use crate::error::error_frame;
use store::{ChunkCache, ChunkReader, ChunkStore};

/// Uploads served at once (a peer busy with stage work serves one).
pub const MAX_UPLOADS: usize = 4;
/// Holders asked for the manifest at once.
const MANIFEST_ASKS: usize = 3;
/// After this long with no holder in sight, the wait is reported as an
/// error (the search goes on).
pub const NO_HOLDER_AFTER: Duration = Duration::from_secs(10);

/// Why weights could not be had.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WeightsError {
    /// The chunk cache cannot be used.
    #[error("{0}")]
    Cache(String),
    /// Bytes that do not match the chunk's hash.
    #[error("chunk {chunk} does not match its hash")]
    Corrupt {
        /// The chunk.
        chunk: usize,
    },
    /// A chunk not held here.
    #[error("chunk {chunk} is not held here")]
    Missing {
        /// The chunk.
        chunk: usize,
    },
    /// Nobody served the chunks still missing.
    #[error("{missing} chunks still missing: no holder served them for {waited:?}")]
    NoHolder {
        /// Chunks not fetched.
        missing: usize,
        /// How long nothing came.
        waited: Duration,
    },
    /// The manifest could not be had or checked.
    #[error("{0}")]
    Manifest(String),
    /// The fetched header or range does not make a model.
    #[error("{0}")]
    Model(String),
}

/// Where a model's weights are read from.
#[derive(Debug, Clone)]
pub enum WeightSource {
    /// The whole file, here.
    File(PathBuf),
    /// Chunks fetched from peers into the cache; the parsed header.
    Chunks {
        /// The chunks.
        store: Arc<ChunkStore>,
        /// The GGUF directory read from the header chunks.
        gguf: Arc<Gguf>,
    },
}

/// Where a fetch stands, for status pages.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct FetchStatus {
    /// The model, hex SHA-256.
    pub model: String,
    /// `waiting` (for a holder), `manifest`, `fetching`, `ready` or `failed`.
    pub state: String,
    /// Chunks of the current fetch, and how many are in.
    pub chunks_wanted: usize,
    /// Chunks fetched so far in the current fetch.
    pub chunks_done: usize,
    /// Bytes the current fetch needs.
    pub bytes_wanted: u64,
    /// Bytes of it fetched so far.
    pub bytes_done: u64,
    /// Peers chunks came from.
    pub peers: usize,
    /// Estimated seconds left, from the rate so far.
    pub eta_s: Option<f64>,
    /// Chunks refused for a wrong hash.
    pub rejected: u64,
    /// Chunks (and bytes) of the model held here now.
    pub chunks_held: usize,
    /// Bytes of the model held here now.
    pub bytes_held: u64,
    /// What went wrong, when something did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A peer's weights as `GET /status` shows them.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct WeightsStatus {
    /// The latest fetch from peers, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchStatus>,
    /// Bytes of chunks fetched from peers since start (verified).
    pub fetched_bytes: u64,
    /// Bytes of chunks served to peers since start.
    pub served_bytes: u64,
    /// Bytes in the chunk cache, over all models.
    pub cache_bytes: u64,
    /// The most bytes the chunk cache keeps.
    pub cache_budget: u64,
    /// Peers banned for serving bytes that did not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub banned: Vec<String>,
}

/// Counters of fetches, shared with the status page.
#[derive(Debug, Default)]
pub struct Progress {
    st: Mutex<(FetchStatus, Option<Instant>, HashSet<PeerKey>)>,
    fetched: AtomicU64,
}

impl Progress {
    fn with<R>(&self, f: impl FnOnce(&mut (FetchStatus, Option<Instant>, HashSet<PeerKey>)) -> R) -> R {
        f(&mut self.st.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn state(&self, model: &ModelHash, state: &str, error: Option<String>) {
        self.with(|s| {
            s.0.model = hex(model);
            s.0.state = state.into();
            s.0.error = error;
        });
    }

    pub(crate) fn begin(&self, chunks: usize, bytes: u64) {
        self.with(|s| {
            s.0.state = "fetching".into();
            (s.0.chunks_wanted, s.0.chunks_done, s.0.bytes_wanted, s.0.bytes_done) = (chunks, 0, bytes, 0);
            s.1 = Some(Instant::now());
        });
    }

    pub(crate) fn got(&self, peer: &str, bytes: u64) {
        self.fetched.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!(crate::metrics::WEIGHT_BYTES_FETCHED).increment(bytes);
        self.with(|s| {
            s.0.chunks_done += 1;
            s.0.bytes_done += bytes;
            s.2.insert(peer.to_string());
            s.0.peers = s.2.len();
        });
    }

    pub(crate) fn rejected(&self) {
        self.with(|s| s.0.rejected += 1);
    }

    /// Bytes fetched since start, over all fetches.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Where it stands; `None` before anything was fetched or waited for.
    pub fn status(&self) -> Option<FetchStatus> {
        self.with(|s| {
            if s.0.model.is_empty() {
                return None;
            }
            let mut out = s.0.clone();
            if let Some(t) = s.1
                && out.state == "fetching"
                && out.bytes_done > 0
            {
                let rate = out.bytes_done as f64 / t.elapsed().as_secs_f64().max(1e-3);
                out.eta_s = Some(((out.bytes_wanted - out.bytes_done.min(out.bytes_wanted)) as f64 / rate * 10.0).round() / 10.0);
            }
            Some(out)
        })
    }
}

/// One peer's weights: the chunk cache, what it serves, what it fetches.
#[derive(Debug)]
pub struct Weights {
    cache: Result<Arc<ChunkCache>, String>,
    local: tokio::sync::OnceCell<Arc<Manifest>>,
    banned: Mutex<HashSet<PeerKey>>,
    progress: Progress,
    uploads: Arc<tokio::sync::Semaphore>,
    served: AtomicU64,
    /// Test hook (`FOGMESH_TEST_CORRUPT_CHUNKS`): `1` serves damaged
    /// chunks, `manifest` a damaged manifest.
    corrupt: Option<String>,
    /// Most bytes per second of uploads (0: no bound), and when the next
    /// upload may start.
    upload_rate: u64,
    next_upload: Mutex<Instant>,
}

impl Weights {
    /// The weights of a peer whose chunk cache is `dir` (none: it fetches
    /// nothing), bounded to `budget` bytes.
    pub fn new(dir: Option<PathBuf>, budget: u64) -> Weights {
        let cache = match dir {
            Some(d) => ChunkCache::open(&d, budget).map_err(|e| e.to_string()),
            None => Err("this peer has no chunk cache".into()),
        };
        let corrupt = std::env::var("FOGMESH_TEST_CORRUPT_CHUNKS").ok().filter(|v| v == "1" || v == "manifest");
        if let Some(c) = &corrupt {
            tracing::warn!("FOGMESH_TEST_CORRUPT_CHUNKS={c}: this peer serves damaged weights (a test hook)");
        }
        Weights {
            cache,
            local: tokio::sync::OnceCell::new(),
            banned: Mutex::new(HashSet::new()),
            progress: Progress::default(),
            uploads: Arc::new(tokio::sync::Semaphore::new(MAX_UPLOADS)),
            served: AtomicU64::new(0),
            corrupt,
            upload_rate: 0,
            next_upload: Mutex::new(Instant::now()),
        }
    }

    /// Bounds uploads to `bytes_per_s` (0: no bound), so that serving
    /// weights leaves a slow link to inference.
    pub fn with_upload_rate(mut self, bytes_per_s: u64) -> Self {
        self.upload_rate = bytes_per_s;
        self
    }

    /// Waits for this upload's turn under the upload rate.
    async fn pace(&self, bytes: usize) {
        if self.upload_rate == 0 {
            return;
        }
        let wait = {
            let mut next = self.next_upload.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.upload_rate as f64);
            start - now
        };
        tokio::time::sleep(wait).await;
    }

    /// Fetch counters and state.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Bytes of chunks served to other peers since start.
    pub fn served_bytes(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Peers banned for lying about the model's bytes.
    pub fn banned(&self) -> Vec<PeerKey> {
        self.banned.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Everything `GET /status` shows.
    pub fn status(&self) -> WeightsStatus {
        let (cache_bytes, cache_budget) = self.cache.as_ref().map_or((0, 0), |c| (c.bytes(), c.budget()));
        let mut banned = self.banned();
        banned.sort();
        WeightsStatus {
            fetch: self.progress.status(),
            fetched_bytes: self.progress.fetched_bytes(),
            served_bytes: self.served_bytes(),
            cache_bytes,
            cache_budget,
            banned,
        }
    }

    /// The manifest of model `hash` as this peer serves it from `source`
    /// (computed once for a whole file held here).
    pub async fn manifest(&self, hash: ModelHash, source: &WeightSource) -> Result<Arc<Manifest>, WeightsError> {
        match source {
            WeightSource::Chunks { store, .. } => Ok(store.manifest().clone()),
            WeightSource::File(path) => {
                let path = path.clone();
                self.local
                    .get_or_try_init(|| async move {
                        tokio::task::spawn_blocking(move || local::manifest_of(&path, hash))
                            .await
                            .map_err(|e| WeightsError::Manifest(e.to_string()))?
                            .map(Arc::new)
                    })
                    .await
                    .cloned()
            }
        }
    }

    /// Answers a peer's request for a chunk (or the manifest) of the model
    /// this peer serves (`served`: its hash and weights); `busy`: stage work
    /// is waiting here, so uploads go one at a time.
    pub async fn serve(&self, served: Option<(ModelHash, &WeightSource)>, req: WeightChunkRequest, busy: bool) -> Message {
        let Some((hash, source)) = served.filter(|m| m.0 == req.model) else {
            return error_frame(ErrorCode::NotServed, format!("this peer does not hold model {}", hex(&req.model)));
        };
        if busy && self.uploads.available_permits() < MAX_UPLOADS {
            return error_frame(ErrorCode::Busy, "serving inference first: one upload at a time");
        }
        let Ok(_permit) = self.uploads.clone().try_acquire_owned() else {
            return error_frame(ErrorCode::Busy, format!("{MAX_UPLOADS} uploads in progress"));
        };
        let manifest = match self.manifest(hash, source).await {
            Ok(m) => m,
            Err(e) => return error_frame(ErrorCode::NotServed, e.to_string()),
        };
        let i = req.chunk as usize;
        let data = if req.chunk == MANIFEST_CHUNK {
            let mut m = (*manifest).clone();
            if self.corrupt.as_deref() == Some("manifest") {
                if let Some(c) = m.chunks.last_mut() {
                    c.hash[0] ^= 0xff;
                }
            }
            m.encode()
        } else {
            let Some(c) = manifest.chunks.get(i).copied() else {
                return error_frame(ErrorCode::Malformed, format!("model has {} chunks, not {}", manifest.chunks.len(), i + 1));
            };
            let read = match source {
                WeightSource::File(p) => {
                    let p = p.clone();
                    tokio::task::spawn_blocking(move || local::read_span(&p, c.offset, c.len)).await.map_err(|e| e.to_string()).and_then(|r| r)
                }
                WeightSource::Chunks { store, .. } => {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || store.get(i)).await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()))
                }
            };
            match read {
                Ok(mut d) => {
                    if self.corrupt.as_deref() == Some("1") && !d.is_empty() {
                        d[0] ^= 0xff;
                    }
                    self.pace(d.len()).await;
                    d
                }
                Err(e) => return error_frame(ErrorCode::NotServed, e),
            }
        };
        if req.chunk != MANIFEST_CHUNK {
            self.served.fetch_add(data.len() as u64, Ordering::Relaxed);
            metrics::counter!(crate::metrics::WEIGHT_BYTES_SERVED).increment(data.len() as u64);
        }
        Message::WeightChunkReply(WeightChunkReply { model: req.model, chunk: req.chunk, data })
    }

    fn cache(&self) -> Result<&Arc<ChunkCache>, WeightsError> {
        self.cache.as_ref().map_err(|e| WeightsError::Cache(e.clone()))
    }

    fn fetch<'a>(&'a self, link: &Arc<dyn MeshLink>, store: &'a ChunkStore) -> fetch::Fetch<'a> {
        fetch::Fetch { link: link.clone(), store, banned: &self.banned, progress: &self.progress }
    }

    /// Gets model `hash` from the mesh: its manifest (checked against
    /// `trusted`, the manifest digest when known; else every holder asked
    /// must agree), then its header chunks; the model is served under
    /// `name` (the path returned, in the model's cache folder). Waits for a
    /// holder as long as it takes, reporting the wait as an error after
    /// [`NO_HOLDER_AFTER`].
    pub async fn acquire(
        &self,
        link: Arc<dyn MeshLink>,
        hash: ModelHash,
        trusted: Option<[u8; 32]>,
        name: &str,
    ) -> Result<(PathBuf, Arc<Gguf>, WeightSource), WeightsError> {
        let cache = self.cache().inspect_err(|e| self.progress.state(&hash, "failed", Some(e.to_string())))?.clone();
        let cached = ChunkStore::cached_manifest(&cache, &hash).filter(|m| trusted.is_none_or(|t| m.digest() == t));
        let manifest = match cached {
            Some(m) => m,
            None => self.manifest_from_mesh(&link, hash, trusted).await,
        };
        let store = Arc::new(ChunkStore::open(cache, Arc::new(manifest))?);
        let header: Vec<usize> = (0..store.manifest().header_chunks as usize).collect();
        self.fetch(&link, &store).run(&header).await.inspect_err(|e| self.progress.state(&hash, "failed", Some(e.to_string())))?;
        let reader_store = store.clone();
        let file_len = store.manifest().file_len;
        let gguf = tokio::task::spawn_blocking(move || Gguf::parse(std::io::BufReader::new(ChunkReader::new(reader_store)), file_len))
            .await
            .map_err(|e| WeightsError::Model(e.to_string()))?
            .map_err(|e| WeightsError::Model(format!("the fetched header: {e}")))?;
        let gguf = Arc::new(gguf);
        let path = store.dir().join(name);
        self.progress.state(&hash, "ready", None);
        Ok((path, gguf.clone(), WeightSource::Chunks { store, gguf }))
    }

    async fn manifest_from_mesh(&self, link: &Arc<dyn MeshLink>, hash: ModelHash, trusted: Option<[u8; 32]>) -> Manifest {
        let started = Instant::now();
        // When the wait was last reported as an error (never yet).
        let mut said: Option<Instant> = None;
        loop {
            let banned = self.banned.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut holders = fetch::holders(&link.view().await, &hash, &banned);
            // Whole-file holders first.
            holders.sort_by_key(|h| (h.bitmap.is_some(), h.queued));
            holders.truncate(MANIFEST_ASKS);
            if holders.is_empty() {
                if started.elapsed() > NO_HOLDER_AFTER && said.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    let msg = format!(
                        "no peer in the mesh holds model sha256:{} (waited {} s; still looking)",
                        hex(&hash),
                        started.elapsed().as_secs()
                    );
                    tracing::error!("{msg}");
                    self.progress.state(&hash, "waiting", Some(msg));
                    said = Some(Instant::now());
                } else if said.is_none() {
                    self.progress.state(&hash, "waiting", None);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            self.progress.state(&hash, "manifest", None);
            let asks = holders.iter().map(|h| {
                let (link, peer) = (link.clone(), h.peer.clone());
                async move {
                    let r = link.call(&peer, Message::WeightChunkRequest(WeightChunkRequest { model: hash, chunk: MANIFEST_CHUNK })).await;
                    (peer, r)
                }
            });
            let mut got: Vec<(PeerKey, Manifest)> = Vec::new();
            for (peer, r) in futures::future::join_all(asks).await {
                let m = match r {
                    Ok(Message::WeightChunkReply(rep)) if rep.chunk == MANIFEST_CHUNK && rep.model == hash => {
                        Manifest::decode(&rep.data).map_err(|e| e.to_string())
                    }
                    Ok(Message::Error(e)) => {
                        tracing::debug!(peer = %peer, why = e.message, "weights: no manifest from this holder");
                        continue;
                    }
                    Ok(m) => Err(format!("answered {:?}", m.kind())),
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "weights: no manifest from this holder");
                        continue;
                    }
                };
                let wrong = match &m {
                    Err(e) => Some(e.clone()),
                    Ok(m) if m.model != hash => Some("it names another model".into()),
                    Ok(m) if trusted.is_some_and(|t| m.digest() != t) => {
                        Some("its digest is not the one this model is known by".into())
                    }
                    Ok(_) => None,
                };
                match (wrong, m) {
                    (Some(why), _) => {
                        let msg = format!("the manifest of model {} from peer {peer} does not match the model: {why}; peer banned for this model", hex(&hash));
                        tracing::error!("{msg}");
                        self.progress.state(&hash, "manifest", Some(msg));
                        self.banned.lock().unwrap_or_else(|e| e.into_inner()).insert(peer);
                    }
                    (None, Ok(m)) => got.push((peer, m)),
                    (None, Err(_)) => {}
                }
            }
            if let Some((_, first)) = got.first() {
                if got.iter().all(|(_, m)| m == first) {
                    return first.clone();
                }
                let msg = format!(
                    "the holders of model {} disagree on its manifest ({}); asking again",
                    hex(&hash),
                    got.iter().map(|(p, m)| format!("{p}: {}", &hex(&m.digest())[..12])).collect::<Vec<_>>().join(", ")
                );
                tracing::error!("{msg}");
                self.progress.state(&hash, "manifest", Some(msg));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Fetches what layers `range` need from `source` that is not here yet
    /// (nothing for a model held whole).
    pub async fn fetch_range(&self, link: &Arc<dyn MeshLink>, source: &WeightSource, range: std::ops::Range<usize>) -> Result<(), WeightsError> {
        let WeightSource::Chunks { store, gguf } = source else { return Ok(()) };
        let wanted = chunks_for(store, gguf, range.clone())?;
        let m = store.manifest();
        let r = self.fetch(link, store).run(&wanted).await;
        let (state, err) = match &r {
            Ok(()) => ("ready", None),
            Err(e) => ("failed", Some(format!("layers {range:?}: {e}"))),
        };
        self.progress.state(&m.model, state, err);
        self.refresh_held(store);
        r
    }

    fn refresh_held(&self, store: &ChunkStore) {
        let (n, bytes) = store.held();
        self.progress.with(|s| (s.0.chunks_held, s.0.bytes_held) = (n, bytes));
    }
}

/// The chunks layers `range` need: the header's, and those holding the
/// range's tensors.
fn chunks_for(store: &ChunkStore, gguf: &Gguf, range: std::ops::Range<usize>) -> Result<Vec<usize>, WeightsError> {
    let names = Shard::tensors_for(gguf, range).map_err(|e| WeightsError::Model(e.to_string()))?;
    let m = store.manifest();
    let mut wanted: Vec<usize> = (0..m.header_chunks as usize).collect();
    for n in &names {
        let t = &gguf.tensors[n];
        wanted.extend(m.covering(t.offset, t.offset + t.size));
    }
    wanted.sort_unstable();
    wanted.dedup();
    Ok(wanted)
}

/// Whether the weights of layers `range` are all here in `source`.
pub fn holds(source: &WeightSource, range: std::ops::Range<usize>) -> bool {
    match source {
        WeightSource::File(_) => true,
        WeightSource::Chunks { store, gguf } => chunks_for(store, gguf, range).is_ok_and(|w| w.iter().all(|&i| store.has(i))),
    }
}
