//! x86-64 kernels for [`FloatMatrix`] products (F32, F16, BF16 weights).

use std::arch::x86_64::*;

use half::f16;

use super::super::float::{FloatData, FloatMatrix};
use super::{Level, best_level, hsum256, level};

const E_F32: u8 = 0;
const E_F16: u8 = 1;
const E_BF16: u8 = 2;

/// Floating-point rows on the best available kernel; `false` when only the
/// portable one applies.
pub(in crate::quant) fn float_rows(m: &FloatMatrix, r0: usize, r1: usize, x: &[f32], out: &mut [f32], ld: usize) -> bool {
    float_rows_at(level(), m, r0, r1, x, out, ld)
}

/// Floating-point rows on the kernel of `lvl`.
pub(in crate::quant) fn float_rows_at(
    lvl: Level,
    m: &FloatMatrix,
    r0: usize,
    r1: usize,
    x: &[f32],
    out: &mut [f32],
    ld: usize,
) -> bool {
    let tokens = x.len() / m.cols;
    assert!(x.len() == tokens * m.cols && r1 <= m.rows);
    assert!(ld >= m.rows && (tokens == 0 || out.len() >= (tokens - 1) * ld + m.rows));
    assert!(m.memory_bytes() == m.rows * m.cols * if matches!(m.data, FloatData::F32(_)) { 4 } else { 2 });
    assert!(lvl <= best_level(), "kernel level {lvl:?} is not supported by this CPU");
    let (w, e) = match &m.data {
        FloatData::F32(v) => (v.as_ptr().cast::<u8>(), E_F32),
        FloatData::F16(v) => (v.as_ptr().cast::<u8>(), E_F16),
        FloatData::BF16(v) => (v.as_ptr().cast::<u8>(), E_BF16),
    };
    let f = FloatArgs { w, ld, cols: m.cols, x: x.as_ptr(), tokens };
    // SAFETY: the CPU supports the features (asserted above); `w` holds
    // rows * cols weights, `x` tokens * cols values and `out` tokens * rows.
    unsafe {
        match (lvl, e) {
            (Level::Vnni, E_F32) => float512_rows::<E_F32>(f, r0, r1, out),
            (Level::Vnni, E_F16) => float512_rows::<E_F16>(f, r0, r1, out),
            (Level::Vnni, _) => float512_rows::<E_BF16>(f, r0, r1, out),
            (Level::Avx2, E_F32) => float256_rows::<E_F32>(f, r0, r1, out),
            (Level::Avx2, E_F16) => float256_rows::<E_F16>(f, r0, r1, out),
            (Level::Avx2, _) => float256_rows::<E_BF16>(f, r0, r1, out),
            (Level::Portable, _) => return false,
        }
    }
    true
}

