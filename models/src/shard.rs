//! A contiguous range of a Llama-family model's layers, and its forward pass.
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

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::{Gguf, TensorInfo};
use crate::ops;
use crate::pool::ThreadPool;
use crate::quant::{ActBuf, Weights};

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

/// One transformer block's weights.
#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V stacked when their layouts allow, else three matrices.
    qkv: Vec<Weights>,
    wo: Weights,
    ffn_norm: Vec<f32>,
    /// Gate and up stacked when their layouts allow, else two matrices.
    gate_up: Vec<Weights>,
    down: Weights,
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
    layers: Vec<Layer>,
    head: Option<Head>,
    /// RoPE inverse frequencies, `rope_dims / 2`.
    inv_freq: Vec<f64>,
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

#[derive(Debug, Default)]
struct Scratch {
    xn: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    out: Vec<f32>,
    gu: Vec<f32>,
    h: Vec<f32>,
    tmp: Vec<f32>,
    acts: ActBuf,
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

/// Reads tensors of one file, keeping count of the bytes read.
struct Loader<'a, R> {
    g: &'a Gguf,
    file: R,
}

impl<R: Read + Seek> Loader<'_, R> {
    fn info(&self, name: &str, dims: &[usize]) -> Result<&TensorInfo> {
        let t = self.g.tensor(name)?;
        if t.dims != dims {
            return Err(ModelError::Tensor {
                name: name.into(),
                problem: format!("shape {:?}, expected {:?}", t.dims, dims),
            });
        }
        Ok(t)
    }

    /// A matrix of `rows` rows of `cols`.
    fn matrix(&mut self, name: &str, cols: usize, rows: usize) -> Result<Weights> {
        let t = self.info(name, &[cols, rows])?.clone();
        let data = self.g.read_tensor(&mut self.file, &t)?;
        Weights::from_gguf(name, t.dtype, rows, cols, &data)
    }

    /// A vector of `n` values as f32.
    fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = self.info(name, &[n])?.clone();
        let data = self.g.read_tensor(&mut self.file, &t)?;
        let w = Weights::from_gguf(name, t.dtype, 1, n, &data)?;
        let mut out = vec![0.0; n];
        w.row_f32(0, &mut out)?;
        if out.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Tensor { name: name.into(), problem: "holds NaN or infinity".into() });
        }
        Ok(out)
    }
}

