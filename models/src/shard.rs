//! A contiguous range of a model's layers, and its forward pass: what every
//! architecture shares (range loading, the embedding and the head, the
//! per-session [`SessionCache`], dispatch through the blocks); the blocks
//! themselves live in `arch/`.
//!
//! A [`Shard`] holds only the weights its range needs: the token embedding when
//! it is the first stage, the final norm and output head when it is the last.
//! The KV cache lives in a [`SessionCache`] owned by the caller, so one loaded
//! shard serves any number of sessions. Chaining shards that cover `0..layers`
//! gives bit-identical results to one shard covering everything: each layer's
//! arithmetic does not depend on where the model is cut.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::debug_span;

use crate::arch::{Block, Loader, Pass, Scratch, Seg};
use crate::config::{Family, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::gguf::Gguf;
use crate::ops;
use crate::pool::ThreadPool;
use crate::quant::Weights;

/// What a shard consumes.
#[derive(Debug, Clone, Copy)]
pub enum ShardInput<'a> {
    /// Token ids; only the first stage accepts them.
    Tokens(&'a [u32]),
    /// Hidden states `[tokens, hidden]`, row-major; any stage but the first.
    Hidden(&'a [f32]),
}

/// Which positions the last stage computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last token of the input (generation).
    Last,
    /// Every token of the input (scoring).
    All,
}

/// What a shard produces.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardOutput {
    /// Hidden states `[tokens, hidden]` for the next stage.
    Hidden(Vec<f32>),
    /// Logits `[rows, vocab]` from the last stage.
    Logits(Vec<f32>),
}

impl ShardOutput {
    /// The values, whichever kind they are.
    pub fn into_vec(self) -> Vec<f32> {
        match self {
            ShardOutput::Hidden(v) | ShardOutput::Logits(v) => v,
        }
    }
}

/// The last stage's final norm and output projection.
#[derive(Debug)]
struct Head {
    norm: Vec<f32>,
    output: Arc<Weights>,
}

/// A loaded range of layers.
#[derive(Debug)]
pub struct Shard {
    cfg: LlamaConfig,
    range: Range<usize>,
    embed: Option<Arc<Weights>>,
    layers: Vec<Block>,
    head: Option<Head>,
    /// RoPE inverse frequencies, `rope_dims / 2` (position scale applied).
    inv_freq: Vec<f64>,
    /// Those of the local (sliding-window) layers, where they differ.
    inv_freq_local: Option<Vec<f64>>,
    pool: Arc<ThreadPool>,
    memory: usize,
    /// Unique per loaded shard: a session cache works only with its own shard.
    id: u64,
}

static NEXT_SHARD_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Per-session state of one shard: its KV cache and reusable buffers.
#[derive(Debug)]
pub struct SessionCache {
    shard: u64,
    range: Range<usize>,
    pos: usize,
    /// Key (and value) values per token and layer.
    kv_dim: usize,
    /// Per layer, `pos * kv_dim` keys (RoPE applied).
    k: Vec<Vec<f32>>,
    /// Per layer, `pos * kv_dim` values.
    v: Vec<Vec<f32>>,
    scratch: Scratch,
}

impl SessionCache {
    /// Tokens already processed in this session.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Forgets everything after the first `pos` tokens (for rollback).
    pub fn truncate(&mut self, pos: usize) {
        if pos < self.pos {
            self.rollback_layers(pos);
            self.pos = pos;
        }
    }

    /// Sets aside room for `tokens` tokens in all, so that growing to them
    /// allocates nothing more and [`SessionCache::memory_bytes`] is exactly
    /// what was budgeted.
    pub fn reserve(&mut self, tokens: usize) {
        let want = tokens * self.kv_dim;
        for kv in self.k.iter_mut().chain(self.v.iter_mut()) {
            kv.reserve_exact(want.saturating_sub(kv.len()));
        }
    }

