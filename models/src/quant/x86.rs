//! x86-64 kernels for [`AffineMatrix`] products, chosen at run time.
//!
//! `FOGMESH_KERNEL=portable|avx2|vnni` forces a level (for benchmarks and tests);
//! a level the CPU lacks falls back to the best one it has.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{AffineMatrix, IntKind, QActs, Scales};

/// Instruction-set level of the kernels in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Portable,
    Avx2,
    Vnni,
}

/// The best level this CPU supports.
pub(crate) fn best_level() -> Level {
    static BEST: OnceLock<Level> = OnceLock::new();
    *BEST.get_or_init(|| {
        let vnni = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        if vnni {
            Level::Vnni
        } else if avx2 {
            Level::Avx2
        } else {
            Level::Portable
        }
    })
}

fn detect() -> Level {
    let best = best_level();
    let wanted = match std::env::var("FOGMESH_KERNEL").as_deref() {
        Ok("portable") => Level::Portable,
        Ok("avx2") => Level::Avx2,
        _ => Level::Vnni,
    };
    best.min(wanted)
}

/// The kernel level this process uses.
pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

const K_U4: u8 = 0;
const K_U5: u8 = 1;
const K_I8: u8 = 2;

/// Runs the best available kernel; `false` when only the portable one applies.
pub(super) fn dot_rows(m: &AffineMatrix, r0: usize, r1: usize, a: &QActs, out: &mut [f32]) -> bool {
    dot_rows_at(level(), m, r0, r1, a, out)
}