/// Stacks matrices into one when possible.
fn stack(parts: Vec<Weights>) -> Vec<Weights> {
    match Weights::concat(&parts) {
        Some(w) => vec![w],
        None => parts,
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
        let mut ld = Loader { g, file };
        let (d, kvd, ffn, vocab) = (cfg.hidden, cfg.kv_dim(), cfg.ffn, cfg.vocab);
        let first = range.start == 0;
        let last = range.end == cfg.layers;
        let embed = if first { Some(Arc::new(ld.matrix("token_embd.weight", d, vocab)?)) } else { None };
        let mut layers = Vec::with_capacity(range.len());
        for i in range.clone() {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: ld.vector(&n("attn_norm"), d)?,
                qkv: stack(vec![
                    ld.matrix(&n("attn_q"), d, d)?,
                    ld.matrix(&n("attn_k"), d, kvd)?,
                    ld.matrix(&n("attn_v"), d, kvd)?,
                ]),
                wo: ld.matrix(&n("attn_output"), d, d)?,
                ffn_norm: ld.vector(&n("ffn_norm"), d)?,
                gate_up: stack(vec![ld.matrix(&n("ffn_gate"), d, ffn)?, ld.matrix(&n("ffn_up"), d, ffn)?]),
                down: ld.matrix(&n("ffn_down"), ffn, d)?,
            });
            layer_done(i);
        }
        let head = if last {
            let norm = ld.vector("output_norm.weight", d)?;
            let output = if g.tensors.contains_key("output.weight") {
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
        let inv_freq = (0..cfg.rope_dims / 2)
            .map(|i| (cfg.rope_base as f64).powf(-((2 * i) as f64) / cfg.rope_dims as f64))
            .collect();
        let id = NEXT_SHARD_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut shard = Shard { cfg, range, embed, layers, head, inv_freq, pool, memory: 0, id };
        shard.memory = shard.compute_memory();
        Ok(shard)
    }

    fn compute_memory(&self) -> usize {
        let mut m = 0;
        if let Some(e) = &self.embed {
            m += e.memory_bytes();
        }
        for l in &self.layers {
            m += 4 * (l.attn_norm.len() + l.ffn_norm.len());
            m += l.qkv.iter().chain(&l.gate_up).map(Weights::memory_bytes).sum::<usize>();
            m += l.wo.memory_bytes() + l.down.memory_bytes();
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
        for (li, layer) in self.layers.iter().enumerate() {
            let _span = debug_span!("layer", layer = self.range.start + li, tokens).entered();
            self.layer_forward(li, layer, cache, &rope, &mut x)?;
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

    fn layer_forward(&self, li: usize, l: &Layer, cache: &mut SessionCache, rope: &[(f32, f32)], x: &mut [f32]) -> Result<()> {
        let cfg = &self.cfg;
        let (d, kvd, ffn) = (cfg.hidden, cfg.kv_dim(), cfg.ffn);
        let tokens = x.len() / d;
        let s = &mut cache.scratch;
        let pool = &*self.pool;

        // Attention.
        s.xn.resize(x.len(), 0.0);
        for t in 0..tokens {
            ops::rms_norm(&x[t * d..(t + 1) * d], &l.attn_norm, cfg.eps, &mut s.xn[t * d..(t + 1) * d]);
        }
        let qkv_w = d + 2 * kvd;
        matmul_stacked(pool, &l.qkv, &s.xn, &mut s.acts, &mut s.tmp, &mut s.qkv, qkv_w)?;
        let half = cfg.rope_dims / 2;
        for t in 0..tokens {
            let row = &mut s.qkv[t * qkv_w..(t + 1) * qkv_w];
            let rt = &rope[t * half..(t + 1) * half];
            for h in 0..cfg.heads + cfg.kv_heads {
                ops::rope(&mut row[h * cfg.head_dim..h * cfg.head_dim + cfg.rope_dims], rt);
            }
            cache.k[li].extend_from_slice(&row[d..d + kvd]);
            cache.v[li].extend_from_slice(&row[d + kvd..]);
        }
        s.att.resize(tokens * d, 0.0);
        ops::attention(pool, cfg, &s.qkv, qkv_w, &cache.k[li], &cache.v[li], cache.pos, &mut s.att);
        s.out.resize(tokens * d, 0.0);
        l.wo.matmul(pool, &s.att, &mut s.acts, &mut s.out)?;
        for (xv, o) in x.iter_mut().zip(&s.out) {
            *xv += o;
        }

        // Feed-forward.
        for t in 0..tokens {
            ops::rms_norm(&x[t * d..(t + 1) * d], &l.ffn_norm, cfg.eps, &mut s.xn[t * d..(t + 1) * d]);
        }
        matmul_stacked(pool, &l.gate_up, &s.xn, &mut s.acts, &mut s.tmp, &mut s.gu, 2 * ffn)?;
        s.h.resize(tokens * ffn, 0.0);
        for t in 0..tokens {
            let gu = &s.gu[t * 2 * ffn..(t + 1) * 2 * ffn];
            let (g, u) = gu.split_at(ffn);
            for ((h, &g), &u) in s.h[t * ffn..(t + 1) * ffn].iter_mut().zip(g).zip(u) {
                *h = ops::silu(g) * u;
            }
        }
        l.down.matmul(pool, &s.h, &mut s.acts, &mut s.out)?;
        for (xv, o) in x.iter_mut().zip(&s.out) {
            *xv += o;
        }
        Ok(())
    }
}

/// Multiplies `x` by matrices stacked by rows, writing `[tokens, width]` to `out`.
fn matmul_stacked(
    pool: &ThreadPool,
    parts: &[Weights],
    x: &[f32],
    acts: &mut ActBuf,
    tmp: &mut Vec<f32>,
    out: &mut Vec<f32>,
    width: usize,
) -> Result<()> {
    let tokens = x.len() / parts[0].cols();
    out.resize(tokens * width, 0.0);
    if let [one] = parts {
        return one.matmul(pool, x, acts, out);
    }
    let mut col = 0;
    for p in parts {
        let rows = p.rows();
        tmp.resize(tokens * rows, 0.0);
        p.matmul(pool, x, acts, tmp)?;
        for t in 0..tokens {
            out[t * width + col..t * width + col + rows].copy_from_slice(&tmp[t * rows..(t + 1) * rows]);
        }
        col += rows;
    }
    Ok(())
}
