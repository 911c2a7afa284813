//! Lossless conversion of GGUF block types into [`AffineMatrix`].
//!
//! Each decoder turns one GGUF block into 32-weight sub-blocks of integers
//! (and, for Q6_K, 6-bit integers with a scale per 16 weights), exactly as
//! ggml dequantizes them. The integers are then laid out per pair of blocks
//! for the kernels ([`pair_pos`]) and the scales kept in the file's own width
//! ([`Scales`]): no type takes more bytes here than in the file.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::scales::{K_PACKED, Scales};
use super::{AffineMatrix, BLOCK, IntKind, pair_pos};

/// One decoded sub-block: 32 integers, a scale and a minimum.
struct Sub {
    q: [u8; BLOCK],
    scale: f32,
    min: f32,
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes one GGUF block into its sub-blocks, pushed onto `out`. Integers
/// are unsigned (Q8_0's are its signed bytes as they are).
fn decode(dtype: GgmlDType, b: &[u8], out: &mut Vec<Sub>) {
    let mut sub = Sub { q: [0; BLOCK], scale: 0.0, min: 0.0 };
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
            let (d, m, qs) = if dtype == GgmlDType::Q4_0 {
                let d = f16_at(b, 0);
                (d, -8.0 * d, &b[2..18])
            } else {
                (f16_at(b, 0), f16_at(b, 2), &b[4..20])
            };
            for l in 0..16 {
                sub.q[l] = qs[l] & 0x0f;
                sub.q[l + 16] = qs[l] >> 4;
            }
            sub.scale = d;
            sub.min = m;
            out.push(sub);
        }
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let (d, m, rest) = if dtype == GgmlDType::Q5_0 {
                let d = f16_at(b, 0);
                (d, -16.0 * d, &b[2..])
            } else {
                (f16_at(b, 0), f16_at(b, 2), &b[4..])
            };
            let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let qs = &rest[4..20];
            for l in 0..16 {
                let h0 = ((qh >> l) << 4) & 0x10;
                let h1 = (qh >> (l + 12)) & 0x10;
                sub.q[l] = (qs[l] & 0x0f) | h0 as u8;
                sub.q[l + 16] = (qs[l] >> 4) | h1 as u8;
            }
            sub.scale = d;
            sub.min = m;
            out.push(sub);
        }
        GgmlDType::Q8_0 => {
            let d = f16_at(b, 0);
            sub.q.copy_from_slice(&b[2..2 + BLOCK]);
            sub.scale = d;
            sub.min = -128.0 * d;
            out.push(sub);
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let (qh, ql) = if dtype == GgmlDType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for chunk in 0..4 {
                let q = &ql[chunk * 32..chunk * 32 + 32];
                for half in 0..2 {
                    let j = chunk * 2 + half;
                    let mut s = Sub { q: [0; BLOCK], scale: 0.0, min: 0.0 };
                    for l in 0..32 {
                        let lo = if half == 0 { q[l] & 0x0f } else { q[l] >> 4 };
                        let hi = qh.map_or(0, |qh| if qh[l] & (1 << j) != 0 { 16 } else { 0 });
                        s.q[l] = lo + hi;
                    }
                    out.push(s);
                }
            }
        }
        GgmlDType::Q6K => {
            // 128 bytes of low nibbles, 64 of high bit pairs: per half of 128
            // weights, ggml's order (weight l + 32k: the low nibble of
            // ql[l + 32(k%2)] for k < 2, the high one after, and bits 2k of qh[l]).
            let (ql, qh) = (&b[..128], &b[128..192]);
            for n in 0..2 {
                let (ql, qh) = (&ql[n * 64..n * 64 + 64], &qh[n * 32..n * 32 + 32]);
                for k in 0..4 {
                    let mut s = Sub { q: [0; BLOCK], scale: 0.0, min: 0.0 };
                    for l in 0..32 {
                        let byte = ql[l + 32 * (k % 2)];
                        let lo = if k < 2 { byte & 0x0f } else { byte >> 4 };
                        s.q[l] = lo | (((qh[l] >> (2 * k)) & 3) << 4);
                    }
                    out.push(s);
                }
            }
        }
        _ => {}
    }
}

