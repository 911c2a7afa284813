//! Per-block scales and minimums of an [`AffineMatrix`](super::AffineMatrix),
//! held in no more bytes than the GGUF file holds them: decode streams every
//! weight byte once per token, so bytes are time.

use half::f16;

/// How the scales (and minimums, `w = scale * q + min`) of a matrix's 32-weight
/// blocks are stored. Indices are `row * nb + block` unless said otherwise.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scales {
    /// A scale and a minimum per block, as f16 (Q4_1, Q5_1).
    F16 { scale: Vec<f16>, min: Vec<f16> },
    /// A scale and a minimum per block, as f32 (any type whose values f16
    /// cannot hold exactly).
    F32 { scale: Vec<f32>, min: Vec<f32> },
    /// A scale per block; the minimum is `c * scale` (Q4_0: -8, Q5_0: -16,
    /// Q8_0: -128, the offset of its integers in the kernels).
    Symmetric { scale: Vec<f16>, c: f32 },
    /// K-quant super-blocks of eight blocks (Q4_K, Q5_K), as in the file: per
    /// super-block `d`, `dmin` and 12 bytes of 6-bit block scales and
    /// minimums; block `j`'s scale is `d * sc_j`, its minimum `-dmin * m_j`.
    /// Indices are `row * nb / 8 + super-block`.
    K { d: Vec<f16>, dmin: Vec<f16>, packed: Vec<u8> },
    /// Q6_K: a signed 8-bit scale per 16 weights (`row * nb * 2 + i`) and an
    /// f16 `d` per 256 weights (`row * nb / 8 + i`); weights are
    /// `d * sc * (q - 32)`. Only [`IntKind::U6`](super::IntKind::U6) uses it.
    Q6 { d: Vec<f16>, sc: Vec<i8> },
}

/// Bytes of packed 6-bit scales and minimums per K-quant super-block.
pub(crate) const K_PACKED: usize = 12;

/// The 6-bit scale and minimum of block `j` of a Q4_K/Q5_K super-block,
/// as ggml reads them (the test of [`k_scales_mins`]).
#[cfg(test)]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// All eight 6-bit scales and minimums of a Q4_K/Q5_K super-block (as
/// [`scale_min_k4`] gives them one by one), with a few word operations.
#[inline]
pub(crate) fn k_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (w0, w1, w2) = (w(0), w(4), w(8));
    let lo6 = 0x3f3f_3f3f;
    let (nib, top2) = (0x0f0f_0f0f, 0x0303_0303);
    let sc_hi = (w2 & nib) | (((w0 >> 6) & top2) << 4);
    let m_hi = ((w2 >> 4) & nib) | (((w1 >> 6) & top2) << 4);
    let join = |lo: u32, hi: u32| ((lo as u64) | ((hi as u64) << 32)).to_le_bytes();
    (join(w0 & lo6, sc_hi), join(w1 & lo6, m_hi))
}

impl Scales {
    /// Per-block scales and minimums as decoded, stored f16 when every value
    /// survives the round trip, f32 otherwise.
    pub(crate) fn affine(scale: Vec<f32>, min: Vec<f32>) -> Self {
        let exact = |v: &[f32]| v.iter().all(|&x| f16::from_f32(x).to_f32() == x);
        if exact(&scale) && exact(&min) {
            let h = |v: Vec<f32>| v.into_iter().map(f16::from_f32).collect();
            Scales::F16 { scale: h(scale), min: h(min) }
        } else {
            Scales::F32 { scale, min }
        }
    }

