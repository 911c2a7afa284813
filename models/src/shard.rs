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

use crate::arch::{Block, Loader, Pass, Scratch};
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
            let per = if self.pos == 0 { 0 } else { self.k.first().map_or(0, |k| k.len() / self.pos) };
            for kv in self.k.iter_mut().chain(self.v.iter_mut()) {
                kv.truncate(pos * per);
            }
            self.pos = pos;
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
            k: vec![Vec::new(); self.layers.len()],
            v: vec![Vec::new(); self.layers.len()],
            scratch: Scratch::default(),
        }
    }

    /// Runs `input` through this shard's layers at the session's next positions,
    /// appending to its KV cache. Returns hidden states, or logits if this is the
    /// last stage.
    pub fn forward(&self, cache: &mut SessionCache, input: ShardInput<'_>, logits: LogitsFor) -> Result<ShardOutput> {
        let d = self.cfg.hidden;
        if cache.shard != self.id {
            return Err(ModelError::Input(format!(
                "session cache belongs to another shard (layers {:?}; this one runs {:?})",
                cache.range, self.range
            )));
        }
        let mut x = match (input, &self.embed) {
            (ShardInput::Tokens(ids), Some(embed)) => {
                let mut x = vec![0.0; ids.len() * d];
                for (t, &id) in ids.iter().enumerate() {
                    if id as usize >= self.cfg.vocab {
                        return Err(ModelError::Input(format!("token id {id} is outside the vocabulary of {}", self.cfg.vocab)));
                    }
                    embed.row_f32(id as usize, &mut x[t * d..(t + 1) * d])?;
                }
                if self.cfg.family == Family::Gemma3 {
                    let scale = (d as f32).sqrt();
                    x.iter_mut().for_each(|v| *v *= scale);
                }
                x
            }
            (ShardInput::Tokens(_), None) => {
                return Err(ModelError::Input(format!("layers {:?} take hidden states, not token ids", self.range)));
            }
            (ShardInput::Hidden(_), Some(_)) => {
                return Err(ModelError::Input("the first stage takes token ids, not hidden states".into()));
            }
            (ShardInput::Hidden(h), None) => {
                if h.len() % d != 0 {
                    return Err(ModelError::Input(format!("{} values are not whole rows of width {d}", h.len())));
                }
                if h.iter().any(|v| !v.is_finite()) {
                    return Err(ModelError::Input("hidden state holds NaN or infinity".into()));
                }
                h.to_vec()
            }
        };
        let tokens = x.len() / d;
        if tokens == 0 {
            return Err(ModelError::Input("no tokens".into()));
        }
        if cache.pos + tokens > self.cfg.context {
            return Err(ModelError::ContextFull { pos: cache.pos, tokens, ctx: self.cfg.context });
        }
        let rope = ops::rope_table(&self.inv_freq, cache.pos, tokens);
        let rope_local = self.inv_freq_local.as_ref().map(|f| ops::rope_table(f, cache.pos, tokens));
        for (li, layer) in self.layers.iter().enumerate() {
            let i = self.range.start + li;
            let _span = debug_span!("layer", layer = i, tokens).entered();
            let window = self.cfg.window_of(i);
            let table = match (&rope_local, window) {
                (Some(local), Some(_)) => local,
                _ => &rope,
            };
            let pass = Pass {
                cfg: &self.cfg,
                pool: &self.pool,
                k: &mut cache.k[li],
                v: &mut cache.v[li],
                pos: cache.pos,
                s: &mut cache.scratch,
                rope: table,
                window,
            };
            layer.forward(pass, &mut x)?;
        }
        cache.pos += tokens;
        let Some(head) = &self.head else {
            return Ok(ShardOutput::Hidden(x));
        };
        let rows = match logits {
            LogitsFor::Last => &x[(tokens - 1) * d..],
            LogitsFor::All => &x[..],
        };
        let n = rows.len() / d;
        let s = &mut cache.scratch;
        s.xn.resize(rows.len(), 0.0);
        for t in 0..n {
            ops::rms_norm(&rows[t * d..(t + 1) * d], &head.norm, self.cfg.eps, &mut s.xn[t * d..(t + 1) * d]);
        }
        let mut out = vec![0.0; n * self.cfg.vocab];
        head.output.matmul(&self.pool, &s.xn, &mut s.acts, &mut out)?;
        Ok(ShardOutput::Logits(out))
    }

}