/// What the floating-point kernels read.
#[derive(Clone, Copy)]
struct FloatArgs {
    w: *const u8,
    /// Output stride between tokens.
    ld: usize,
    cols: usize,
    x: *const f32,
    tokens: usize,
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")]
unsafe fn float512_rows<const E: u8>(f: FloatArgs, r0: usize, r1: usize, out: &mut [f32]) {
    // Tiles of 4 rows by 4 tokens, as for the integer kernels.
    let mut r = r0;
    while r + 4 <= r1 {
        let mut t = 0;
        while t + 4 <= f.tokens {
            // SAFETY: rows r..r+4 and tokens t..t+4 exist.
            unsafe { float512_tile::<4, 4, E>(f, r, t, out) };
            t += 4;
        }
        while t < f.tokens {
            // SAFETY: as above.
            unsafe { float512_tile::<4, 1, E>(f, r, t, out) };
            t += 1;
        }
        r += 4;
    }
    while r < r1 {
        for t in 0..f.tokens {
            // SAFETY: as above.
            unsafe { float512_tile::<1, 1, E>(f, r, t, out) };
        }
        r += 1;
    }
}

/// Sixteen weights from element `i` as `f32` (lanes outside `k` zero).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn float16_512<const E: u8>(w: *const u8, i: usize, k: __mmask16) -> __m512 {
    // SAFETY: the caller guarantees the elements selected by k exist.
    unsafe {
        if E == E_F32 {
            _mm512_maskz_loadu_ps(k, (w as *const f32).add(i))
        } else {
            let h = _mm256_maskz_loadu_epi16(k, (w as *const i16).add(i));
            if E == E_F16 {
                _mm512_cvtph_ps(h)
            } else {
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")]
unsafe fn float512_tile<const R: usize, const T: usize, const E: u8>(f: FloatArgs, r: usize, t0: usize, out: &mut [f32]) {
    // SAFETY (whole body): every load stays inside rows r..r+R and tokens
    // t0..t0+T (the tail is masked).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut c = 0;
        while c < f.cols {
            let k: __mmask16 = if c + 16 <= f.cols { !0 } else { ((1u32 << (f.cols - c)) - 1) as __mmask16 };
            let mut xv = [_mm512_setzero_ps(); T];
            for (j, xv) in xv.iter_mut().enumerate() {
                *xv = _mm512_maskz_loadu_ps(k, f.x.add((t0 + j) * f.cols + c));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let wv = float16_512::<E>(f.w, (r + i) * f.cols + c, k);
                for j in 0..T {
                    acc[j] = _mm512_fmadd_ps(wv, xv[j], acc[j]);
                }
            }
            c += 16;
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate() {
                *out.get_unchecked_mut((t0 + j) * f.ld + r + i) = _mm512_reduce_add_ps(*acc);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float256_rows<const E: u8>(f: FloatArgs, r0: usize, r1: usize, out: &mut [f32]) {
    let mut r = r0;
    while r + 4 <= r1 {
        for t in 0..f.tokens {
            // SAFETY: rows r..r+4 and token t exist.
            unsafe { float256_tile::<4, E>(f, r, t, out) };
        }
        r += 4;
    }
    while r < r1 {
        for t in 0..f.tokens {
            // SAFETY: as above.
            unsafe { float256_tile::<1, E>(f, r, t, out) };
        }
        r += 1;
    }
}

/// Weight `i` as `f32`.
#[inline]
unsafe fn float_at<const E: u8>(w: *const u8, i: usize) -> f32 {
    // SAFETY: the caller guarantees element i exists.
    unsafe {
        match E {
            E_F32 => *(w as *const f32).add(i),
            E_F16 => f16::from_bits(*(w as *const u16).add(i)).to_f32(),
            _ => f32::from_bits((*(w as *const u16).add(i) as u32) << 16),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float256_tile<const R: usize, const E: u8>(f: FloatArgs, r: usize, t: usize, out: &mut [f32]) {
    // SAFETY (whole body): loads stay inside rows r..r+R and token t.
    unsafe {
        let xt = f.x.add(t * f.cols);
        let mut acc = [_mm256_setzero_ps(); R];
        let full = f.cols / 8 * 8;
        let mut c = 0;
        while c < full {
            let xv = _mm256_loadu_ps(xt.add(c));
            for (i, acc) in acc.iter_mut().enumerate() {
                let i = (r + i) * f.cols + c;
                let wv = match E {
                    E_F32 => _mm256_loadu_ps((f.w as *const f32).add(i)),
                    E_F16 => _mm256_cvtph_ps(_mm_loadu_si128((f.w as *const u16).add(i) as *const _)),
                    _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128((f.w as *const u16).add(i) as *const _)),
                        16,
                    )),
                };
                *acc = _mm256_fmadd_ps(wv, xv, *acc);
            }
            c += 8;
        }
        for (i, acc) in acc.iter().enumerate() {
            let mut s = hsum256(*acc);
            for c in full..f.cols {
                s += float_at::<E>(f.w, (r + i) * f.cols + c) * *xt.add(c);
            }
            *out.get_unchecked_mut(t * f.ld + r + i) = s;
        }
    }
}