    /// Starts this (empty) cache with the first `n` tokens' keys and values
    /// of `from`, a cache of the same shard: a shared prompt prefix, not
    /// computed again. They are exactly what computing those tokens here
    /// would give (a row's result never depends on what shares its pass).
    pub fn load_prefix(&mut self, from: &SessionCache, n: usize) -> Result<()> {
        if from.shard != self.shard || self.pos != 0 || n > from.pos {
            return Err(ModelError::Input(format!(
                "a prefix of {n} tokens cannot come from a cache of {} tokens of another shard or into a cache in use",
                from.pos
            )));
        }
        let len = n * self.kv_dim;
        for (dst, src) in self.k.iter_mut().zip(&from.k).chain(self.v.iter_mut().zip(&from.v)) {
            dst.extend_from_slice(&src[..len]);
        }
        self.pos = n;
        Ok(())
    }

    /// Keeps only the first `pos` tokens and gives back the memory beyond
    /// them (for a cache kept as a shared prefix).
    pub fn shrink_to(&mut self, pos: usize) {
        self.truncate(pos);
        for kv in self.k.iter_mut().chain(self.v.iter_mut()) {
            kv.shrink_to_fit();
        }
    }

    /// Cuts every layer's keys and values back to `pos` tokens.
    fn rollback_layers(&mut self, pos: usize) {
        for kv in self.k.iter_mut().chain(self.v.iter_mut()) {
            kv.truncate(pos * self.kv_dim);
        }
    }

    /// Bytes held by the KV cache.
    pub fn memory_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| x.capacity() * 4).sum()
    }
}

impl Shard {
    /// Loads layers `range` of the GGUF model at `path`, computing on `pool`.
    pub fn load(path: &Path, range: Range<usize>, pool: Arc<ThreadPool>) -> Result<Self> {
        let g = Gguf::open(path)?;
        let file = File::open(path).map_err(|source| ModelError::Io { path: PathBuf::from(path), source })?;
        Self::load_from(&g, BufReader::new(file), range, pool)
    }

    /// Loads layers `range` from an already parsed file.
    pub fn load_from<R: Read + Seek>(g: &Gguf, file: R, range: Range<usize>, pool: Arc<ThreadPool>) -> Result<Self> {
        Self::load_from_with_progress(g, file, range, pool, &mut |_| {})
    }

