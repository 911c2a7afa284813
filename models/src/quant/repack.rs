//! Lossless conversion of GGUF block types into [`AffineMatrix`].
//!
//! Each decoder turns one GGUF block into 32-weight sub-blocks of integers with
//! an `f32` scale and minimum, exactly as ggml dequantizes them
//! (`w = scale * q + min`).

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{AffineMatrix, BLOCK, IntKind, Scales, pair_pos};

/// One decoded sub-block: 32 integers, a scale and a minimum.
struct Sub {
    q: [i32; BLOCK],
    scale: f32,
    min: f32,
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K block.
#[inline]
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Decodes one GGUF block into its sub-blocks, pushed onto `out`.
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
                sub.q[l] = (qs[l] & 0x0f) as i32;
                sub.q[l + 16] = (qs[l] >> 4) as i32;
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
                sub.q[l] = ((qs[l] & 0x0f) as u32 | h0) as i32;
                sub.q[l + 16] = ((qs[l] >> 4) as u32 | h1) as i32;
            }
            sub.scale = d;
            sub.min = m;
            out.push(sub);
        }
        GgmlDType::Q8_0 => {
            let d = f16_at(b, 0);
            for l in 0..BLOCK {
                sub.q[l] = b[2 + l] as i8 as i32;
            }
            sub.scale = d;
            sub.min = -128.0 * d;
            out.push(sub);
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let (qh, ql) = if dtype == GgmlDType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for chunk in 0..4 {
                let q = &ql[chunk * 32..chunk * 32 + 32];
                for half in 0..2 {
                    let j = chunk * 2 + half;
                    let (sc, m) = scale_min_k4(j, scales);
                    let mut s = Sub { q: [0; BLOCK], scale: d * sc as f32, min: -(dmin * m as f32) };
                    for l in 0..32 {
                        let lo = if half == 0 { q[l] & 0x0f } else { q[l] >> 4 };
                        let hi = qh.map_or(0, |qh| if qh[l] & (1 << j) != 0 { 16 } else { 0 });
                        s.q[l] = (lo + hi) as i32;
                    }
                    out.push(s);
                }
            }
        }
        _ => {}
    }
}

/// Repacks `rows x cols` weights of `dtype`, or `None` when the type has no
/// affine form (the caller then keeps the GGUF bytes).
pub(super) fn affine(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Option<AffineMatrix> {
    let kind = match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => IntKind::U4,
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => IntKind::U5,
        GgmlDType::Q8_0 => IntKind::I8,
        _ => return None,
    };
    let bs = dtype.block_size();
    let ts = dtype.type_size();
    let nb_real = cols / BLOCK;
    let nb = nb_real.next_multiple_of(2);
    let pb = kind.pair_bytes();
    let mut q = vec![0u8; rows * nb / 2 * pb];
    let mut scale = vec![0f32; rows * nb];
    let mut min = vec![0f32; rows * nb];
    let mut subs = Vec::with_capacity(nb_real);
    let row_bytes = cols / bs * ts;
    for r in 0..rows {
        subs.clear();
        for blk in data[r * row_bytes..(r + 1) * row_bytes].chunks_exact(ts) {
            decode(dtype, blk, &mut subs);
        }
        let qrow = &mut q[r * nb / 2 * pb..(r + 1) * nb / 2 * pb];
        for (j, s) in subs.iter().enumerate() {
            scale[r * nb + j] = s.scale;
            min[r * nb + j] = s.min;
            let pair = &mut qrow[(j / 2) * pb..(j / 2 + 1) * pb];
            for (e, &v) in s.q.iter().enumerate() {
                let p = pair_pos(j & 1, e);
                match kind {
                    IntKind::U4 => {
                        if p < 32 {
                            pair[p] |= v as u8;
                        } else {
                            pair[p - 32] |= (v as u8) << 4;
                        }
                    }
                    IntKind::U5 | IntKind::I8 => pair[p] = v as u8,
                }
            }
        }
    }
    Some(AffineMatrix { rows, cols, nb, kind, q, scales: Scales::new(scale, min) })
}
