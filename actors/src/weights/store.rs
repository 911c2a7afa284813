//! The chunk cache on disk (`$FOGMESH_HOME/chunks`): one folder per model
//! holding its manifest and the verified chunks fetched so far; bounded in
//! bytes over all models, least recently used out. [`ChunkReader`] reads a
//! model's chunks as one file.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fogmesh_protocols::{Manifest, ModelHash, hex};

use super::WeightsError;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Chunk files of every model under one root, within a byte budget.
#[derive(Debug)]
pub struct ChunkCache {
    root: PathBuf,
    budget: u64,
    /// Chunk file → (bytes, last use).
    index: Mutex<BTreeMap<PathBuf, (u64, u64)>>,
    tick: AtomicU64,
}

impl ChunkCache {
    /// Opens (creating) the cache at `root`, at most `budget` bytes of
    /// chunks; what earlier runs left there counts, oldest first out.
    pub fn open(root: &Path, budget: u64) -> Result<Arc<ChunkCache>, WeightsError> {
        let unwritable = |e: std::io::Error| WeightsError::Cache(format!("chunk cache {} is not writable: {e}", root.display()));
        std::fs::create_dir_all(root).map_err(unwritable)?;
        let probe = root.join(".probe");
        std::fs::write(&probe, b"").map_err(unwritable)?;
        let _ = std::fs::remove_file(&probe);
        let mut files: Vec<(std::time::SystemTime, PathBuf, u64)> = Vec::new();
        for model in std::fs::read_dir(root).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(model.path()).into_iter().flatten().flatten() {
                let name = f.file_name();
                if name.to_string_lossy().starts_with('c')
                    && let Ok(md) = f.metadata()
                {
                    files.push((md.modified().unwrap_or(std::time::UNIX_EPOCH), f.path(), md.len()));
                }
            }
        }
        files.sort();
        let index = files.into_iter().enumerate().map(|(i, (_, p, n))| (p, (n, i as u64))).collect::<BTreeMap<_, _>>();
        let tick = AtomicU64::new(index.len() as u64);
        let cache = Arc::new(ChunkCache { root: root.to_path_buf(), budget, index: Mutex::new(index), tick });
        cache.trim(&[]);
        Ok(cache)
    }

    /// Bytes of chunks held, over all models.
    pub fn bytes(&self) -> u64 {
        lock(&self.index).values().map(|v| v.0).sum()
    }

    /// The most bytes it keeps.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn touch(&self, path: &Path, bytes: u64) {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        lock(&self.index).insert(path.to_path_buf(), (bytes, t));
    }

    /// Drops least recently used chunks until the cache is within its
    /// budget, sparing those in `pinned`.
    fn trim(&self, pinned: &[PathBuf]) -> Vec<PathBuf> {
        let mut index = lock(&self.index);
        let mut total: u64 = index.values().map(|v| v.0).sum();
        let mut gone = Vec::new();
        if total <= self.budget {
            return gone;
        }
        let mut by_age: Vec<(u64, PathBuf, u64)> = index.iter().map(|(p, &(n, t))| (t, p.clone(), n)).collect();
        by_age.sort();
        for (_, p, n) in by_age {
            if total <= self.budget {
                break;
            }
            if pinned.contains(&p) {
                continue;
            }
            let _ = std::fs::remove_file(&p);
            index.remove(&p);
            total -= n;
            gone.push(p);
        }
        gone
    }
}

/// One model's chunks in the cache.
#[derive(Debug)]
pub struct ChunkStore {
    cache: Arc<ChunkCache>,
    dir: PathBuf,
    manifest: Arc<Manifest>,
    held: Mutex<Vec<bool>>,
    /// Chunks the current fetch needs: never trimmed while it runs.
    pinned: Mutex<Vec<usize>>,
}

