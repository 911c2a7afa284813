//! Weight matrices in the engine's own layout, and the matrix products on them.
//!
//! Most GGUF quantizations store, per block of 32 weights, small integers `q`
//! and an affine map `w = scale * q + min` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the
//! 32-weight sub-blocks of Q4_K and Q5_K); Q6_K stores 6-bit integers with a
//! scale per 16 weights. At load, such a tensor is repacked losslessly into
//! [`AffineMatrix`]: per row, the integers of each pair of blocks laid out for
//! 512-bit integer dot products, and the scales in the file's own form
//! ([`Scales`]: f16 per block, derived minimums, K-quant super-blocks), so a
//! matrix takes no more bytes than in the file. Activations are quantized per
//! block of 32 to `i8` in the same layout ([`QActs`], as llama.cpp does with
//! Q8_0/Q8_1), so a row times an activation is one integer dot product per
//! block plus one `f32` dot product of the minimums with the activation block
//! sums (Q6_K subtracts its offset inside the integer product instead).
//! Kernels are chosen at run time (AVX-512 VNNI, AVX2, portable), so one
//! binary is fast on every x86-64 host.
//!
//! F32, F16 and BF16 weights are held as in the file and multiplied with
//! unrounded `f32` activations ([`float`]). Any other type (Q2_K, Q3_K, Q8_K)
//! keeps its GGUF bytes and uses candle's `GgmlType::vec_dot` ([`GenericMatrix`]).
//!
//! Every row is reduced by one thread in a fixed order, so results do not depend
//! on how many threads run or how rows are split between them.

mod float;
mod generic;
mod portable;
mod repack;
mod scales;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::quantized::GgmlDType;
use half::f16;

use float::FloatMatrix;
pub(crate) use generic::GenericMatrix;
pub(crate) use scales::{RowScales, Scales};

use crate::error::{ModelError, Result};
use crate::pool::ThreadPool;

/// Weights per quantization block.
pub(crate) const BLOCK: usize = 32;
/// Bytes of activation integers per pair of blocks.
const PAIR: usize = 2 * BLOCK;

/// How the integers of an [`AffineMatrix`] are stored, per pair of blocks
/// (64 integers at the positions [`pair_pos`] gives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntKind {
    /// Unsigned 4-bit values: position `p < 32` in the low nibble of byte `p`,
    /// `p >= 32` in the high nibble of byte `p - 32` (32 bytes).
    U4,
    /// Unsigned 5-bit values: the low four bits as [`IntKind::U4`], then a
    /// 64-bit word whose bit `p` is bit 4 of position `p` (40 bytes).
    U5,
    /// Unsigned 6-bit values (Q6_K, `q - 32` the weight's integer): the low
    /// four bits as [`IntKind::U4`], then 16 bytes whose byte `p % 16` holds
    /// bits 4-5 of position `p` at bits `2 * (p / 16)` (48 bytes).
    U6,
    /// Signed 8-bit values, no minimum (64 bytes).
    I8,
}

impl IntKind {
    pub(crate) fn pair_bytes(self) -> usize {
        match self {
            IntKind::U4 => 32,
            IntKind::U5 => 40,
            IntKind::U6 => 48,
            IntKind::I8 => 64,
        }
    }
}

/// A weight matrix `[rows, cols]` in the repacked affine layout.
#[derive(Debug, Clone)]
pub(crate) struct AffineMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Blocks per row, padded to even (pairs).
    pub(crate) nb: usize,
    pub(crate) kind: IntKind,
    /// Integers, `rows * nb/2 * kind.pair_bytes()` bytes, see [`pair_pos`].
    pub(crate) q: Vec<u8>,
    /// Per block scale and minimum (`w = scale*q + min`); for
    /// [`IntKind::I8`] the minimum is `-128 * scale`, the correction for
    /// kernels that offset `q` by 128; [`IntKind::U6`] has per-16 scales.
    pub(crate) scales: Scales,
}

/// Position, inside a pair of blocks, of element `e` of block `b` (0 or 1).
///
/// Groups of four consecutive elements alternate between the two blocks, so
/// that after a 4-byte integer dot product, even `i32` lanes belong to the first
/// block and odd lanes to the second.
#[inline]
pub(crate) const fn pair_pos(b: usize, e: usize) -> usize {
    ((e / 4) * 2 + b) * 4 + e % 4
}

