//! x86-64 kernels for [`AffineMatrix`] products, chosen at run time.
//!
//! `FOGMESH_KERNEL=portable|avx2|vnni` forces a level (for benchmarks and tests);
//! a level the CPU lacks falls back to the best one it has.

use std::arch::x86_64::*;
use std::sync::OnceLock;

mod float;

use half::f16;

pub(super) use float::float_rows;
#[cfg(test)]
pub(super) use float::float_rows_at;
use super::scales::{K_PACKED, k_scales_mins};
use super::{AffineMatrix, IntKind, QActs, RowScales, Scales};

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
const K_U6: u8 = 3;

/// Runs the best available kernel; `false` when only the portable one applies.
pub(super) fn dot_rows(m: &AffineMatrix, r0: usize, r1: usize, a: &QActs, out: &mut [f32], ld: usize) -> bool {
    dot_rows_at(level(), m, r0, r1, a, out, ld)
}

/// Instantiates `$f::<kind, f16 scales>` for the matrix's layout.
macro_rules! by_layout {
    ($f:ident, $m:expr, $($arg:expr),*) => {{
        // K-quant scales are unpacked to f32 per tile; the others are read
        // in place.
        let h = !matches!($m.scales, Scales::F32 { .. } | Scales::K { .. });
        match ($m.kind, h) {
            (IntKind::U4, true) => $f::<K_U4, true>($m, $($arg),*),
            (IntKind::U5, true) => $f::<K_U5, true>($m, $($arg),*),
            (IntKind::I8, true) => $f::<K_I8, true>($m, $($arg),*),
            (IntKind::U4, false) => $f::<K_U4, false>($m, $($arg),*),
            (IntKind::U5, false) => $f::<K_U5, false>($m, $($arg),*),
            (IntKind::I8, false) => $f::<K_I8, false>($m, $($arg),*),
            (IntKind::U6, _) => $f::<K_U6, true>($m, $($arg),*),
        }
    }};
}

/// Runs the kernel of `lvl`, which must not exceed [`detect`]'s best level.
pub(super) fn dot_rows_at(lvl: Level, m: &AffineMatrix, r0: usize, r1: usize, a: &QActs, out: &mut [f32], ld: usize) -> bool {
    assert!(a.nb == m.nb && r1 <= m.rows && a.q.len() >= a.tokens * a.nb * 32);
    assert!(ld >= m.rows && (a.tokens == 0 || out.len() >= (a.tokens - 1) * ld + m.rows));
    assert!(lvl <= best_level(), "kernel level {lvl:?} is not supported by this CPU");
    assert_eq!(m.kind == IntKind::U6, matches!(m.scales, Scales::Q6 { .. }), "Q6_K integers go with Q6_K scales");
    match lvl {
        // SAFETY: the CPU supports the features (asserted above); the slices
        // hold every row, token and output the kernel touches (asserted above).
        Level::Vnni => unsafe { by_layout!(vnni_rows, m, r0, r1, a, out, ld) },
        // SAFETY: as above.
        Level::Avx2 => unsafe { by_layout!(avx2_rows, m, r0, r1, a, out, ld) },
        Level::Portable => return false,
    }
    true
}

/// [`IntKind::pair_bytes`] of the kernel's kind, as a constant.
#[inline(always)]
const fn pair_bytes<const K: u8>() -> usize {
    match K {
        K_U4 => 32,
        K_U5 => 40,
        K_U6 => 48,
        _ => 64,
    }
}

/// Where a tile reads its rows' scales and minimums: element
/// `(row - row0) * nb + block` of `sp` and `mp` (f16 or f32 by the kernel's
/// `H`), each minimum times `mmul` (1, or the `c` of [`Scales::Symmetric`]).
#[derive(Clone, Copy)]
struct ScaleView {
    sp: *const u8,
    mp: *const u8,
    mmul: f32,
    row0: usize,
}