/// Writes the 64 integers of a pair of blocks `(a, b)` into `pair` in `kind`'s layout.
fn put_pair(kind: IntKind, a: &[u8; BLOCK], b: &[u8; BLOCK], pair: &mut [u8]) {
    for (blk, q) in [a, b].into_iter().enumerate() {
        for (e, &v) in q.iter().enumerate() {
            let p = pair_pos(blk, e);
            match kind {
                IntKind::I8 => pair[p] = v,
                IntKind::U4 | IntKind::U5 | IntKind::U6 => {
                    // Low nibbles: position p < 32 in the low half of byte p,
                    // p >= 32 in the high half of byte p - 32.
                    if p < 32 {
                        pair[p] |= v & 0x0f;
                    } else {
                        pair[p - 32] |= (v & 0x0f) << 4;
                    }
                    match kind {
                        // Bit p of the 64-bit word after the nibbles: bit 4.
                        IntKind::U5 => pair[32 + p / 8] |= ((v >> 4) & 1) << (p % 8),
                        // Bits 2*(p/16) of byte p%16 after the nibbles: bits 4-5.
                        IntKind::U6 => pair[32 + p % 16] |= ((v >> 4) & 3) << (2 * (p / 16)),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Repacks `rows x cols` weights of `dtype`, or `None` when the type has no
/// affine form (the caller then keeps the GGUF bytes).
pub(super) fn affine(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Option<AffineMatrix> {
    let kind = match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => IntKind::U4,
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => IntKind::U5,
        GgmlDType::Q8_0 => IntKind::I8,
        GgmlDType::Q6K => IntKind::U6,
        _ => return None,
    };
    let ts = dtype.type_size();
    let nb_real = cols / BLOCK;
    let nb = nb_real.next_multiple_of(2);
    let pb = kind.pair_bytes();
    let mut q = super::weight_vec(rows * nb / 2 * pb);
    q.resize(rows * nb / 2 * pb, 0u8);
    let mut scale = vec![0f32; rows * nb];
    let mut min = vec![0f32; rows * nb];
    let (mut kd, mut kdmin, mut kpacked, mut q6sc) = (vec![], vec![], vec![], vec![]);
    let zero = [0u8; BLOCK];
    let mut subs = Vec::with_capacity(nb_real);
    let row_bytes = cols / dtype.block_size() * ts;
    for r in 0..rows {
        subs.clear();
        for blk in data[r * row_bytes..(r + 1) * row_bytes].chunks_exact(ts) {
            decode(dtype, blk, &mut subs);
            match dtype {
                GgmlDType::Q4K | GgmlDType::Q5K => {
                    kd.push(f16::from_le_bytes([blk[0], blk[1]]));
                    kdmin.push(f16::from_le_bytes([blk[2], blk[3]]));
                    kpacked.extend_from_slice(&blk[4..4 + K_PACKED]);
                }
                GgmlDType::Q6K => {
                    q6sc.extend(blk[192..208].iter().map(|&s| s as i8));
                    kd.push(f16::from_le_bytes([blk[208], blk[209]]));
                }
                _ => {}
            }
        }
        let qrow = &mut q[r * nb / 2 * pb..(r + 1) * nb / 2 * pb];
        for (p, pair) in qrow.chunks_exact_mut(pb).enumerate() {
            let b = subs.get(2 * p + 1).map_or(&zero, |s| &s.q);
            put_pair(kind, &subs[2 * p].q, b, pair);
        }
        for (j, s) in subs.iter().enumerate() {
            scale[r * nb + j] = s.scale;
            min[r * nb + j] = s.min;
        }
    }
    let scales = match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => {
            let c = match dtype {
                GgmlDType::Q4_0 => -8.0,
                GgmlDType::Q5_0 => -16.0,
                _ => -128.0,
            };
            Scales::Symmetric { scale: scale.into_iter().map(f16::from_f32).collect(), c }
        }
        GgmlDType::Q4K | GgmlDType::Q5K => Scales::K { d: kd, dmin: kdmin, packed: kpacked },
        GgmlDType::Q6K => Scales::Q6 { d: kd, sc: q6sc },
        _ => Scales::affine(scale, min),
    };
    Some(AffineMatrix { rows, cols, nb, kind, q, scales })
}