/// A weight matrix in whichever layout its type allows.
#[derive(Debug, Clone)]
pub(crate) enum Weights {
    Affine(AffineMatrix),
    Float(FloatMatrix),
    Generic(GenericMatrix),
}

impl Weights {
    /// Builds a matrix of `rows` rows of `cols` weights from GGUF bytes.
    pub(crate) fn from_gguf(name: &str, dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let bs = dtype.block_size();
        let expect = rows * cols / bs * dtype.type_size();
        if !cols.is_multiple_of(bs) || data.len() != expect {
            return Err(ModelError::Tensor {
                name: name.into(),
                problem: format!(
                    "{dtype:?} data of {} bytes does not hold {rows}x{cols} weights",
                    data.len()
                ),
            });
        }
        if let Some(m) = repack::affine(dtype, rows, cols, data) {
            return Ok(Weights::Affine(m));
        }
        if let Some(m) = FloatMatrix::new(dtype, rows, cols, data) {
            return Ok(Weights::Float(m));
        }
        Ok(Weights::Generic(GenericMatrix::new(name, dtype, rows, cols, data)?))
    }

    pub(crate) fn rows(&self) -> usize {
        match self {
            Weights::Affine(m) => m.rows,
            Weights::Float(m) => m.rows,
            Weights::Generic(m) => m.rows,
        }
    }

    pub(crate) fn cols(&self) -> usize {
        match self {
            Weights::Affine(m) => m.cols,
            Weights::Float(m) => m.cols,
            Weights::Generic(m) => m.cols,
        }
    }

    /// Bytes held in memory.
    pub(crate) fn memory_bytes(&self) -> usize {
        match self {
            Weights::Affine(m) => m.q.len() + m.scales.bytes(),
            Weights::Float(m) => m.memory_bytes(),
            Weights::Generic(m) => m.memory_bytes(),
        }
    }