impl ScaleView {
    /// The view for rows `[r, r + n)`, unpacking packed scales into `scratch`.
    fn new(m: &AffineMatrix, scratch: &mut RowScales, r: usize, n: usize) -> Self {
        let v = |sp: *const u8, mp: *const u8, mmul: f32| ScaleView { sp, mp, mmul, row0: 0 };
        match &m.scales {
            Scales::F16 { scale, min } => v(scale.as_ptr().cast(), min.as_ptr().cast(), 1.0),
            Scales::F32 { scale, min } => v(scale.as_ptr().cast(), min.as_ptr().cast(), 1.0),
            Scales::Symmetric { scale, c } => v(scale.as_ptr().cast(), scale.as_ptr().cast(), *c),
            Scales::K { d, dmin, packed } => {
                // SAFETY: only the AVX2 and VNNI kernels make views, on CPUs
                // with AVX2 and F16C.
                unsafe { fill_k(d, dmin, packed, m.nb, r, n, scratch) };
                ScaleView { sp: scratch.scale.as_ptr().cast(), mp: scratch.min.as_ptr().cast(), mmul: 1.0, row0: r }
            }
            // Q6_K tiles read their scales themselves.
            Scales::Q6 { .. } => v(std::ptr::null(), std::ptr::null(), 1.0),
        }
    }
}

/// [`quantize_token`](super::quantize_token) with AVX-512 on CPUs of the
/// VNNI level (the same operations per value, so the same bits); `false`
/// where it does not apply.
pub(super) fn quantize_token(row: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) -> bool {
    if level() < Level::Vnni {
        return false;
    }
    let nb = row.len() / 32;
    assert!(d.len() >= nb && s.len() >= nb && q.len() >= nb.next_multiple_of(2) * 32);
    // SAFETY: the CPU has AVX-512 (the level), the slices hold every block
    // (asserted above).
    unsafe { quantize_512(row, q, d, s) };
    true
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,f16c")]
unsafe fn quantize_512(row: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let abs = _mm512_set1_epi32(0x7fff_ffff);
    let sign = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_set1_epi32(0.5f32.to_bits() as i32);
    for j in 0..row.len() / 32 {
        // SAFETY (block): the 32 values of block j, and its 32 integers at
        // the pair positions of block j & 1 (checked by the caller).
        unsafe {
            let x0 = _mm512_loadu_si512(row.as_ptr().add(j * 32) as *const _);
            let x1 = _mm512_loadu_si512(row.as_ptr().add(j * 32 + 16) as *const _);
            let a = _mm512_max_ps(_mm512_castsi512_ps(_mm512_and_si512(x0, abs)), _mm512_castsi512_ps(_mm512_and_si512(x1, abs)));
            let amax = _mm512_reduce_max_ps(a);
            let dj = amax / 127.0;
            let id = _mm512_set1_ps(if dj != 0.0 { 1.0 / dj } else { 0.0 });
            // v * id + copysign(0.5, v), truncated: half away from zero.
            let round = |x: __m512i| {
                let t = _mm512_mul_ps(_mm512_castsi512_ps(x), id);
                let h = _mm512_castsi512_ps(_mm512_or_si512(half, _mm512_and_si512(x, sign)));
                _mm512_cvttps_epi32(_mm512_add_ps(t, h))
            };
            let (q0, q1) = (round(x0), round(x1));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            let mut bytes = [0u32; 8];
            _mm_storeu_si128(bytes.as_mut_ptr() as *mut _, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128(bytes.as_mut_ptr().add(4) as *mut _, _mm512_cvtepi32_epi8(q1));
            // Group g of four values goes to word 2g + (j & 1) of the pair.
            let words = q.as_mut_ptr().add((j & !1) * 32) as *mut u32;
            for (g, &w) in bytes.iter().enumerate() {
                words.add(2 * g + (j & 1)).write_unaligned(w);
            }
            let dj = f16::from_f32(dj).to_f32();
            d[j] = dj;
            s[j] = dj * sum as f32;
        }
    }
}

/// [`RowScales::fill`] for K-quant super-blocks, eight blocks at a time
/// (the same products and negations, so the same bits).
#[target_feature(enable = "avx2,f16c")]
unsafe fn fill_k(d: &[f16], dmin: &[f16], packed: &[u8], nb: usize, r: usize, n: usize, out: &mut RowScales) {
    let blocks = n * nb;
    out.scale.resize(blocks, 0.0);
    out.min.resize(blocks, 0.0);
    let sb0 = r * nb / 8;
    let h = |v: f16| _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(v.to_bits() as i32))));
    let sign = _mm256_set1_ps(-0.0);
    for i in 0..blocks / 8 {
        let sb = sb0 + i;
        let (sc, m) = k_scales_mins(&packed[sb * K_PACKED..(sb + 1) * K_PACKED]);
        let ints = |b: [u8; 8]| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(b))));
        let scale = _mm256_mul_ps(h(d[sb]), ints(sc));
        let min = _mm256_xor_ps(_mm256_mul_ps(h(dmin[sb]), ints(m)), sign);
        // SAFETY: blocks i*8..i*8+8 lie inside both vectors (resized above).
        unsafe {
            _mm256_storeu_ps(out.scale.as_mut_ptr().add(i * 8), scale);
            _mm256_storeu_ps(out.min.as_mut_ptr().add(i * 8), min);
        }
    }
}

