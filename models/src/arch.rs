//! The blocks of each architecture, one file each (`llama.rs`,
//! `gemma3.rs`, `qwen2.rs`, `qwen3.rs`, `phi3.rs`; the last three load
//! their tensors into the Llama block), the [`Block`] that dispatches to
//! them, and what they
//! share: reading a layer's tensors ([`Loader`]), the per-session scratch
//! buffers, and matrices stacked by rows.

use std::io::{Read, Seek};

use crate::error::{ModelError, Result};
use crate::gguf::{Gguf, TensorInfo};
use crate::pool::ThreadPool;
use crate::ops::AttnSeg;
use crate::quant::{ActBuf, Weights};

pub(crate) mod gemma3;
pub(crate) mod llama;
pub(crate) mod phi3;
pub(crate) mod qwen2;
pub(crate) mod qwen3;

use crate::config::{Family, LlamaConfig};

/// One session's part of a block's pass: its cache of this layer (`k`,
/// `v`, appended to), its first new position, how many new rows it brings
/// and its RoPE table for this layer.
pub(crate) struct Seg<'a> {
    pub(crate) k: &'a mut Vec<f32>,
    pub(crate) v: &'a mut Vec<f32>,
    pub(crate) pos: usize,
    pub(crate) rows: usize,
    pub(crate) rope: &'a [(f32, f32)],
}

/// What one block's forward pass works with besides its weights: the
/// sessions whose rows it carries (one after another in `x`), scratch
/// buffers and the layer's attention window. The weights are read once for
/// all of them; attention is per session.
pub(crate) struct Pass<'a, 'b> {
    pub(crate) cfg: &'a LlamaConfig,
    pub(crate) pool: &'a ThreadPool,
    pub(crate) segs: &'b mut [Seg<'a>],
    pub(crate) s: &'b mut Scratch,
    pub(crate) window: Option<usize>,
}

/// Gives `f` every new row of `qkv` (width `qkv_w`) with the RoPE row of its
/// position in its session, then appends the row's keys (`kvd` values at
/// `k_off`) and values (the `kvd` after them) to its session's cache.
pub(crate) fn rotate_and_store(
    segs: &mut [Seg<'_>],
    qkv: &mut [f32],
    qkv_w: usize,
    k_off: usize,
    kvd: usize,
    half: usize,
    mut f: impl FnMut(&mut [f32], &[(f32, f32)]),
) {
    let mut rows = qkv.chunks_exact_mut(qkv_w);
    for sg in segs.iter_mut() {
        for (t, row) in (&mut rows).take(sg.rows).enumerate() {
            f(row, &sg.rope[t * half..(t + 1) * half]);
            sg.k.extend_from_slice(&row[k_off..k_off + kvd]);
            sg.v.extend_from_slice(&row[k_off + kvd..k_off + 2 * kvd]);
        }
    }
}

/// Attention of every session's new rows over its own cache.
pub(crate) fn attend(
    pool: &ThreadPool,
    cfg: &LlamaConfig,
    segs: &[Seg<'_>],
    window: Option<usize>,
    qkv: &[f32],
    qkv_w: usize,
    out: &mut [f32],
) {
    let segs: Vec<AttnSeg<'_>> = segs.iter().map(|s| AttnSeg { k: s.k, v: s.v, pos0: s.pos, rows: s.rows }).collect();
    crate::ops::attention(pool, cfg, qkv, qkv_w, &segs, window, out);
}

/// One transformer block of whichever architecture the file declares.
#[derive(Debug)]
pub(crate) enum Block {
    /// Llama, Mistral, Granite, Qwen 2, Qwen 3, Phi-3.
    Llama(llama::Layer),
    /// Gemma 3.
    Gemma3(gemma3::Layer),
}

impl Block {
    /// Reads block `i`'s tensors.
    pub(crate) fn load<R: Read + Seek>(ld: &mut Loader<'_, R>, cfg: &LlamaConfig, i: usize) -> Result<Block> {
        Ok(match cfg.family {
            Family::Llama => Block::Llama(llama::Layer::load(ld, cfg, i)?),
            Family::Gemma3 => Block::Gemma3(gemma3::Layer::load(ld, cfg, i)?),
            Family::Qwen2 => Block::Llama(qwen2::load(ld, cfg, i)?),
            Family::Qwen3 => Block::Llama(qwen3::load(ld, cfg, i)?),
            Family::Phi3 => Block::Llama(phi3::load(ld, cfg, i)?),
        })
    }

    /// Bytes of weights it holds.
    pub(crate) fn memory_bytes(&self) -> usize {
        match self {
            Block::Llama(l) => l.memory_bytes(),
            Block::Gemma3(l) => l.memory_bytes(),
        }
    }

    /// Runs the block over `x` (`tokens` rows of the hidden width).
    pub(crate) fn forward(&self, p: Pass<'_, '_>, x: &mut [f32]) -> Result<()> {
        match self {
            Block::Llama(l) => l.forward(p, x),
            Block::Gemma3(l) => l.forward(p, x),
        }
    }
}

/// Reads tensors of one file, keeping count of the bytes read.
pub(crate) struct Loader<'a, R> {
    g: &'a Gguf,
    file: R,
}

impl<'a, R: Read + Seek> Loader<'a, R> {
    /// Reads tensors of `g` from `file`.
    pub(crate) fn new(g: &'a Gguf, file: R) -> Self {
        Loader { g, file }
    }

    /// Whether the file holds tensor `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.g.tensors.contains_key(name)
    }

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
    pub(crate) fn matrix(&mut self, name: &str, cols: usize, rows: usize) -> Result<Weights> {
        let t = self.info(name, &[cols, rows])?.clone();
        let data = self.g.read_tensor(&mut self.file, &t)?;
        Weights::from_gguf(name, t.dtype, rows, cols, &data)
    }

    /// A vector of `n` values as f32.
    pub(crate) fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
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
pub(crate) fn stack(parts: Vec<Weights>) -> Vec<Weights> {
    match Weights::concat(&parts) {
        Some(w) => vec![w],
        None => parts,
    }
}

#[derive(Debug, Default)]
/// Reusable buffers of one session's forward passes.
pub(crate) struct Scratch {
    pub(crate) xn: Vec<f32>,
    pub(crate) qkv: Vec<f32>,
    pub(crate) att: Vec<f32>,
    pub(crate) out: Vec<f32>,
    pub(crate) gu: Vec<f32>,
    pub(crate) h: Vec<f32>,
    pub(crate) tmp: Vec<f32>,
    pub(crate) acts: ActBuf,
}

/// RMSNorm of every row (width `d`) of `src` into `out`.
pub(crate) fn norm_rows(src: &[f32], w: &[f32], eps: f32, d: usize, out: &mut Vec<f32>) {
    out.resize(src.len(), 0.0);
    for (i, o) in src.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        crate::ops::rms_norm(i, w, eps, o);
    }
}

