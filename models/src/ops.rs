//! The element-wise and attention operations of the Llama block.

use crate::config::LlamaConfig;
use crate::pool::ThreadPool;
use crate::quant::SendPtr;

/// `out = x / rms(x) * w`, the sum of squares accumulated in f64 as ggml does.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (ss / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * w;
    }
}

/// SiLU, `x * sigmoid(x)`.
#[inline]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `(cos, sin)` of every rotation angle for positions `pos .. pos + tokens`.
pub(crate) fn rope_table(inv_freq: &[f64], pos: usize, tokens: usize) -> Vec<(f32, f32)> {
    let mut out = Vec::with_capacity(tokens * inv_freq.len());
    for t in 0..tokens {
        let p = (pos + t) as f64;
        for &f in inv_freq {
            let (s, c) = (p * f).sin_cos();
            out.push((c as f32, s as f32));
        }
    }
    out
}

/// Rotates adjacent pairs of `x` (GGUF Llama weights are permuted for this).
#[inline]
pub(crate) fn rope(x: &mut [f32], table: &[(f32, f32)]) {
    for (pair, &(c, s)) in x.chunks_exact_mut(2).zip(table) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorize.
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// Causal grouped-query attention of `tokens` new queries over the cache.
///
/// `qkv` holds `[tokens, qkv_w]` rows whose first `hidden` values are the
/// queries; `k` and `v` hold the cache including the new tokens, whose first
/// new position is `pos0`. Writes `[tokens, hidden]` to `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    pool: &ThreadPool,
    cfg: &LlamaConfig,
    qkv: &[f32],
    qkv_w: usize,
    k: &[f32],
    v: &[f32],
    pos0: usize,
    out: &mut [f32],
) {
    let (hd, heads, kvd) = (cfg.head_dim, cfg.heads, cfg.kv_dim());
    let group = heads / cfg.kv_heads;
    let tokens = out.len() / cfg.hidden;
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    pool.run_split(tokens * heads, 1, &|a, b| {
        // SAFETY: each task writes the disjoint head slices of its own (t, h)
        // pairs, and `out` outlives `run_split`.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
        let mut scores = Vec::with_capacity(pos0 + tokens);
        for i in a..b {
            let (t, h) = (i / heads, i % heads);
            let n = pos0 + t + 1;
            let q = &qkv[t * qkv_w + h * hd..t * qkv_w + (h + 1) * hd];
            let off = (h / group) * hd;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..n {
                let sc = dot(q, &k[j * kvd + off..j * kvd + off + hd]) * scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f64;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc as f64;
            }
            let inv = (1.0 / sum) as f32;
            let o = &mut out[t * cfg.hidden + h * hd..t * cfg.hidden + (h + 1) * hd];
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let w = p * inv;
                for (ov, &vv) in o.iter_mut().zip(&v[j * kvd + off..j * kvd + off + hd]) {
                    *ov += w * vv;
                }
            }
        }
    });
}