/// Pointers to a Q6_K matrix's `d` (f16) and scales (i8), null otherwise.
fn q6_ptrs(m: &AffineMatrix) -> (*const u16, *const i8) {
    match &m.scales {
        Scales::Q6 { d, sc } => (d.as_ptr().cast(), sc.as_ptr()),
        _ => (std::ptr::null(), std::ptr::null()),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")]
unsafe fn vnni_rows<const K: u8, const H: bool>(m: &AffineMatrix, r0: usize, r1: usize, a: &QActs, out: &mut [f32], ld: usize) {
    // Tiles of 4 rows by 4 tokens: each weight block is loaded and
    // unpacked once for four tokens. Every (row, token) still sums its
    // blocks in the same order, so the tiling never changes a result.
    // With many tokens (prefill), a tile's packed rows are first unpacked
    // to one byte per weight (the same integers) and read from there.
    let np = m.nb / 2;
    let expand = K != K_I8 && a.tokens >= EXPAND_TOKENS;
    let mut bytes: Vec<u8> = if expand { vec![0; 4 * np * 64] } else { Vec::new() };
    let mut scratch = RowScales::default();
    let mut r = r0;
    while r + 4 <= r1 {
        let sv = ScaleView::new(m, &mut scratch, r, 4);
        if expand {
            // SAFETY: rows r..r+4 exist; `bytes` holds 4 * np pairs.
            unsafe { expand_rows::<K>(m, r, 4, &mut bytes) };
            // SAFETY: rows r..r+4, expanded, and every token exist.
            unsafe { vnni_tokens::<K, H, true>(m, Rows { q: bytes.as_ptr(), row0: r }, sv, r, a, out, ld) };
        } else {
            // SAFETY: rows r..r+4 and every token exist.
            unsafe { vnni_tokens::<K, H, false>(m, Rows { q: m.q.as_ptr(), row0: 0 }, sv, r, a, out, ld) };
        }
        r += 4;
    }
    while r < r1 {
        let sv = ScaleView::new(m, &mut scratch, r, 1);
        let w = Rows { q: m.q.as_ptr(), row0: 0 };
        for t in 0..a.tokens {
            // SAFETY: as above.
            unsafe { vnni_tile::<1, 1, K, H, false>(m, w, sv, r, t, a, out, ld) };
        }
        r += 1;
    }
}

/// Rows `r..r + 4` times every token, in tiles of 4 tokens then single ones.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")]
unsafe fn vnni_tokens<const K: u8, const H: bool, const X: bool>(
    m: &AffineMatrix,
    w: Rows,
    sv: ScaleView,
    r: usize,
    a: &QActs,
    out: &mut [f32],
    ld: usize,
) {
    let mut t = 0;
    while t + 4 <= a.tokens {
        // SAFETY: the caller guarantees the rows; tokens t..t+4 exist.
        unsafe { vnni_tile::<4, 4, K, H, X>(m, w, sv, r, t, a, out, ld) };
        t += 4;
    }
    while t < a.tokens {
        // SAFETY: as above, token t exists.
        unsafe { vnni_tile::<4, 1, K, H, X>(m, w, sv, r, t, a, out, ld) };
        t += 1;
    }
}

/// Tokens from which [`vnni_rows`] unpacks a tile's rows once for all of them.
const EXPAND_TOKENS: usize = 8;

/// Where a tile reads its rows' integers: pair `p` of row `row` at
/// `q + ((row - row0) * np + p) * pb`, `pb` the kind's pair bytes (64 for
/// unpacked rows).
#[derive(Clone, Copy)]
struct Rows {
    q: *const u8,
    row0: usize,
}

/// Unpacks rows `[r, r + n)` of `m` to 64 bytes per pair (as [`pair_512`]
/// gives them) into `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn expand_rows<const K: u8>(m: &AffineMatrix, r: usize, n: usize, out: &mut [u8]) {
    let np = m.nb / 2;
    let pb = pair_bytes::<K>();
    assert!(out.len() >= n * np * 64 && (r + n) * np * pb <= m.q.len());
    for i in 0..n * np {
        // SAFETY: pair i of the rows lies inside `m.q`, its 64 bytes inside
        // `out` (asserted above).
        unsafe {
            let v = pair_512::<K>(m.q.as_ptr().add((r * np + i) * pb));
            _mm512_storeu_si512(out.as_mut_ptr().add(i * 64) as *mut _, v);
        }
    }
}

/// Two `f32`s at `p` repeated over 16 lanes: `[p0, p1, p0, p1, ...]`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn bcast2_512(p: *const f32) -> __m512 {
    // SAFETY: the caller guarantees two readable floats at p.
    unsafe { _mm512_broadcast_f32x2(_mm_castpd_ps(_mm_load_sd(p as *const f64))) }
}