    /// Writes row `r` as `f32` into `out` (`cols` values); used for embeddings.
    pub(crate) fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Weights::Affine(m) => {
                m.row_f32(r, out);
                Ok(())
            }
            Weights::Float(m) => {
                m.row_f32(r, out);
                Ok(())
            }
            Weights::Generic(m) => m.row_f32(r, out),
        }
    }

    /// Stacks matrices with the same columns and layout into one (e.g. Q, K and
    /// V), so one parallel product serves them all. `None` when they differ.
    pub(crate) fn concat(parts: &[Weights]) -> Option<Weights> {
        match parts.first()? {
            Weights::Affine(first) => {
                let bytes = parts.iter().map(|p| if let Weights::Affine(m) = p { m.q.len() } else { 0 }).sum();
                let (cols, nb, kind) = (first.cols, first.nb, first.kind);
                let mut out = AffineMatrix { rows: 0, cols, nb, kind, q: weight_vec(bytes), scales: first.scales.empty_like() };
                for p in parts {
                    match p {
                        Weights::Affine(m) if m.cols == first.cols && m.kind == first.kind => {
                            if !out.scales.extend(&m.scales) {
                                return None;
                            }
                            out.rows += m.rows;
                            out.q.extend_from_slice(&m.q);
                        }
                        _ => return None,
                    }
                }
                Some(Weights::Affine(out))
            }
            Weights::Float(_) => {
                let floats: Option<Vec<&FloatMatrix>> =
                    parts.iter().map(|p| if let Weights::Float(m) = p { Some(m) } else { None }).collect();
                FloatMatrix::concat(&floats?).map(Weights::Float)
            }
            Weights::Generic(_) => None,
        }
    }

    /// `out[t * rows + r] = row r · x[t]` for every token `t` of `x`, the rows split
    /// over the pool's threads. `x` holds `tokens * cols` values.
    pub(crate) fn matmul(&self, pool: &ThreadPool, x: &[f32], acts: &mut ActBuf, out: &mut [f32]) -> Result<()> {
        Weights::matmul_parts(std::slice::from_ref(self), pool, x, acts, out)
    }

    /// `x` times the matrices `parts` stacked by rows (all of the same
    /// columns): `out[t * width + r]`, `width` their rows together. The
    /// activations are quantized once for every repacked part, and one
    /// fork-join runs all the rows.
    pub(crate) fn matmul_parts(parts: &[Weights], pool: &ThreadPool, x: &[f32], acts: &mut ActBuf, out: &mut [f32]) -> Result<()> {
        let Some(first) = parts.first() else { return Ok(()) };
        let cols = first.cols();
        let tokens = x.len() / cols;
        let width: usize = parts.iter().map(Weights::rows).sum();
        if x.len() != tokens * cols || out.len() != tokens * width || parts.iter().any(|p| p.cols() != cols) {
            return Err(ModelError::Input(format!(
                "matmul shape mismatch: {} inputs for {cols} columns, {} outputs for {width} rows",
                x.len(),
                out.len()
            )));
        }
        if parts.iter().any(|p| matches!(p, Weights::Generic(_))) {
            return Weights::matmul_generic(parts, pool, x, acts, out, width);
        }
        if let Some(nb) = parts.iter().find_map(|p| if let Weights::Affine(m) = p { Some(m.nb) } else { None }) {
            acts.q.quantize_on(pool, x, cols, nb);
        }
        let q = &acts.q;
        let out_ptr = SendPtr(out.as_mut_ptr());
        let len = out.len();
        pool.run_split(width, 4, &|r0, r1| {
            let mut base = 0;
            for p in parts {
                let rows = p.rows();
                let (a, b) = (r0.max(base), r1.min(base + rows));
                if a < b {
                    // SAFETY: each thread writes rows [r0, r1) of the stack
                    // for every token (disjoint between threads), inside
                    // `out`, which outlives `run_split`.
                    let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(base), len - base) };
                    match p {
                        Weights::Affine(m) => m.dot_rows(a - base, b - base, q, out, width),
                        Weights::Float(m) => m.dot_rows(a - base, b - base, x, out, width),
                        Weights::Generic(_) => unreachable!("generic parts take matmul_generic"),
                    }
                }
                base += rows;
            }
        });
        Ok(())
    }

    /// [`Weights::matmul_parts`] with some part of a type only candle
    /// multiplies: one part at a time.
    fn matmul_generic(parts: &[Weights], pool: &ThreadPool, x: &[f32], acts: &mut ActBuf, out: &mut [f32], width: usize) -> Result<()> {
        let tokens = out.len() / width;
        let mut tmp = std::mem::take(&mut acts.tmp);
        let mut col = 0;
        for p in parts {
            let rows = p.rows();
            tmp.resize(tokens * rows, 0.0);
            match p {
                Weights::Generic(m) => {
                    m.quantize_acts(x, &mut acts.generic)?;
                    let out_ptr = SendPtr(tmp.as_mut_ptr());
                    let failed = std::sync::atomic::AtomicBool::new(false);
                    let g = &acts.generic;
                    pool.run_split(rows, 1, &|r0, r1| {
                        // SAFETY: disjoint rows per thread, inside `tmp`.
                        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), tokens * rows) };
                        if m.dot_rows(r0, r1, g, tokens, out).is_err() {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    });
                    if failed.into_inner() {
                        return Err(ModelError::Input("candle vec_dot failed".into()));
                    }
                }
                other => Weights::matmul_parts(std::slice::from_ref(other), pool, x, acts, &mut tmp)?,
            }
            for t in 0..tokens {
                out[t * width + col..t * width + col + rows].copy_from_slice(&tmp[t * rows..(t + 1) * rows]);
            }
            col += rows;
        }
        acts.tmp = tmp;
        Ok(())
    }
}

/// An empty vector with room for `n` values whose pages the kernel is asked
/// to back with huge pages where it can (Linux `MADV_HUGEPAGE`): decode
/// streams every weight once per token, and 4 KiB pages would cost a TLB
/// miss every 4 KiB of it. Elsewhere, or when refused, an ordinary vector.
pub(crate) fn weight_vec<T: Copy>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let end = start + n * std::mem::size_of::<T>();
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside the vector's own allocation, which
            // nothing has touched yet; the advice changes no contents.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// A raw pointer that may cross to pool threads; users guarantee disjoint writes.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only used to hand disjoint sub-slices of one buffer to pool threads
// that all finish before the buffer's borrow ends.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    #[inline]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Reusable buffers for quantized activations.
#[derive(Debug, Default)]
pub(crate) struct ActBuf {
    q: QActs,
    generic: generic::GenericActs,
    /// One part's products when parts are multiplied one at a time.
    tmp: Vec<f32>,
}

