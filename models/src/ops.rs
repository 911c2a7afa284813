//! The element-wise and attention operations of the blocks.

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

/// Rotates the pairs `(x[i], x[i + half])` (GGUF Gemma weights, and
/// llama.cpp's "NeoX" RoPE).
#[inline]
pub(crate) fn rope_neox(x: &mut [f32], table: &[(f32, f32)]) {
    let half = x.len() / 2;
    let (lo, hi) = x.split_at_mut(half);
    for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(table) {
        let (x0, x1) = (*a, *b);
        *a = x0 * c - x1 * s;
        *b = x0 * s + x1 * c;
    }
}

/// GELU, tanh approximation, as llama.cpp's CPU backend computes it: the
/// input rounded to f16, the result read from a table of f16 values
/// (`GGML_GELU_FP16`); 0 below -10 and the identity above 10.
#[inline]
pub(crate) fn gelu(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let table = GELU_F16.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                let y = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh());
                half::f16::from_f32(y).to_f32()
            })
            .collect()
    });
    table[usize::from(half::f16::from_f32(x).to_bits())]
}

/// GELU of every f16 value, rounded to f16 and kept as f32 (256 KiB, made
/// on first use).
static GELU_F16: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();

#[inline(always)]
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

/// One session's part of a batched [`attention`]: its cache (including the
/// new tokens, the first of them at `pos0`) and how many new rows it has.
pub(crate) struct AttnSeg<'a> {
    pub(crate) k: &'a [f32],
    pub(crate) v: &'a [f32],
    pub(crate) pos0: usize,
    pub(crate) rows: usize,
}

/// Causal grouped-query attention of new queries over their sessions' caches.
///
/// `qkv` holds `[rows, qkv_w]` rows whose first `q_dim` values are the
/// queries, the rows of `segs` one after another; each segment's queries see
/// only its own cache. With a `window`, a query sees only the last `window`
/// positions (itself included). Writes `[rows, q_dim]` to `out`. Every
/// `(row, head)` is reduced alone in a fixed order, so a row's result does
/// not depend on what else shares the batch.
pub(crate) fn attention(
    pool: &ThreadPool,
    cfg: &LlamaConfig,
    qkv: &[f32],
    qkv_w: usize,
    segs: &[AttnSeg<'_>],
    window: Option<usize>,
    out: &mut [f32],
) {
    let (heads, qd) = (cfg.heads, cfg.q_dim);
    let tokens = out.len() / qd;
    // Each row's segment and its index there.
    let owner: Vec<(usize, usize)> = segs.iter().enumerate().flat_map(|(i, s)| (0..s.rows).map(move |t| (i, t))).collect();
    debug_assert_eq!(owner.len(), tokens);
    let longest = segs.iter().map(|s| s.pos0 + s.rows).max().unwrap_or(0);
    let job = Job { cfg, qkv, qkv_w, segs, owner: &owner, window, longest };
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    // Causal rows grow in cost with their position: thread i takes every
    // n-th (row, head) pair, so each gets its share of early and late rows.
    let n = pool.threads();
    pool.run(&|i| {
        // SAFETY: each task writes the disjoint head slices of its own (t, h)
        // pairs, and `out` outlives `run`.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            unsafe { job.run_avx2(i, tokens * heads, n, out) };
            return;
        }
        job.run(i, tokens * heads, n, out);
    });
}

/// One batched attention's inputs, shared by the pool's tasks.
struct Job<'a> {
    cfg: &'a LlamaConfig,
    qkv: &'a [f32],
    qkv_w: usize,
    segs: &'a [AttnSeg<'a>],
    owner: &'a [(usize, usize)],
    window: Option<usize>,
    longest: usize,
}

impl Job<'_> {
    /// [`Job::run`] compiled for AVX2: the same operations in the same
    /// order (no fused multiply-adds), wider registers, the same bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, a: usize, b: usize, step: usize, out: &mut [f32]) {
        self.run(a, b, step, out);
    }

    /// Every `step`-th `(row, head)` pair of `a..b`.
    #[inline(always)]
    fn run(&self, a: usize, b: usize, step: usize, out: &mut [f32]) {
        let cfg = self.cfg;
        let (hd, heads, kvd, qd) = (cfg.head_dim, cfg.heads, cfg.kv_dim(), cfg.q_dim);
        let group = heads / cfg.kv_heads;
        let scale = cfg.attn_scale;
        let mut scores = Vec::with_capacity(self.longest);
        for i in (a..b).step_by(step) {
            let (row, h) = (i / heads, i % heads);
            let (si, t) = self.owner[row];
            let AttnSeg { k, v, pos0, .. } = self.segs[si];
            let n = pos0 + t + 1;
            let first = self.window.map_or(0, |w| n.saturating_sub(w));
            let q = &self.qkv[row * self.qkv_w + h * hd..row * self.qkv_w + (h + 1) * hd];
            let off = (h / group) * hd;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in first..n {
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
            let o = &mut out[row * qd + h * hd..row * qd + (h + 1) * hd];
            o.fill(0.0);
            for (j, &p) in (first..n).zip(scores.iter()) {
                let w = p * inv;
                for (ov, &vv) in o.iter_mut().zip(&v[j * kvd + off..j * kvd + off + hd]) {
                    *ov += w * vv;
                }
            }
        }
    }
}