/// The 64 integers of the pair at `qp`, one per byte (Q8_0's offset by 128).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn pair_512<const K: u8>(qp: *const u8) -> __m512i {
    // SAFETY: the caller guarantees the pair's bytes at qp.
    unsafe {
        if K == K_I8 {
            return _mm512_xor_si512(_mm512_loadu_si512(qp as *const _), _mm512_set1_epi8(-128));
        }
        let nib = _mm256_set1_epi8(0x0f);
        let x = _mm256_loadu_si256(qp as *const _);
        let lo = _mm256_and_si256(x, nib);
        let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
        let w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        if K == K_U5 {
            // Bit p of the word after the nibbles is 16 at position p.
            let bits: __mmask64 = (qp.add(32) as *const u64).read_unaligned();
            _mm512_mask_add_epi8(w, bits, w, _mm512_set1_epi8(16))
        } else if K == K_U6 {
            // Byte p % 16 of the 16 after the nibbles, bits 2 * (p / 16).
            let hb = _mm512_broadcast_i32x4(_mm_loadu_si128(qp.add(32) as *const _));
            let shifts = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
            let h = _mm512_and_si512(_mm512_srlv_epi32(hb, shifts), _mm512_set1_epi8(3));
            _mm512_or_si512(w, _mm512_slli_epi16(h, 4))
        } else {
            w
        }
    }
}