    /// [`Shard::load_from`], calling `layer_done` after each layer is read
    /// (progress bars).
    pub fn load_from_with_progress<R: Read + Seek>(
        g: &Gguf,
        file: R,
        range: Range<usize>,
        pool: Arc<ThreadPool>,
        layer_done: &mut dyn FnMut(usize),
    ) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(g)?;
        if range.start >= range.end || range.end > cfg.layers {
            return Err(ModelError::LayerRange { start: range.start, end: range.end, layers: cfg.layers });
        }
        let _span = debug_span!("load_shard", start = range.start, end = range.end).entered();
        let mut ld = Loader::new(g, file);
        let (d, vocab) = (cfg.hidden, cfg.vocab);
        let first = range.start == 0;
        let last = range.end == cfg.layers;
        let embed = if first { Some(Arc::new(ld.matrix("token_embd.weight", d, vocab)?)) } else { None };
        let mut layers = Vec::with_capacity(range.len());
        for i in range.clone() {
            layers.push(Block::load(&mut ld, &cfg, i)?);
            layer_done(i);
        }
        let head = if last {
            let norm = ld.vector("output_norm.weight", d)?;
            let output = if ld.has("output.weight") {
                Arc::new(ld.matrix("output.weight", d, vocab)?)
            } else if let Some(e) = &embed {
                e.clone()
            } else {
                Arc::new(ld.matrix("token_embd.weight", d, vocab)?)
            };
            Some(Head { norm, output })
        } else {
            None
        };
        let freqs = |base: f32, scale: f32| -> Vec<f64> {
            (0..cfg.rope_dims / 2)
                .map(|i| scale as f64 * (base as f64).powf(-((2 * i) as f64) / cfg.rope_dims as f64))
                .collect()
        };
        let mut inv_freq = freqs(cfg.rope_base, cfg.rope_scale);
        // Llama 3 files carry per-frequency divisors (their scaling, baked in).
        if ld.has("rope_freqs.weight") {
            let factors = ld.vector("rope_freqs.weight", cfg.rope_dims / 2)?;
            if let Some(bad) = factors.iter().find(|f| **f <= 0.0) {
                return Err(ModelError::Tensor { name: "rope_freqs.weight".into(), problem: format!("holds {bad}, not a positive factor") });
            }
            for (f, k) in inv_freq.iter_mut().zip(&factors) {
                *f /= *k as f64;
            }
        }
        // Gemma 3's local layers keep their own base, unscaled.
        let inv_freq_local = (cfg.family == Family::Gemma3).then(|| freqs(cfg.rope_base_local, 1.0));
        let id = NEXT_SHARD_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut shard = Shard { cfg, range, embed, layers, head, inv_freq, inv_freq_local, pool, memory: 0, id };
        shard.memory = shard.compute_memory();
        Ok(shard)
    }

    /// The tensors [`Shard::load_from`] reads for layers `range` (a peer that
    /// fetches weights fetches only these): the embedding for the first
    /// layer, every `blk.N.` tensor of the range, the output norm and head
    /// (or the tied embedding) for the last, and the RoPE factors.
    pub fn tensors_for(g: &Gguf, range: Range<usize>) -> Result<Vec<String>> {
        let cfg = LlamaConfig::from_gguf(g)?;
        if range.start >= range.end || range.end > cfg.layers {
            return Err(ModelError::LayerRange { start: range.start, end: range.end, layers: cfg.layers });
        }
        let mut names = Vec::new();
        let mut add = |n: &str| {
            if g.tensors.contains_key(n) && !names.iter().any(|m| m == n) {
                names.push(n.to_string());
            }
        };
        if range.start == 0 {
            add("token_embd.weight");
        }
        for i in range.clone() {
            let prefix = format!("blk.{i}.");
            for n in g.tensors.keys().filter(|n| n.starts_with(&prefix)) {
                add(n);
            }
        }
        if range.end == cfg.layers {
            add("output_norm.weight");
            if g.tensors.contains_key("output.weight") {
                add("output.weight");
            } else {
                add("token_embd.weight");
            }
        }
        add("rope_freqs.weight");
        Ok(names)
    }

    fn compute_memory(&self) -> usize {
        let mut m = 0;
        if let Some(e) = &self.embed {
            m += e.memory_bytes();
        }
        for l in &self.layers {
            m += l.memory_bytes();
        }
        if let Some(h) = &self.head {
            m += 4 * h.norm.len();
            let shared = self.embed.as_ref().is_some_and(|e| Arc::ptr_eq(e, &h.output));
            if !shared {
                m += h.output.memory_bytes();
            }
        }
        m
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The layers this shard runs.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Whether this shard takes token ids (holds layer 0).
    pub fn is_first(&self) -> bool {
        self.range.start == 0
    }

    /// Whether this shard produces logits (holds the last layer).
    pub fn is_last(&self) -> bool {
        self.range.end == self.cfg.layers
    }

    /// Bytes of weights held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.memory
    }

    /// The thread pool this shard computes on.
    pub fn pool(&self) -> &Arc<ThreadPool> {
        &self.pool
    }

    /// Bytes one token adds to a session's cache here (keys and values of
    /// every layer of the range).
    pub fn cache_bytes_per_token(&self) -> usize {
        self.layers.len() * 2 * self.cfg.kv_heads * self.cfg.head_dim * std::mem::size_of::<f32>()
    }

    /// A new, empty session state for this shard.
    pub fn new_session(&self) -> SessionCache {
        SessionCache {
            shard: self.id,
            range: self.range.clone(),
            pos: 0,
            kv_dim: self.cfg.kv_dim(),
            k: vec![Vec::new(); self.layers.len()],
            v: vec![Vec::new(); self.layers.len()],
            scratch: Scratch::default(),
        }
    }

    /// Runs `input` through this shard's layers at the session's next positions,
    /// appending to its KV cache. Returns hidden states, or logits if this is the
    /// last stage.
    pub fn forward(&self, cache: &mut SessionCache, input: ShardInput<'_>, logits: LogitsFor) -> Result<ShardOutput> {
        let mut one = [BatchItem { cache, input, logits }];
        self.forward_batch(&mut one).pop().unwrap_or_else(|| Err(ModelError::Input("no result".into())))
    }

    /// Runs several sessions' inputs through this shard in one pass: each
    /// weight matrix is read once for all their rows, attention is per
    /// session over its own cache. Each item gets exactly what
    /// [`Shard::forward`] would have given it alone (every row is reduced
    /// in a fixed order), or its own error: a bad item fails alone.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Vec<Result<ShardOutput>> {
        let mut results: Vec<Option<Result<ShardOutput>>> = Vec::with_capacity(items.len());
        let mut x = Vec::new();
        let mut rows = Vec::new();
        for it in items.iter_mut() {
            match self.embed_input(it, &mut x) {
                Ok(n) => {
                    rows.push(n);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut caches: Vec<(&mut SessionCache, LogitsFor)> =
            items.iter_mut().zip(&results).filter(|(_, r)| r.is_none()).map(|(it, _)| (&mut *it.cache, it.logits)).collect();
        if !caches.is_empty() {
            let out = self.run(&mut caches, &rows, x);
            let mut out = out.into_iter();
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = out.next();
            }
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(ModelError::Input("no result".into())))).collect()
    }

    /// Checks one item and appends its rows (embedded token ids, or hidden
    /// states) to `x`; returns how many.
    fn embed_input(&self, it: &BatchItem<'_>, x: &mut Vec<f32>) -> Result<usize> {
        let d = self.cfg.hidden;
        let cache = &*it.cache;
        if cache.shard != self.id {
            return Err(ModelError::Input(format!(
                "session cache belongs to another shard (layers {:?}; this one runs {:?})",
                cache.range, self.range
            )));
        }
        let tokens = match (it.input, &self.embed) {
            (ShardInput::Tokens(ids), Some(_)) => ids.len(),
            (ShardInput::Hidden(h), None) if h.len() % d == 0 => h.len() / d,
            (ShardInput::Hidden(h), None) => {
                return Err(ModelError::Input(format!("{} values are not whole rows of width {d}", h.len())));
            }
            (ShardInput::Tokens(_), None) => {
                return Err(ModelError::Input(format!("layers {:?} take hidden states, not token ids", self.range)));
            }
            (ShardInput::Hidden(_), Some(_)) => {
                return Err(ModelError::Input("the first stage takes token ids, not hidden states".into()));
            }
        };
        if tokens == 0 {
            return Err(ModelError::Input("no tokens".into()));
        }
        if cache.pos + tokens > self.cfg.context {
            return Err(ModelError::ContextFull { pos: cache.pos, tokens, ctx: self.cfg.context });
        }
        match (it.input, &self.embed) {
            (ShardInput::Tokens(ids), Some(embed)) => {
                if let Some(id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab) {
                    return Err(ModelError::Input(format!("token id {id} is outside the vocabulary of {}", self.cfg.vocab)));
                }
                let at = x.len();
                x.resize(at + tokens * d, 0.0);
                for (&id, row) in ids.iter().zip(x[at..].chunks_exact_mut(d)) {
                    embed.row_f32(id as usize, row)?;
                }
                if self.cfg.family == Family::Gemma3 {
                    let scale = (d as f32).sqrt();
                    x[at..].iter_mut().for_each(|v| *v *= scale);
                }
            }
            (ShardInput::Hidden(h), _) => {
                if h.iter().any(|v| !v.is_finite()) {
                    return Err(ModelError::Input("hidden state holds NaN or infinity".into()));
                }
                x.extend_from_slice(h);
            }
            _ => {}
        }
        Ok(tokens)
    }

    /// The layers and the head over the checked sessions' rows `x`
    /// (`rows[i]` of session `i`, one after another).
    fn run(&self, caches: &mut [(&mut SessionCache, LogitsFor)], rows: &[usize], mut x: Vec<f32>) -> Vec<Result<ShardOutput>> {
        let d = self.cfg.hidden;
        let ropes: Vec<(Vec<(f32, f32)>, Option<Vec<(f32, f32)>>)> = caches
            .iter()
            .zip(rows)
            .map(|((c, _), &n)| (ops::rope_table(&self.inv_freq, c.pos, n), self.inv_freq_local.as_ref().map(|f| ops::rope_table(f, c.pos, n))))
            .collect();
        // The batch computes in the first session's buffers.
        let mut scratch = std::mem::take(&mut caches[0].0.scratch);
        let total: usize = rows.iter().sum();
        let mut failed = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let i = self.range.start + li;
            let _span = debug_span!("layer", layer = i, tokens = total, sessions = caches.len()).entered();
            let window = self.cfg.window_of(i);
            let mut segs: Vec<Seg<'_>> = caches
                .iter_mut()
                .zip(rows)
                .zip(&ropes)
                .map(|(((c, _), &n), (global, local))| {
                    let rope = match (local, window) {
                        (Some(local), Some(_)) => local,
                        _ => global,
                    };
                    Seg { k: &mut c.k[li], v: &mut c.v[li], pos: c.pos, rows: n, rope }
                })
                .collect();
            let pass = Pass { cfg: &self.cfg, pool: &self.pool, segs: &mut segs, s: &mut scratch, window };
            if let Err(e) = layer.forward(pass, &mut x) {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            // Back to where every session was: a failed pass leaves no trace.
            for (c, _) in caches.iter_mut() {
                let pos = c.pos;
                c.rollback_layers(pos);
            }
            caches[0].0.scratch = scratch;
            let why = e.to_string();
            let mut first = Some(e);
            return caches.iter().map(|_| Err(first.take().unwrap_or_else(|| ModelError::Input(format!("the batched pass failed: {why}"))))).collect();
        }
        for ((c, _), &n) in caches.iter_mut().zip(rows) {
            c.pos += n;
        }
        let out = match &self.head {
            None => {
                let mut out = Vec::with_capacity(caches.len());
                let mut at = 0;
                for &n in rows {
                    out.push(Ok(ShardOutput::Hidden(x[at * d..(at + n) * d].to_vec())));
                    at += n;
                }
                out
            }
            Some(head) => self.logits(head, caches, rows, &x, &mut scratch),
        };
        caches[0].0.scratch = scratch;
        self.pool.rest();
        out
    }

    /// The last stage's logits for the rows each session asks for, through
    /// one product with the output matrix.
    fn logits(&self, head: &Head, caches: &[(&mut SessionCache, LogitsFor)], rows: &[usize], x: &[f32], s: &mut Scratch) -> Vec<Result<ShardOutput>> {
        let (d, vocab) = (self.cfg.hidden, self.cfg.vocab);
        // Each session's rows of `x` that get logits.
        let mut picked = Vec::with_capacity(caches.len());
        let mut at = 0;
        for ((_, which), &n) in caches.iter().zip(rows) {
            picked.push(match which {
                LogitsFor::Last => at + n - 1..at + n,
                LogitsFor::All => at..at + n,
            });
            at += n;
        }
        let m: usize = picked.iter().map(|r| r.len()).sum();
        s.xn.resize(m * d, 0.0);
        for (src, dst) in picked.iter().flat_map(|r| r.clone()).zip(s.xn.chunks_exact_mut(d)) {
            ops::rms_norm(&x[src * d..(src + 1) * d], &head.norm, self.cfg.eps, dst);
        }
        let mut all = vec![0.0; m * vocab];
        if let Err(e) = head.output.matmul(&self.pool, &s.xn, &mut s.acts, &mut all) {
            let why = e.to_string();
            return caches.iter().map(|_| Err(ModelError::Input(format!("the output projection failed: {why}")))).collect();
        }
        if picked.len() == 1 {
            return vec![Ok(ShardOutput::Logits(all))];
        }
        let mut at = 0;
        picked
            .iter()
            .map(|r| {
                let part = all[at * vocab..(at + r.len()) * vocab].to_vec();
                at += r.len();
                Ok(ShardOutput::Logits(part))
            })
            .collect()
    }
}

/// One session's part of a batched forward pass ([`Shard::forward_batch`]).
pub struct BatchItem<'a> {
    /// The session's state on this shard.
    pub cache: &'a mut SessionCache,
    /// Its new token ids or hidden states.
    pub input: ShardInput<'a>,
    /// Which of its rows get logits (last stage only).
    pub logits: LogitsFor,
}
