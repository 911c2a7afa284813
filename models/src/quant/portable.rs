//! The portable kernel (every non-x86 host, and the reference the SIMD
//! kernels are tested against), and reading single weights back.

use super::{AffineMatrix, BLOCK, IntKind, PAIR, QActs, RowScales, pair_pos};

impl AffineMatrix {
    /// Writes row `r` as `f32` into `out` (`cols` values); used for embeddings.
    pub(crate) fn row_f32(&self, r: usize, out: &mut [f32]) {
        let pb = self.kind.pair_bytes();
        let qrow = &self.q[r * self.nb / 2 * pb..(r + 1) * self.nb / 2 * pb];
        if self.kind == IntKind::U6 {
            for j in 0..self.cols / BLOCK {
                for e in 0..BLOCK {
                    let s = self.scales.q6_scale(r * self.nb * 2 + 2 * j + e / 16);
                    out[j * BLOCK + e] = s * (self.int_at(qrow, j, e) - 32) as f32;
                }
            }
            return;
        }
        let mut rs = RowScales::default();
        rs.fill(&self.scales, self.nb, r, 1);
        for j in 0..self.cols / BLOCK {
            let s = rs.scale[j];
            let m = if self.kind == IntKind::I8 { 0.0 } else { rs.min[j] };
            for e in 0..BLOCK {
                out[j * BLOCK + e] = s * self.int_at(qrow, j, e) as f32 + m;
            }
        }
    }

    /// The integer of element `e` of block `j` in a row's bytes.
    #[inline]
    fn int_at(&self, qrow: &[u8], j: usize, e: usize) -> i32 {
        let p = pair_pos(j & 1, e);
        let pair = &qrow[(j / 2) * self.kind.pair_bytes()..];
        let nibble = |pair: &[u8]| if p < 32 { pair[p] & 0x0f } else { pair[p - 32] >> 4 } as i32;
        match self.kind {
            IntKind::U4 => nibble(pair),
            IntKind::U5 => nibble(pair) | ((((pair[32 + p / 8] >> (p % 8)) & 1) as i32) << 4),
            IntKind::U6 => nibble(pair) | ((((pair[32 + p % 16] >> (2 * (p / 16))) & 3) as i32) << 4),
            IntKind::I8 => pair[p] as i8 as i32,
        }
    }

    /// The 64 integers of a pair as signed values (Q6_K's less its offset 32).
    #[inline]
    fn pair_ints(&self, bytes: &[u8], w: &mut [i16; PAIR]) {
        match self.kind {
            IntKind::I8 => w.iter_mut().zip(bytes).for_each(|(w, &b)| *w = b as i8 as i16),
            _ => {
                for k in 0..32 {
                    w[k] = (bytes[k] & 0x0f) as i16;
                    w[k + 32] = (bytes[k] >> 4) as i16;
                }
                if self.kind == IntKind::U5 {
                    let bits = bytes[32..40].iter().rev().fold(0u64, |w, &b| (w << 8) | b as u64);
                    for (p, w) in w.iter_mut().enumerate() {
                        *w |= (((bits >> p) & 1) as i16) << 4;
                    }
                } else if self.kind == IntKind::U6 {
                    for (p, w) in w.iter_mut().enumerate() {
                        *w = (*w | ((((bytes[32 + p % 16] >> (2 * (p / 16))) & 3) as i16) << 4)) - 32;
                    }
                }
            }
        }
    }

    /// The portable kernel, and the reference the SIMD kernels are tested against.
    pub(crate) fn dot_rows_portable(&self, r0: usize, r1: usize, a: &QActs, out: &mut [f32], ld: usize) {
        let nb = self.nb;
        let pb = self.kind.pair_bytes();
        let q6 = self.kind == IntKind::U6;
        let mut w = [0i16; PAIR];
        let mut rs = RowScales::default();
        for r in r0..r1 {
            if !q6 {
                rs.fill(&self.scales, nb, r, 1);
            }
            let qrow = &self.q[r * nb / 2 * pb..(r + 1) * nb / 2 * pb];
            for t in 0..a.tokens {
                let aq = &a.q[t * nb * BLOCK..(t + 1) * nb * BLOCK];
                let ad = &a.d[t * nb..(t + 1) * nb];
                let mut acc = 0f32;
                for p in 0..nb / 2 {
                    self.pair_ints(&qrow[p * pb..(p + 1) * pb], &mut w);
                    // Eight lanes per half of the pair: within every 8
                    // positions the first four belong to the pair's first
                    // block, the last four to its second (see `pair_pos`);
                    // the first half holds elements 0-15 of both blocks.
                    // Written so compilers vectorize it (SSE2, NEON).
                    let ap = &aq[p * PAIR..(p + 1) * PAIR];
                    let mut lanes = [[0i32; 8]; 2];
                    for (h, lanes) in lanes.iter_mut().enumerate() {
                        let (wh, ah) = (&w[h * 32..h * 32 + 32], &ap[h * 32..h * 32 + 32]);
                        for (wc, ac) in wh.chunks_exact(8).zip(ah.chunks_exact(8)) {
                            for e in 0..8 {
                                lanes[e] += wc[e] as i32 * ac[e] as i32;
                            }
                        }
                    }
                    // [half][block]
                    let part = |h: usize, b: usize| lanes[h][4 * b..4 * b + 4].iter().sum::<i32>();
                    if q6 {
                        // Groups of 16 weights: 2 * block + half.
                        for b in 0..2 {
                            for h in 0..2 {
                                let s = self.scales.q6_scale(r * nb * 2 + 4 * p + 2 * b + h);
                                acc += part(h, b) as f32 * (s * ad[2 * p + b]);
                            }
                        }
                    } else {
                        for b in 0..2 {
                            let j = 2 * p + b;
                            acc += (part(0, b) + part(1, b)) as f32 * (rs.scale[j] * ad[j]);
                        }
                    }
                }
                if self.kind != IntKind::I8 && !q6 {
                    for j in 0..nb {
                        acc += rs.min[j] * a.s[t * nb + j];
                    }
                }
                out[t * ld + r] = acc;
            }
        }
    }
}