/// Runs the kernel of `lvl`, which must not exceed [`detect`]'s best level.
pub(super) fn dot_rows_at(lvl: Level, m: &AffineMatrix, r0: usize, r1: usize, a: &QActs, out: &mut [f32]) -> bool {
    assert!(a.nb == m.nb && out.len() >= a.tokens * m.rows && r1 <= m.rows && a.q.len() >= a.tokens * a.nb * 32);
    assert!(lvl <= best_level(), "kernel level {lvl:?} is not supported by this CPU");
    match lvl {
        // SAFETY: the CPU supports the features (asserted above); the slices
        // hold every row, token and output the kernel touches (asserted above).
        Level::Vnni => unsafe {
            let h = matches!(m.scales, Scales::F16 { .. });
            match (m.kind, h) {
                (IntKind::U4, true) => vnni_rows::<K_U4, true>(m, r0, r1, a, out),
                (IntKind::U5, true) => vnni_rows::<K_U5, true>(m, r0, r1, a, out),
                (IntKind::I8, true) => vnni_rows::<K_I8, true>(m, r0, r1, a, out),
                (IntKind::U4, false) => vnni_rows::<K_U4, false>(m, r0, r1, a, out),
                (IntKind::U5, false) => vnni_rows::<K_U5, false>(m, r0, r1, a, out),
                (IntKind::I8, false) => vnni_rows::<K_I8, false>(m, r0, r1, a, out),
            }
        },
        // SAFETY: as above.
        Level::Avx2 => unsafe {
            let h = matches!(m.scales, Scales::F16 { .. });
            match (m.kind, h) {
                (IntKind::U4, true) => avx2_rows::<K_U4, true>(m, r0, r1, a, out),
                (IntKind::U5, true) => avx2_rows::<K_U5, true>(m, r0, r1, a, out),
                (IntKind::I8, true) => avx2_rows::<K_I8, true>(m, r0, r1, a, out),
                (IntKind::U4, false) => avx2_rows::<K_U4, false>(m, r0, r1, a, out),
                (IntKind::U5, false) => avx2_rows::<K_U5, false>(m, r0, r1, a, out),
                (IntKind::I8, false) => avx2_rows::<K_I8, false>(m, r0, r1, a, out),
            }
        },
        Level::Portable => return false,
    }
    true
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")]
unsafe fn vnni_rows<const K: u8, const H: bool>(m: &AffineMatrix, r0: usize, r1: usize, a: &QActs, out: &mut [f32]) {
    // Tiles of 4 rows by 4 tokens: each weight block is loaded and
    // unpacked once for four tokens. Every (row, token) still sums its
    // blocks in the same order, so the tiling never changes a result.
    let mut r = r0;
    while r + 4 <= r1 {
        let mut t = 0;
        while t + 4 <= a.tokens {
            // SAFETY: rows r..r+4 exist, tokens t..t+4 exist.
            unsafe { vnni_tile::<4, 4, K, H>(m, r, t, a, out) };
            t += 4;
        }
        while t < a.tokens {
            // SAFETY: rows r..r+4 exist, token t exists.
            unsafe { vnni_tile::<4, 1, K, H>(m, r, t, a, out) };
            t += 1;
        }
        r += 4;
    }
    while r < r1 {
        for t in 0..a.tokens {
            // SAFETY: as above.
            unsafe { vnni_tile::<1, 1, K, H>(m, r, t, a, out) };
        }
        r += 1;
    }
}

/// Two `f32`s at `p` repeated over 16 lanes: `[p0, p1, p0, p1, ...]`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn bcast2_512(p: *const f32) -> __m512 {
    // SAFETY: the caller guarantees two readable floats at p.
    unsafe { _mm512_broadcast_f32x2(_mm_castpd_ps(_mm_load_sd(p as *const f64))) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")]
unsafe fn vnni_tile<const R: usize, const T: usize, const K: u8, const H: bool>(
    m: &AffineMatrix,
    r: usize,
    t0: usize,
    a: &QActs,
    out: &mut [f32],
) {
    let nb = m.nb;
    let np = nb / 2;
    let pb = if K == K_U4 { 32 } else { 64 };
    // SAFETY (whole body): every pointer below stays inside the row and token
    // slices, whose sizes follow from nb, rows and tokens.
    unsafe {
        let (sp, mp) = scale_ptrs(m);
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let nib = _mm256_set1_epi8(0x0f);
        let flip = _mm512_set1_epi8(-128);
        for p in 0..np {
            let mut av = [_mm512_setzero_si512(); T];
            let mut sa = [_mm512_setzero_ps(); T];
            for j in 0..T {
                let t = t0 + j;
                av[j] = _mm512_loadu_si512(a.q.as_ptr().add(t * nb * 32 + p * 64) as *const _);
                sa[j] = bcast2_512(a.d.as_ptr().add(t * nb + 2 * p));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let row = r + i;
                let qp = m.q.as_ptr().add((row * np + p) * pb);
                let wv = if K == K_U4 {
                    let x = _mm256_loadu_si256(qp as *const _);
                    let lo = _mm256_and_si256(x, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
                    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
                } else if K == K_U5 {
                    _mm512_loadu_si512(qp as *const _)
                } else {
                    _mm512_xor_si512(_mm512_loadu_si512(qp as *const _), flip)
                };
                let sw = scale_pair_512::<H>(sp, row * nb + 2 * p);
                for j in 0..T {
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, av[j]);
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sw, sa[j]), acc[j]);
                }
            }
        }
        for j in 0..T {
            let t = t0 + j;
            let asum = a.s.as_ptr().add(t * nb);
            for (i, acc) in acc.iter().enumerate() {
                let row = r + i;
                let mut macc = _mm512_setzero_ps();
                let mut k = 0;
                while k + 16 <= nb {
                    macc = _mm512_fmadd_ps(mins16_512::<H>(mp, row * nb + k, !0), _mm512_loadu_ps(asum.add(k)), macc);
                    k += 16;
                }
                if k < nb {
                    let mask: __mmask16 = ((1u32 << (nb - k)) - 1) as __mmask16;
                    macc = _mm512_fmadd_ps(mins16_512::<H>(mp, row * nb + k, mask), _mm512_maskz_loadu_ps(mask, asum.add(k)), macc);
                }
                *out.get_unchecked_mut(t * m.rows + row) = _mm512_reduce_add_ps(acc[j]) + _mm512_reduce_add_ps(macc);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_rows<const K: u8, const H: bool>(m: &AffineMatrix, r0: usize, r1: usize, a: &QActs, out: &mut [f32]) {
    let mut r = r0;
    while r + 4 <= r1 {
        for t in 0..a.tokens {
            // SAFETY: rows r..r+4 exist, token t exists.
            unsafe { avx2_tile::<4, K, H>(m, r, t, a, out) };
        }
        r += 4;
    }
    while r < r1 {
        for t in 0..a.tokens {
            // SAFETY: as above.
            unsafe { avx2_tile::<1, K, H>(m, r, t, a, out) };
        }
        r += 1;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile<const R: usize, const K: u8, const H: bool>(m: &AffineMatrix, r: usize, t: usize, a: &QActs, out: &mut [f32]) {
    let nb = m.nb;
    let np = nb / 2;
    let pb = if K == K_U4 { 32 } else { 64 };
    // SAFETY (whole body): pointers stay inside the row and token slices.
    unsafe {
        let aq = a.q.as_ptr().add(t * nb * 32);
        let ad = a.d.as_ptr().add(t * nb);
        let (sp, mp) = scale_ptrs(m);
        let mut acc = [_mm256_setzero_ps(); R];
        let nib = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        for p in 0..np {
            let a0 = _mm256_loadu_si256(aq.add(p * 64) as *const _);
            let a1 = _mm256_loadu_si256(aq.add(p * 64 + 32) as *const _);
            let sa = _mm256_castpd_ps(_mm256_broadcast_sd(&*(ad.add(2 * p) as *const f64)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let row = r + i;
                let qp = m.q.as_ptr().add((row * np + p) * pb);
                let (d0, d1) = if K == K_U4 {
                    let x = _mm256_loadu_si256(qp as *const _);
                    let lo = _mm256_and_si256(x, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
                    (_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1))
                } else if K == K_U5 {
                    let w0 = _mm256_loadu_si256(qp as *const _);
                    let w1 = _mm256_loadu_si256(qp.add(32) as *const _);
                    (_mm256_maddubs_epi16(w0, a0), _mm256_maddubs_epi16(w1, a1))
                } else {
                    let w0 = _mm256_loadu_si256(qp as *const _);
                    let w1 = _mm256_loadu_si256(qp.add(32) as *const _);
                    (
                        _mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(a0, w0)),
                        _mm256_maddubs_epi16(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(a1, w1)),
                    )
                };
                let dot = _mm256_add_epi32(_mm256_madd_epi16(d0, ones), _mm256_madd_epi16(d1, ones));
                let sw = scale_pair_256::<H>(sp, row * nb + 2 * p);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sw, sa), *acc);
            }
        }
        let asum = a.s.as_ptr().add(t * nb);
        for (i, acc) in acc.iter().enumerate() {
            let row = r + i;
            let mut s = hsum256(*acc);
            if K != K_I8 {
                let mut macc = _mm256_setzero_ps();
                let mut j = 0;
                while j + 8 <= nb {
                    macc = _mm256_fmadd_ps(mins8_256::<H>(mp, row * nb + j), _mm256_loadu_ps(asum.add(j)), macc);
                    j += 8;
                }
                s += hsum256(macc);
                while j < nb {
                    s += m.scales.min(row * nb + j) * *asum.add(j);
                    j += 1;
                }
            }
            *out.get_unchecked_mut(t * m.rows + row) = s;
        }
    }
}

/// Raw pointers to a matrix's scales and minimums (f16 or f32 elements).
#[inline]
fn scale_ptrs(m: &AffineMatrix) -> (*const u8, *const u8) {
    match &m.scales {
        Scales::F16 { scale, min } => (scale.as_ptr() as *const u8, min.as_ptr() as *const u8),
        Scales::F32 { scale, min } => (scale.as_ptr() as *const u8, min.as_ptr() as *const u8),
    }
}

/// The two scales at element `i` repeated over 16 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,f16c")]
unsafe fn scale_pair_512<const H: bool>(p: *const u8, i: usize) -> __m512 {
    // SAFETY: the caller guarantees elements i and i+1 exist.
    unsafe {
        if H {
            let two = (p as *const u16).add(i).cast::<i32>().read_unaligned();
            _mm512_broadcast_f32x2(_mm_cvtph_ps(_mm_cvtsi32_si128(two)))
        } else {
            bcast2_512((p as *const f32).add(i))
        }
    }
}

/// Sixteen minimums from element `i` (lanes outside `k` are zero).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn mins16_512<const H: bool>(p: *const u8, i: usize, k: __mmask16) -> __m512 {
    // SAFETY: the caller guarantees the elements selected by k exist.
    unsafe {
        if H {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (p as *const u16).add(i) as *const i16))
        } else {
            _mm512_maskz_loadu_ps(k, (p as *const f32).add(i))
        }
    }
}

/// The two scales at element `i` repeated over 8 lanes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn scale_pair_256<const H: bool>(p: *const u8, i: usize) -> __m256 {
    // SAFETY: the caller guarantees elements i and i+1 exist.
    unsafe {
        if H {
            let two = (p as *const u16).add(i).cast::<i32>().read_unaligned();
            let v = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
            _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(v)))
        } else {
            _mm256_castpd_ps(_mm256_broadcast_sd(&*((p as *const f32).add(i) as *const f64)))
        }
    }
}

/// Eight minimums from element `i`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn mins8_256<const H: bool>(p: *const u8, i: usize) -> __m256 {
    // SAFETY: the caller guarantees elements i..i+8 exist.
    unsafe {
        if H {
            _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(i) as *const __m128i))
        } else {
            _mm256_loadu_ps((p as *const f32).add(i))
        }
    }
}