impl ChunkStore {
    /// The store of `manifest`'s model; chunks already on disk count as
    /// held (each is checked again when read). Writes the manifest beside.
    pub fn open(cache: Arc<ChunkCache>, manifest: Arc<Manifest>) -> Result<ChunkStore, WeightsError> {
        let dir = cache.root.join(hex(&manifest.model));
        let io = |e: std::io::Error| WeightsError::Cache(format!("chunk cache {}: {e}", dir.display()));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mpath = dir.join("manifest");
        let bytes = manifest.encode();
        if std::fs::read(&mpath).ok().as_deref() != Some(&bytes[..]) {
            // Chunks cut another way (or of no known manifest) are not these.
            for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().starts_with('c') {
                    let _ = std::fs::remove_file(f.path());
                    lock(&cache.index).remove(&f.path());
                }
            }
            write_atomic(&mpath, &bytes).map_err(io)?;
        }
        let held = (0..manifest.chunks.len())
            .map(|i| {
                let p = dir.join(format!("c{i}"));
                std::fs::metadata(&p).is_ok_and(|m| m.len() == manifest.chunks[i].len as u64)
            })
            .collect();
        Ok(ChunkStore { cache, dir, manifest, held: Mutex::new(held), pinned: Mutex::new(Vec::new()) })
    }

    /// The manifest a model's folder holds from an earlier run, if any.
    pub fn cached_manifest(cache: &ChunkCache, model: &ModelHash) -> Option<Manifest> {
        let bytes = std::fs::read(cache.root.join(hex(model)).join("manifest")).ok()?;
        Manifest::decode(&bytes).ok().filter(|m| m.model == *model)
    }

    /// Its manifest.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Its folder in the cache.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("c{i}"))
    }

    /// Whether chunk `i` is here.
    pub fn has(&self, i: usize) -> bool {
        lock(&self.held).get(i).copied().unwrap_or(false)
    }

    /// One bit per chunk held (bit `i % 8` of byte `i / 8`).
    pub fn bitmap(&self) -> Vec<u8> {
        let held = lock(&self.held);
        let mut b = vec![0u8; held.len().div_ceil(8)];
        for (i, _) in held.iter().enumerate().filter(|(_, h)| **h) {
            b[i / 8] |= 1 << (i % 8);
        }
        b
    }

    /// Chunks held, and their bytes.
    pub fn held(&self) -> (usize, u64) {
        let held = lock(&self.held);
        let n = held.iter().filter(|h| **h).count();
        let bytes = held.iter().zip(&self.manifest.chunks).filter(|(h, _)| **h).map(|(_, c)| c.len as u64).sum();
        (n, bytes)
    }

    /// Keeps chunks `wanted` from being trimmed (a fetch in progress).
    pub fn pin(&self, wanted: &[usize]) {
        *lock(&self.pinned) = wanted.to_vec();
    }

    /// Stores chunk `i` if `data` is its bytes (checked here); trims the
    /// cache after.
    pub fn put(&self, i: usize, data: &[u8]) -> Result<(), WeightsError> {
        if !self.manifest.verify(i, data) {
            return Err(WeightsError::Corrupt { chunk: i });
        }
        let p = self.path(i);
        write_atomic(&p, data).map_err(|e| WeightsError::Cache(format!("writing {}: {e}", p.display())))?;
        if let Some(h) = lock(&self.held).get_mut(i) {
            *h = true;
        }
        self.cache.touch(&p, data.len() as u64);
        let pinned: Vec<PathBuf> = lock(&self.pinned).iter().map(|&j| self.path(j)).collect();
        for gone in self.cache.trim(&pinned) {
            if gone.parent() == Some(&self.dir)
                && let Some(j) = gone.file_name().and_then(|n| n.to_str()?.strip_prefix('c')?.parse::<usize>().ok())
                && let Some(h) = lock(&self.held).get_mut(j)
            {
                *h = false;
            }
        }
        Ok(())
    }

    /// Chunk `i`'s bytes, checked against the manifest (a chunk damaged on
    /// disk is dropped and reported missing).
    pub fn get(&self, i: usize) -> Result<Vec<u8>, WeightsError> {
        if !self.has(i) {
            return Err(WeightsError::Missing { chunk: i });
        }
        let p = self.path(i);
        let data = std::fs::read(&p).map_err(|_| WeightsError::Missing { chunk: i })?;
        if !self.manifest.verify(i, &data) {
            let _ = std::fs::remove_file(&p);
            if let Some(h) = lock(&self.held).get_mut(i) {
                *h = false;
            }
            return Err(WeightsError::Corrupt { chunk: i });
        }
        self.cache.touch(&p, data.len() as u64);
        Ok(data)
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// A model's chunks read as its file: bytes of chunks not held are an
/// error, never zeros.
#[derive(Debug)]
pub struct ChunkReader {
    store: Arc<ChunkStore>,
    pos: u64,
    buf: Option<(usize, Vec<u8>)>,
}

impl ChunkReader {
    /// A reader at the start of the file.
    pub fn new(store: Arc<ChunkStore>) -> Self {
        ChunkReader { store, pos: 0, buf: None }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let m = self.store.manifest.clone();
        let Some(i) = m.locate(self.pos) else { return Ok(0) };
        if self.buf.as_ref().is_none_or(|b| b.0 != i) {
            let data = self.store.get(i).map_err(|e| std::io::Error::other(e.to_string()))?;
            self.buf = Some((i, data));
        }
        let (_, data) = self.buf.as_ref().expect("just filled");
        let at = (self.pos - m.chunks[i].offset) as usize;
        let n = out.len().min(data.len() - at);
        out[..n].copy_from_slice(&data[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ChunkReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let len = self.store.manifest.file_len as i128;
        let p = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => len + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if p < 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start"));
        }
        self.pos = p as u64;
        Ok(self.pos)
    }
}