/// The four i8 scales of a Q6_K pair at `sc`, times `d`, per dot-product lane
/// (lane `L` is group `2 * (L % 2) + L / 8`, see [`pair_pos`](super::pair_pos)).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,f16c")]
unsafe fn q6_scales_512(sc: *const i8, d: *const u16) -> __m512 {
    // SAFETY: the caller guarantees four scales at sc and one f16 at d.
    unsafe {
        let four = _mm_cvtsi32_si128((sc as *const i32).read_unaligned());
        let lanes = _mm_shuffle_epi8(four, _mm_setr_epi8(0, 2, 0, 2, 0, 2, 0, 2, 1, 3, 1, 3, 1, 3, 1, 3));
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*d as i32)));
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lanes)), _mm512_set1_ps(d))
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")]
unsafe fn vnni_tile<const R: usize, const T: usize, const K: u8, const H: bool, const X: bool>(
    m: &AffineMatrix,
    w: Rows,
    sv: ScaleView,
    r: usize,
    t0: usize,
    a: &QActs,
    out: &mut [f32],
    ld: usize,
) {
    let nb = m.nb;
    let np = nb / 2;
    let pb = if X { 64 } else { pair_bytes::<K>() };
    // SAFETY (whole body): every pointer below stays inside the row and token
    // slices, whose sizes follow from nb, rows and tokens.
    unsafe {
        let (q6d, q6s) = q6_ptrs(m);
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        for p in 0..np {
            let mut av = [_mm512_setzero_si512(); T];
            let mut sa = [_mm512_setzero_ps(); T];
            // Q6_K: the products start at -32 * sum(a), so they come out as
            // sums of (q - 32) * a.
            let mut base = [_mm512_setzero_si512(); T];
            for j in 0..T {
                let t = t0 + j;
                av[j] = _mm512_loadu_si512(a.q.as_ptr().add(t * nb * 32 + p * 64) as *const _);
                sa[j] = bcast2_512(a.d.as_ptr().add(t * nb + 2 * p));
                if K == K_U6 {
                    let off = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(32), av[j]);
                    base[j] = _mm512_sub_epi32(_mm512_setzero_si512(), off);
                }
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let row = r + i;
                let qp = w.q.add(((row - w.row0) * np + p) * pb);
                let wv = if X { _mm512_loadu_si512(qp as *const _) } else { pair_512::<K>(qp) };
                let sw = if K == K_U6 {
                    q6_scales_512(q6s.add(row * nb * 2 + 4 * p), q6d.add(row * nb / 8 + p / 4))
                } else {
                    scale_pair_512::<H>(sv.sp, (row - sv.row0) * nb + 2 * p)
                };
                for j in 0..T {
                    let dot = _mm512_dpbusd_epi32(base[j], wv, av[j]);
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sw, sa[j]), acc[j]);
                }
            }
        }
        let mm = _mm512_set1_ps(sv.mmul);
        for j in 0..T {
            let t = t0 + j;
            let asum = a.s.as_ptr().add(t * nb);
            for (i, acc) in acc.iter().enumerate() {
                let row = r + i;
                let mut macc = _mm512_setzero_ps();
                let mut k = 0;
                while K != K_U6 && k < nb {
                    let mask: __mmask16 = if k + 16 <= nb { !0 } else { ((1u32 << (nb - k)) - 1) as __mmask16 };
                    let mins = _mm512_mul_ps(mins16_512::<H>(sv.mp, (row - sv.row0) * nb + k, mask), mm);
                    macc = _mm512_fmadd_ps(mins, _mm512_maskz_loadu_ps(mask, asum.add(k)), macc);
                    k += 16;
                }
                *out.get_unchecked_mut(t * ld + row) = _mm512_reduce_add_ps(acc[j]) + _mm512_reduce_add_ps(macc);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_rows<const K: u8, const H: bool>(m: &AffineMatrix, r0: usize, r1: usize, a: &QActs, out: &mut [f32], ld: usize) {
    let mut scratch = RowScales::default();
    let mut r = r0;
    while r + 4 <= r1 {
        let sv = ScaleView::new(m, &mut scratch, r, 4);
        for t in 0..a.tokens {
            // SAFETY: rows r..r+4 exist, token t exists.
            unsafe { avx2_tile::<4, K, H>(m, sv, r, t, a, out, ld) };
        }
        r += 4;
    }
    while r < r1 {
        let sv = ScaleView::new(m, &mut scratch, r, 1);
        for t in 0..a.tokens {
            // SAFETY: as above.
            unsafe { avx2_tile::<1, K, H>(m, sv, r, t, a, out, ld) };
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

/// 16 at every byte `i` whose bit `i` of `x` is set.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bits_to_16s(x: u32) -> __m256i {
    let v = _mm256_shuffle_epi8(
        _mm256_set1_epi32(x as i32),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
    );
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel), _mm256_set1_epi8(16))
}

/// The two halves (positions 0-31, 32-63) of the pair at `qp`, one integer
/// per byte; Q8_0's stay signed.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pair_256<const K: u8>(qp: *const u8) -> (__m256i, __m256i) {
    // SAFETY: the caller guarantees the pair's bytes at qp.
    unsafe {
        if K == K_I8 {
            return (_mm256_loadu_si256(qp as *const _), _mm256_loadu_si256(qp.add(32) as *const _));
        }
        let nib = _mm256_set1_epi8(0x0f);
        let x = _mm256_loadu_si256(qp as *const _);
        let lo = _mm256_and_si256(x, nib);
        let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
        if K == K_U5 {
            let bits = (qp.add(32) as *const u64).read_unaligned();
            (_mm256_or_si256(lo, bits_to_16s(bits as u32)), _mm256_or_si256(hi, bits_to_16s((bits >> 32) as u32)))
        } else if K == K_U6 {
            let hb = _mm256_broadcastsi128_si256(_mm_loadu_si128(qp.add(32) as *const _));
            let three = _mm256_set1_epi8(3);
            let h0 = _mm256_and_si256(_mm256_srlv_epi32(hb, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), three);
            let h1 = _mm256_and_si256(_mm256_srlv_epi32(hb, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), three);
            (_mm256_or_si256(lo, _mm256_slli_epi16(h0, 4)), _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4)))
        } else {
            (lo, hi)
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile<const R: usize, const K: u8, const H: bool>(
    m: &AffineMatrix,
    sv: ScaleView,
    r: usize,
    t: usize,
    a: &QActs,
    out: &mut [f32],
    ld: usize,
) {
    let nb = m.nb;
    let np = nb / 2;
    let pb = pair_bytes::<K>();
    // SAFETY (whole body): pointers stay inside the row and token slices.
    unsafe {
        let aq = a.q.as_ptr().add(t * nb * 32);
        let ad = a.d.as_ptr().add(t * nb);
        let (q6d, q6s) = q6_ptrs(m);
        let mut acc = [_mm256_setzero_ps(); R];
        let ones = _mm256_set1_epi16(1);
        for p in 0..np {
            let a0 = _mm256_loadu_si256(aq.add(p * 64) as *const _);
            let a1 = _mm256_loadu_si256(aq.add(p * 64 + 32) as *const _);
            let sa = _mm256_castpd_ps(_mm256_broadcast_sd(&*(ad.add(2 * p) as *const f64)));
            // Q6_K: 32 * a, subtracted from each product's 16-bit sums.
            let (o0, o1) = if K == K_U6 {
                let c = _mm256_set1_epi8(32);
                (_mm256_maddubs_epi16(c, a0), _mm256_maddubs_epi16(c, a1))
            } else {
                (_mm256_setzero_si256(), _mm256_setzero_si256())
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                let row = r + i;
                let (w0, w1) = pair_256::<K>(m.q.as_ptr().add((row * np + p) * pb));
                let (d0, d1) = if K == K_I8 {
                    (
                        _mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(a0, w0)),
                        _mm256_maddubs_epi16(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(a1, w1)),
                    )
                } else {
                    (
                        _mm256_sub_epi16(_mm256_maddubs_epi16(w0, a0), o0),
                        _mm256_sub_epi16(_mm256_maddubs_epi16(w1, a1), o1),
                    )
                };
                if K == K_U6 {
                    // The halves hold different 16-weight groups: scaled apart.
                    let four = _mm_cvtsi32_si128((q6s.add(row * nb * 2 + 4 * p) as *const i32).read_unaligned());
                    let lanes = _mm_shuffle_epi8(four, _mm_setr_epi8(0, 2, 0, 2, 0, 2, 0, 2, 1, 3, 1, 3, 1, 3, 1, 3));
                    let d = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*q6d.add(row * nb / 8 + p / 4) as i32))));
                    let s0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lanes)), d);
                    let s1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lanes, 8))), d);
                    let p0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(d0, ones));
                    let p1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(d1, ones));
                    *acc = _mm256_fmadd_ps(p0, _mm256_mul_ps(s0, sa), *acc);
                    *acc = _mm256_fmadd_ps(p1, _mm256_mul_ps(s1, sa), *acc);
                } else {
                    let dot = _mm256_add_epi32(_mm256_madd_epi16(d0, ones), _mm256_madd_epi16(d1, ones));
                    let sw = scale_pair_256::<H>(sv.sp, (row - sv.row0) * nb + 2 * p);
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sw, sa), *acc);
                }
            }
        }
        let asum = a.s.as_ptr().add(t * nb);
        for (i, acc) in acc.iter().enumerate() {
            let row = r + i;
            let mut s = hsum256(*acc);
            if K != K_I8 && K != K_U6 {
                let base = (row - sv.row0) * nb;
                let mut macc = _mm256_setzero_ps();
                let mut j = 0;
                let mm = _mm256_set1_ps(sv.mmul);
                while j + 8 <= nb {
                    let mins = _mm256_mul_ps(mins8_256::<H>(sv.mp, base + j), mm);
                    macc = _mm256_fmadd_ps(mins, _mm256_loadu_ps(asum.add(j)), macc);
                    j += 8;
                }
                s += hsum256(macc);
                while j < nb {
                    let min = if H { f16::from_bits(*(sv.mp as *const u16).add(base + j)).to_f32() } else { *(sv.mp as *const f32).add(base + j) };
                    s += min * sv.mmul * *asum.add(j);
                    j += 1;
                }
            }
            *out.get_unchecked_mut(t * ld + row) = s;
        }
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