/// Activations of several tokens quantized per block of 32 to `i8`.
#[derive(Debug, Default, Clone)]
pub(crate) struct QActs {
    /// Blocks per token (even).
    pub(crate) nb: usize,
    pub(crate) tokens: usize,
    /// `tokens * nb * 32` integers in the pair layout.
    pub(crate) q: Vec<i8>,
    /// Per block scale.
    pub(crate) d: Vec<f32>,
    /// Per block `d * sum(q)`.
    pub(crate) s: Vec<f32>,
}

impl QActs {
    /// Quantizes `x` (`tokens * cols` values) into `nb` blocks per token; blocks
    /// past `cols` are zero.
    pub(crate) fn quantize(&mut self, x: &[f32], cols: usize, nb: usize) {
        self.quantize_on(&ThreadPool::new(1), x, cols, nb);
    }

    /// [`QActs::quantize`], the tokens split over the pool's threads (each
    /// token is quantized alone, so the split changes nothing).
    pub(crate) fn quantize_on(&mut self, pool: &ThreadPool, x: &[f32], cols: usize, nb: usize) {
        let tokens = x.len() / cols;
        self.nb = nb;
        self.tokens = tokens;
        self.q.clear();
        self.q.resize(tokens * nb * BLOCK, 0);
        self.d.clear();
        self.d.resize(tokens * nb, 0.0);
        self.s.clear();
        self.s.resize(tokens * nb, 0.0);
        let (q, d, s) = (SendPtr(self.q.as_mut_ptr()), SendPtr(self.d.as_mut_ptr()), SendPtr(self.s.as_mut_ptr()));
        pool.run_split(tokens, 1, &|t0, t1| {
            // SAFETY: tokens [t0, t1) own disjoint ranges of the three
            // buffers (sized above), which outlive `run_split`.
            let (q, d, s) = unsafe {
                (
                    std::slice::from_raw_parts_mut(q.get().add(t0 * nb * BLOCK), (t1 - t0) * nb * BLOCK),
                    std::slice::from_raw_parts_mut(d.get().add(t0 * nb), (t1 - t0) * nb),
                    std::slice::from_raw_parts_mut(s.get().add(t0 * nb), (t1 - t0) * nb),
                )
            };
            for t in t0..t1 {
                let i = t - t0;
                quantize_token(&x[t * cols..(t + 1) * cols], &mut q[i * nb * BLOCK..(i + 1) * nb * BLOCK], &mut d[i * nb..(i + 1) * nb], &mut s[i * nb..(i + 1) * nb]);
            }
        });
    }
}

/// One token's activations `row` into its integers `q`, scales `d` and
/// scaled sums `s` (blocks past the row stay zero).
fn quantize_token(row: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::quantize_token(row, q, d, s) {
            return;
        }
    }
    quantize_token_portable(row, q, d, s);
}

/// [`quantize_token`] on any CPU, and the reference of the SIMD version.
pub(crate) fn quantize_token_portable(row: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for j in 0..row.len() / BLOCK {
        let xb = &row[j * BLOCK..(j + 1) * BLOCK];
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let dj = amax / 127.0;
        let id = if dj != 0.0 { 1.0 / dj } else { 0.0 };
        let base = (j & !1) * BLOCK;
        let mut sum = 0i32;
        for (e, &v) in xb.iter().enumerate() {
            // Half away from zero, like `round`, but vectorizable on SSE2.
            let qv = (v * id + 0.5f32.copysign(v)) as i32;
            sum += qv;
            q[base + pair_pos(j & 1, e)] = qv as i8;
        }
        // As in ggml: the scale is kept as f16.
        let dj = f16::from_f32(dj).to_f32();
        d[j] = dj;
        s[j] = dj * sum as f32;
    }
}

impl AffineMatrix {
    /// Rows `[r0, r1)` times every token of `a`, into `out[t * ld + r]`.
    pub(crate) fn dot_rows(&self, r0: usize, r1: usize, a: &QActs, out: &mut [f32], ld: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::dot_rows(self, r0, r1, a, out, ld) {
                return;
            }
        }
        self.dot_rows_portable(r0, r1, a, out, ld);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Level as KernelLevel, level as x86_level};

#[cfg(test)]
mod tests;
