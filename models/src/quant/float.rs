//! Matrices of floating-point weights (F32, F16, BF16), held in the file's
//! own width and multiplied with the `f32` activations as they are (no
//! activation rounding). Each (row, token) sums its columns in one fixed
//! order, 16 (or 8) lanes then the lanes, whatever the tiling or threads.

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

use super::weight_vec;

/// The `n` values of `parts` one after another, `None` if `pick` refuses one.
fn stack<T: Copy>(parts: &[&FloatMatrix], n: usize, pick: impl Fn(&FloatData) -> Option<&Vec<T>>) -> Option<Vec<T>> {
    let mut out = weight_vec(n);
    for p in parts {
        out.extend_from_slice(pick(&p.data)?);
    }
    Some(out)
}

/// The weights of a [`FloatMatrix`], row after row.
#[derive(Debug, Clone)]
pub(crate) enum FloatData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A `[rows, cols]` matrix of floating-point weights.
#[derive(Debug, Clone)]
pub(crate) struct FloatMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: FloatData,
}

impl FloatMatrix {
    /// The matrix of `dtype`'s little-endian bytes, `None` for other types.
    pub(crate) fn new(dtype: GgmlDType, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        let words = || bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let n = rows * cols;
        let data = match dtype {
            GgmlDType::F32 => {
                let mut v = weight_vec(n);
                v.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                FloatData::F32(v)
            }
            GgmlDType::F16 => {
                let mut v = weight_vec(n);
                v.extend(words().map(f16::from_bits));
                FloatData::F16(v)
            }
            GgmlDType::BF16 => {
                let mut v = weight_vec(n);
                v.extend(words().map(bf16::from_bits));
                FloatData::BF16(v)
            }
            _ => return None,
        };
        Some(FloatMatrix { rows, cols, data })
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        match &self.data {
            FloatData::F32(v) => 4 * v.len(),
            FloatData::F16(v) => 2 * v.len(),
            FloatData::BF16(v) => 2 * v.len(),
        }
    }

    /// Weight `i` of the row-major data as `f32`.
    #[inline]
    fn at(&self, i: usize) -> f32 {
        match &self.data {
            FloatData::F32(v) => v[i],
            FloatData::F16(v) => v[i].to_f32(),
            FloatData::BF16(v) => v[i].to_f32(),
        }
    }

    pub(crate) fn row_f32(&self, r: usize, out: &mut [f32]) {
        for (c, o) in out[..self.cols].iter_mut().enumerate() {
            *o = self.at(r * self.cols + c);
        }
    }

    /// The rows of all `parts` stacked; `None` when their types or widths differ.
    pub(crate) fn concat(parts: &[&FloatMatrix]) -> Option<FloatMatrix> {
        let first = parts.first()?;
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let n = rows * first.cols;
        let data = match &first.data {
            FloatData::F32(_) => FloatData::F32(stack(parts, n, |d| if let FloatData::F32(v) = d { Some(v) } else { None })?),
            FloatData::F16(_) => FloatData::F16(stack(parts, n, |d| if let FloatData::F16(v) = d { Some(v) } else { None })?),
            FloatData::BF16(_) => {
                FloatData::BF16(stack(parts, n, |d| if let FloatData::BF16(v) = d { Some(v) } else { None })?)
            }
        };
        parts.iter().all(|p| p.cols == first.cols).then_some(FloatMatrix { rows, cols: first.cols, data })
    }

    /// Rows `[r0, r1)` times every token of `x` (`tokens * cols`), into
    /// `out[t * ld + r]`.
    pub(crate) fn dot_rows(&self, r0: usize, r1: usize, x: &[f32], out: &mut [f32], ld: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if super::x86::float_rows(self, r0, r1, x, out, ld) {
                return;
            }
        }
        self.dot_rows_portable(r0, r1, x, out, ld);
    }

    /// The portable kernel: eight lanes, then the lanes in order.
    pub(crate) fn dot_rows_portable(&self, r0: usize, r1: usize, x: &[f32], out: &mut [f32], ld: usize) {
        let cols = self.cols;
        let tokens = x.len() / cols;
        for r in r0..r1 {
            for t in 0..tokens {
                let xt = &x[t * cols..(t + 1) * cols];
                let mut lanes = [0f32; 8];
                let full = cols / 8 * 8;
                for c in (0..full).step_by(8) {
                    for (e, lane) in lanes.iter_mut().enumerate() {
                        *lane += self.at(r * cols + c + e) * xt[c + e];
                    }
                }
                let mut s: f32 = lanes.iter().sum();
                for c in full..cols {
                    s += self.at(r * cols + c) * xt[c];
                }
                out[t * ld + r] = s;
            }
        }
    }
}