    /// Writes the f32 scales and minimums of blocks `[j0, j0 + n)` of the
    /// flat block index (`row * nb + block`) into `scale` and `min`.
    /// Not for [`Scales::Q6`], whose scales are per 16 weights.
    pub(crate) fn unpack(&self, j0: usize, scale: &mut [f32], min: &mut [f32]) {
        let n = scale.len();
        match self {
            Scales::F16 { scale: s, min: m } => {
                for i in 0..n {
                    scale[i] = s[j0 + i].to_f32();
                    min[i] = m[j0 + i].to_f32();
                }
            }
            Scales::F32 { scale: s, min: m } => {
                scale.copy_from_slice(&s[j0..j0 + n]);
                min.copy_from_slice(&m[j0..j0 + n]);
            }
            Scales::Symmetric { scale: s, c } => {
                for i in 0..n {
                    scale[i] = s[j0 + i].to_f32();
                    min[i] = c * scale[i];
                }
            }
            Scales::K { d, dmin, packed } => {
                // Whole super-blocks at a time where the range allows.
                let mut i = 0;
                while i < n {
                    let j = j0 + i;
                    let sb = j / 8;
                    let (sc, m) = k_scales_mins(&packed[sb * K_PACKED..(sb + 1) * K_PACKED]);
                    let (dd, dm) = (d[sb].to_f32(), dmin[sb].to_f32());
                    let (k0, k1) = (j % 8, (8 - j % 8).min(n - i));
                    for k in 0..k1 {
                        scale[i + k] = dd * sc[k0 + k] as f32;
                        min[i + k] = -(dm * m[k0 + k] as f32);
                    }
                    i += k1;
                }
            }
            Scales::Q6 { .. } => unreachable!("Q6_K scales are per 16 weights"),
        }
    }

    /// The f32 scale of 16-weight group `g` (`row * nb * 2 + i`) of a Q6_K matrix.
    #[inline]
    pub(crate) fn q6_scale(&self, g: usize) -> f32 {
        match self {
            Scales::Q6 { d, sc } => d[g / 16].to_f32() * sc[g] as f32,
            _ => unreachable!("not a Q6_K matrix"),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Scales::F16 { scale, min } => 2 * (scale.len() + min.len()),
            Scales::F32 { scale, min } => 4 * (scale.len() + min.len()),
            Scales::Symmetric { scale, .. } => 2 * scale.len(),
            Scales::K { d, dmin, packed } => 2 * (d.len() + dmin.len()) + packed.len(),
            Scales::Q6 { d, sc } => 2 * d.len() + sc.len(),
        }
    }

    /// Appends `other`; `false` when the storage types differ.
    pub(crate) fn extend(&mut self, other: &Scales) -> bool {
        match (self, other) {
            (Scales::F16 { scale, min }, Scales::F16 { scale: s, min: m }) => {
                scale.extend_from_slice(s);
                min.extend_from_slice(m);
            }
            (Scales::F32 { scale, min }, Scales::F32 { scale: s, min: m }) => {
                scale.extend_from_slice(s);
                min.extend_from_slice(m);
            }
            (Scales::Symmetric { scale, c }, Scales::Symmetric { scale: s, c: c2 }) if c == c2 => {
                scale.extend_from_slice(s);
            }
            (Scales::K { d, dmin, packed }, Scales::K { d: d2, dmin: m2, packed: p2 }) => {
                d.extend_from_slice(d2);
                dmin.extend_from_slice(m2);
                packed.extend_from_slice(p2);
            }
            (Scales::Q6 { d, sc }, Scales::Q6 { d: d2, sc: s2 }) => {
                d.extend_from_slice(d2);
                sc.extend_from_slice(s2);
            }
            _ => return false,
        }
        true
    }

    pub(crate) fn empty_like(&self) -> Scales {
        match self {
            Scales::F16 { .. } => Scales::F16 { scale: vec![], min: vec![] },
            Scales::F32 { .. } => Scales::F32 { scale: vec![], min: vec![] },
            Scales::Symmetric { c, .. } => Scales::Symmetric { scale: vec![], c: *c },
            Scales::K { .. } => Scales::K { d: vec![], dmin: vec![], packed: vec![] },
            Scales::Q6 { .. } => Scales::Q6 { d: vec![], sc: vec![] },
        }
    }
}

/// Per-row f32 scales and minimums, unpacked once per row (or tile of rows)
/// for the kernels when the matrix stores them packed.
#[derive(Debug, Default)]
pub(crate) struct RowScales {
    pub(crate) scale: Vec<f32>,
    pub(crate) min: Vec<f32>,
}

impl RowScales {
    /// Unpacks rows `[r, r + n)` of a matrix with `nb` blocks per row.
    pub(crate) fn fill(&mut self, s: &Scales, nb: usize, r: usize, n: usize) {
        self.scale.resize(n * nb, 0.0);
        self.min.resize(n * nb, 0.0);
        s.unpack(r * nb, &mut self.scale[..n * nb], &mut self.min[..n * nb]);
    }
}
