//! Matrices of any GGUF type, multiplied through candle's `GgmlType` kernels.

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
    BlockQ8K, GgmlType,
};
use half::{bf16, f16};

use crate::error::{ModelError, Result};

/// Runs `$body` with `$t` bound to the candle block type of `$dtype`.
macro_rules! with_block_type {
    ($dtype:expr, $t:ident => $body:expr, $other:expr) => {
        match $dtype {
            GgmlDType::F32 => { type $t = f32; $body }
            GgmlDType::F16 => { type $t = f16; $body }
            GgmlDType::BF16 => { type $t = bf16; $body }
            GgmlDType::Q4_0 => { type $t = BlockQ4_0; $body }
            GgmlDType::Q4_1 => { type $t = BlockQ4_1; $body }
            GgmlDType::Q5_0 => { type $t = BlockQ5_0; $body }
            GgmlDType::Q5_1 => { type $t = BlockQ5_1; $body }
            GgmlDType::Q8_0 => { type $t = BlockQ8_0; $body }
            GgmlDType::Q2K => { type $t = BlockQ2K; $body }
            GgmlDType::Q3K => { type $t = BlockQ3K; $body }
            GgmlDType::Q4K => { type $t = BlockQ4K; $body }
            GgmlDType::Q5K => { type $t = BlockQ5K; $body }
            GgmlDType::Q6K => { type $t = BlockQ6K; $body }
            GgmlDType::Q8K => { type $t = BlockQ8K; $body }
            _ => $other,
        }
    };
}

/// Bytes stored 8-byte aligned, so they can be viewed as candle block slices.
#[derive(Debug, Clone, Default)]
pub(crate) struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn from_bytes(b: &[u8]) -> Self {
        let mut words = vec![0u64; b.len().div_ceil(8)];
        // SAFETY: `words` has at least `b.len()` bytes; u64 has no invalid bit patterns.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), words.as_mut_ptr() as *mut u8, b.len()) };
        AlignedBytes { words, len: b.len() }
    }

    fn zeroed(len: usize) -> Self {
        AlignedBytes { words: vec![0; len.div_ceil(8)], len }
    }

    /// Views the bytes as blocks of `T`.
    ///
    /// # Safety
    /// `T` must be a plain-data block type (any bit pattern valid) with
    /// alignment at most 8.
    unsafe fn view<T>(&self) -> &[T] {
        let n = self.len / std::mem::size_of::<T>();
        // SAFETY: alignment 8 >= align_of::<T>() (checked by the caller's
        // contract), n * size_of::<T>() <= len, all bit patterns are valid.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const T, n) }
    }

    /// # Safety
    /// As [`AlignedBytes::view`].
    unsafe fn view_mut<T>(&mut self) -> &mut [T] {
        let n = self.len / std::mem::size_of::<T>();
        // SAFETY: as in `view`, and we hold the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut T, n) }
    }
}

/// A matrix kept in its GGUF encoding.
#[derive(Debug, Clone)]
pub(crate) struct GenericMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    dtype: GgmlDType,
    data: AlignedBytes,
}

/// Activations quantized to the vec-dot type of some [`GenericMatrix`].
#[derive(Debug, Default)]
pub(crate) struct GenericActs {
    bytes: AlignedBytes,
}

fn unsupported(dtype: GgmlDType) -> ModelError {
    ModelError::Unsupported(format!("tensor type {dtype:?} has no matrix product"))
}

impl GenericMatrix {
    pub(crate) fn new(name: &str, dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let ok = with_block_type!(dtype, T => {
            std::mem::align_of::<T>() <= 8 && std::mem::size_of::<T>() == dtype.type_size()
        }, false);
        if !ok {
            return Err(ModelError::Tensor { name: name.into(), problem: format!("type {dtype:?} is not supported") });
        }
        Ok(GenericMatrix { rows, cols, dtype, data: AlignedBytes::from_bytes(data) })
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.data.len
    }

    pub(crate) fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.cols;
        with_block_type!(self.dtype, T => {
            let per_row = cols / T::BLCK_SIZE;
            // SAFETY: T was checked in `new` (size and alignment).
            let blocks = unsafe { self.data.view::<T>() };
            T::to_float(&blocks[r * per_row..(r + 1) * per_row], &mut out[..cols]);
            Ok(())
        }, Err(unsupported(self.dtype)))
    }

    /// Quantizes `x` (`tokens * cols`) to this matrix's vec-dot type.
    pub(crate) fn quantize_acts(&self, x: &[f32], acts: &mut GenericActs) -> Result<()> {
        with_block_type!(self.dtype, T => {
            type V = <T as GgmlType>::VecDotType;
            let n = x.len() / V::BLCK_SIZE;
            acts.bytes = AlignedBytes::zeroed(n * std::mem::size_of::<V>());
            // SAFETY: V is a candle block type of alignment <= 8.
            let ys = unsafe { acts.bytes.view_mut::<V>() };
            V::from_float(x, ys);
            Ok(())
        }, Err(unsupported(self.dtype)))
    }

    /// Rows `[r0, r1)` times every token, into `out[t * rows + r]`.
    pub(crate) fn dot_rows(&self, r0: usize, r1: usize, acts: &GenericActs, tokens: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.cols;
        with_block_type!(self.dtype, T => {
            type V = <T as GgmlType>::VecDotType;
            let per_row = cols / T::BLCK_SIZE;
            let per_tok = cols / V::BLCK_SIZE;
            // SAFETY: checked block types, as above.
            let w = unsafe { self.data.view::<T>() };
            // SAFETY: as above.
            let a = unsafe { acts.bytes.view::<V>() };
            for r in r0..r1 {
                let wr = &w[r * per_row..(r + 1) * per_row];
                for t in 0..tokens {
                    out[t * self.rows + r] = T::vec_dot(cols, wr, &a[t * per_tok..(t + 1) * per_tok]);
                }
            }
            Ok(())
        }, Err(unsupported(self.dtype)))
    }
}
