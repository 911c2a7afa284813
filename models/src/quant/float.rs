//! Matrices of floating-point weights (F32, F16, BF16), held in the file's
//! own width and multiplied with the `f32` activations as they are (no
//! activation rounding). Each (row, token) sums its columns in one fixed
//! order, 16 (or 8) lanes then the lanes, whatever the tiling or threads.

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

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
        let data = match dtype {
            GgmlDType::F32 => {
                FloatData::F32(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            GgmlDType::F16 => FloatData::F16(words().map(f16::from_bits).collect()),
            GgmlDType::BF16 => FloatData::BF16(words().map(bf16::from_bits).collect()),
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

    /// Appends `other`'s rows; `false` when the types or widths differ.
    pub(crate) fn extend(&mut self, other: &FloatMatrix) -> bool {
        if other.cols != self.cols {
            return false;
        }
        match (&mut self.data, &other.data) {
            (FloatData::F32(a), FloatData::F32(b)) => a.extend_from_slice(b),
            (FloatData::F16(a), FloatData::F16(b)) => a.extend_from_slice(b),
            (FloatData::BF16(a), FloatData::BF16(b)) => a.extend_from_slice(b),
            _ => return false,
        }
        self.rows += other.rows;
        true
    }

    /// Rows `[r0, r1)` times every token of `x` (`tokens * cols`), into
    /// `out[t * rows + r]`.
    pub(crate) fn dot_rows(&self, r0: usize, r1: usize, x: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if super::x86::float_rows(self, r0, r1, x, out) {
                return;
            }
        }
        self.dot_rows_portable(r0, r1, x, out);
    }

    /// The portable kernel: eight lanes, then the lanes in order.
    pub(crate) fn dot_rows_portable(&self, r0: usize, r1: usize, x: &[f32], out: &mut [f32]) {
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
                out[t * self.rows + r] = s;
            }
        }
    }
}