/// The residual: `x += y`.
pub(crate) fn add(x: &mut [f32], y: &[f32]) {
    for (xv, o) in x.iter_mut().zip(y) {
        *xv += o;
    }
}

/// A gated feed-forward's middle: from rows `[gate | up]` of `2 * ffn`,
/// `act(gate) * up` into `h`.
/// The rows are split over the pool's threads (each row alone: the same bits).
pub(crate) fn gated(pool: &ThreadPool, gu: &[f32], ffn: usize, act: fn(f32) -> f32, h: &mut Vec<f32>) {
    h.resize(gu.len() / 2, 0.0);
    let rows = h.len() / ffn;
    let out = crate::quant::SendPtr(h.as_mut_ptr());
    pool.run_split(rows, 1, &|r0, r1| {
        // SAFETY: rows [r0, r1) of `h` belong to this thread alone; `h`
        // outlives `run_split`.
        let h = unsafe { std::slice::from_raw_parts_mut(out.get().add(r0 * ffn), (r1 - r0) * ffn) };
        for (row, out) in gu[r0 * 2 * ffn..r1 * 2 * ffn].chunks_exact(2 * ffn).zip(h.chunks_exact_mut(ffn)) {
            let (g, u) = row.split_at(ffn);
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = act(g) * u;
            }
        }
    });
}

/// Bytes held by a block's norm vectors and matrices.
pub(crate) fn held_bytes(norms: &[&[f32]], matrices: &[&[Weights]]) -> usize {
    4 * norms.iter().map(|v| v.len()).sum::<usize>() + matrices.iter().flat_map(|m| m.iter()).map(Weights::memory_bytes).sum::<usize>()
}

/// Multiplies `x` by matrices stacked by rows, writing `[tokens, width]` to `out`.
pub(crate) fn matmul_stacked(
    pool: &ThreadPool,
    parts: &[Weights],
    x: &[f32],
    acts: &mut ActBuf,
    out: &mut Vec<f32>,
    width: usize,
) -> Result<()> {
    let tokens = x.len() / parts[0].cols();
    out.resize(tokens * width, 0.0);
    Weights::matmul_parts(parts, pool, x, acts, out)
}
