//! The activation codec: hidden states `[tokens, width]` on the wire.
//!
//! ```text
//! offset size field
//!      0    1 'A'
//!      1    1 codec version (1)
//!      2    1 dtype: 0 f32, 1 f16, 2 bf16, 3 int8 with one f16 scale per
//!             row after each row's 8 largest values are set apart in f16,
//!             4 int8 with one f32 scale per row
//!      3    1 compression: 0 none, 1 zstd
//!      4    4 tokens
//!      8    4 width
//!     12    4 body length (bytes after the header, compressed or not)
//!     16    … body: int8 with outliers puts the outliers (u16 index, f16
//!             value) of every row first, then the f16 row scales, then the
//!             values; per-row int8 puts the f32 scales, then the values
//! ```
//!
//! The decoder computes the exact raw body size from the header, checks it
//! (and the f32 output size) against [`Limits::max_decoded`] before
//! allocating, and decompresses into a buffer of exactly that capacity, so a
//! lying header or a zstd bomb is an error, never an allocation past the
//! limit. Encoder and decoder keep their buffers and zstd contexts between
//! calls.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

use crate::error::{ProtocolError, Result};
use crate::frame::Limits;

const _: () = assert!(cfg!(target_endian = "little"), "the activation codec assumes a little-endian host");

/// Bytes of the activation header.
pub const ACT_HEADER_LEN: usize = 16;
const ACT_MAGIC: u8 = b'A';
const ACT_VERSION: u8 = 1;

/// Element type on the wire, from exact to lossiest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WireDType {
    /// 4 bytes, exact.
    F32 = 0,
    /// 2 bytes, relative error at most 2^-11 (values must fit f16's range).
    F16 = 1,
    /// 2 bytes, relative error at most 2^-8.
    Bf16 = 2,
    /// 1 byte per value and an f16 scale per row, after the row's 8
    /// largest-magnitude values are set apart in f16: a transformer's outlier
    /// dimensions (tens of times the median) would otherwise make the step too
    /// coarse for every other value. Absolute error at most
    /// max|row without outliers| / 254 (plus the scale's f16 rounding);
    /// outliers within f16's 2^-11.
    Int8Outliers = 3,
    /// 1 byte per value and an f32 scale per row; absolute error at most
    /// max|row| / 254.
    Int8 = 4,
}

/// Values per row [`WireDType::Int8Outliers`] sends apart in f16.
pub(crate) const OUTLIERS: usize = 8;

/// The `k` largest magnitudes of `row` with their indices, largest first
/// (ties keep the lower index), into `out`. One pass over a small sorted list:
/// cheap because almost every value loses its first comparison.
fn top_k(row: &[f32], k: usize, out: &mut Vec<(f32, u32)>) {
    let k = k.min(row.len());
    out.clear();
    out.resize(k, (-1.0, 0));
    if k == 0 {
        return;
    }
    for (i, v) in row.iter().enumerate() {
        let m = v.abs();
        // `!(m <= ..)` also lets NaN in, so callers see it at the top.
        if m <= out[k - 1].0 {
            continue;
        }
        if m.is_nan() {
            out[0] = (f32::NAN, i as u32);
            return;
        }
        let mut j = k - 1;
        while j > 0 && out[j - 1].0 < m {
            out[j] = out[j - 1];
            j -= 1;
        }
        out[j] = (m, i as u32);
    }
}

/// `x` (within ±127 after clamping) rounded half away from zero, as `i8` bits.
/// Written so it vectorizes without SSE4.1's `round`.
#[inline]
fn round_i8(x: f32) -> u8 {
    let x = x.clamp(-127.0, 127.0);
    (x + 0.5f32.copysign(x)) as i32 as i8 as u8
}

impl WireDType {
    /// Every type, exact first.
    pub const ALL: [WireDType; 5] =
        [WireDType::F32, WireDType::F16, WireDType::Bf16, WireDType::Int8Outliers, WireDType::Int8];

    fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    /// Raw body bytes for `tokens` rows of `width` values.
    pub fn raw_len(self, tokens: usize, width: usize) -> Option<usize> {
        let n = tokens.checked_mul(width)?;
        match self {
            WireDType::F32 => n.checked_mul(4),
            WireDType::F16 | WireDType::Bf16 => n.checked_mul(2),
            WireDType::Int8Outliers => n.checked_add(tokens.checked_mul(width.min(OUTLIERS) * 4 + 2)?),
            WireDType::Int8 => n.checked_add(tokens.checked_mul(4)?),
        }
    }
}

/// How an activation is encoded: element type, then optional zstd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encoding {
    /// Element type.
    pub dtype: WireDType,
    /// zstd level (1..=22), or `None` for no compression.
    pub zstd: Option<i32>,
}

impl Encoding {
    /// Lossless, uncompressed.
    pub const F32: Encoding = Encoding { dtype: WireDType::F32, zstd: None };

    /// A short name, e.g. `f16+zstd1`.
    pub fn name(&self) -> String {
        let d = match self.dtype {
            WireDType::F32 => "f32",
            WireDType::F16 => "f16",
            WireDType::Bf16 => "bf16",
            WireDType::Int8Outliers => "int8o",
            WireDType::Int8 => "int8",
        };
        match self.zstd {
            Some(l) => format!("{d}+zstd{l}"),
            None => d.to_string(),
        }
    }
}

/// The shape and encoding read from an activation header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationInfo {
    /// Rows.
    pub tokens: usize,
    /// Values per row.
    pub width: usize,
    /// How it was encoded (the zstd level is not recorded: `Some(0)`).
    pub encoding: Encoding,
}

/// Reusable encoder/decoder state (buffers and zstd contexts).
#[derive(Default)]
pub struct ActivationCodec {
    raw: Vec<u8>,
    halfs: Vec<u16>,
    top: Vec<(f32, u32)>,
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for ActivationCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationCodec").field("buffer", &self.raw.capacity()).finish()
    }
}

fn bad(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidActivation(msg.into())
}

fn zstd_err(e: std::io::Error) -> ProtocolError {
    ProtocolError::Zstd(e.to_string())
}

fn as_bytes<T>(v: &[T]) -> &[u8] {
    // SAFETY: reading the bytes of plain numeric values.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl ActivationCodec {
    /// A codec with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `x` (`tokens * width` values, row-major) encoded as `enc` to `out`.
    pub fn encode(&mut self, x: &[f32], tokens: usize, width: usize, enc: Encoding, out: &mut Vec<u8>) -> Result<()> {
        if tokens.checked_mul(width) != Some(x.len()) || width == 0 {
            return Err(ProtocolError::Encode(format!("{} values are not {tokens} rows of {width}", x.len())));
        }
        let (Ok(t32), Ok(w32)) = (u32::try_from(tokens), u32::try_from(width)) else {
            return Err(ProtocolError::Encode("shape does not fit 32 bits".into()));
        };
        let raw = &mut self.raw;
        raw.clear();
        match enc.dtype {
            WireDType::F32 => raw.extend_from_slice(as_bytes(x)),
            WireDType::F16 => {
                if let Some(v) = x.iter().find(|v| v.abs() > f16::MAX.to_f32()) {
                    return Err(ProtocolError::Encode(format!("value {v} is outside f16's range; use bf16 or f32")));
                }
                self.halfs.resize(x.len(), 0);
                let h: &mut [f16] = self.halfs.reinterpret_cast_mut();
                h.convert_from_f32_slice(x);
                raw.extend_from_slice(as_bytes(&self.halfs));
            }
            WireDType::Bf16 => {
                self.halfs.resize(x.len(), 0);
                let h: &mut [bf16] = self.halfs.reinterpret_cast_mut();
                h.convert_from_f32_slice(x);
                raw.extend_from_slice(as_bytes(&self.halfs));
            }
            WireDType::Int8Outliers => {
                let k = width.min(OUTLIERS);
                raw.resize(tokens * (k * 4 + 2) + x.len(), 0);
                let (outl, rest) = raw.split_at_mut(tokens * k * 4);
                let (scales, vals) = rest.split_at_mut(tokens * 2);
                let top = &mut self.top;
                for (t, row) in x.chunks_exact(width).enumerate() {
                    // The k largest magnitudes travel apart; the next one sets the scale.
                    top_k(row, k + 1, top);
                    if !(top[0].0 <= f16::MAX.to_f32()) {
                        return Err(ProtocolError::Encode(format!("row {t} holds a value beyond f16; use bf16 or f32")));
                    }
                    let rest_max = top.get(k).map_or(0.0, |e| e.0);
                    let scale = f16::from_f32(rest_max / 127.0);
                    let sf = scale.to_f32();
                    let inv = if sf > 0.0 { 1.0 / sf } else { 0.0 };
                    scales[2 * t..2 * t + 2].copy_from_slice(&scale.to_le_bytes());
                    let vrow = &mut vals[t * width..(t + 1) * width];
                    for (q, &v) in vrow.iter_mut().zip(row) {
                        *q = round_i8(v * inv);
                    }
                    let outliers = &mut top[..k];
                    outliers.sort_unstable_by_key(|e| e.1);
                    for (j, &(_, i)) in outliers.iter().enumerate() {
                        let o = &mut outl[(t * k + j) * 4..(t * k + j) * 4 + 4];
                        o[..2].copy_from_slice(&(i as u16).to_le_bytes());
                        o[2..].copy_from_slice(&f16::from_f32(row[i as usize]).to_le_bytes());
                        vrow[i as usize] = 0;
                    }
                }
            }
            WireDType::Int8 => {
                raw.resize(tokens * 4 + x.len(), 0);
                let (scales, vals) = raw.split_at_mut(tokens * 4);
                for (t, row) in x.chunks_exact(width).enumerate() {
                    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if !amax.is_finite() {
                        return Err(ProtocolError::Encode("row holds NaN or infinity".into()));
                    }
                    let scale = amax / 127.0;
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    scales[t * 4..t * 4 + 4].copy_from_slice(&scale.to_le_bytes());
                    for (q, &v) in vals[t * width..(t + 1) * width].iter_mut().zip(row) {
                        *q = round_i8(v * inv);
                    }
                }
            }
        }
        let start = out.len();
        out.extend_from_slice(&[ACT_MAGIC, ACT_VERSION, enc.dtype as u8, u8::from(enc.zstd.is_some())]);
        out.extend_from_slice(&t32.to_le_bytes());
        out.extend_from_slice(&w32.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let body_len = match enc.zstd {
            None => {
                out.extend_from_slice(&self.raw);
                self.raw.len()
            }
            Some(level) => {
                let c = match &mut self.compressor {
                    Some((l, c)) if *l == level => c,
                    slot => &mut slot.insert((level, zstd::bulk::Compressor::new(level).map_err(zstd_err)?)).1,
                };
                let bound = zstd::zstd_safe::compress_bound(self.raw.len());
                let body_start = out.len();
                out.resize(body_start + bound, 0);
                let n = c.compress_to_buffer(&self.raw, &mut out[body_start..]).map_err(zstd_err)?;
                out.truncate(body_start + n);
                n
            }
        };
        let body_len = u32::try_from(body_len).map_err(|_| ProtocolError::Encode("body over 4 GiB".into()))?;
        out[start + 12..start + 16].copy_from_slice(&body_len.to_le_bytes());
        Ok(())
    }

    /// Reads only the header of an encoded activation, checking it against the
    /// limits and the bytes present.
    pub fn info(bytes: &[u8], limits: &Limits) -> Result<ActivationInfo> {
        let h = bytes.get(..ACT_HEADER_LEN).ok_or(ProtocolError::Truncated {
            what: "activation header",
            need: ACT_HEADER_LEN as u64,
            have: bytes.len() as u64,
        })?;
        if h[0] != ACT_MAGIC {
            return Err(bad(format!("bad magic byte {:#04x}", h[0])));
        }
        if h[1] != ACT_VERSION {
            return Err(bad(format!("unsupported codec version {}", h[1])));
        }
        let dtype = WireDType::from_u8(h[2]).ok_or_else(|| bad(format!("unknown dtype {}", h[2])))?;
        let zstd = match h[3] {
            0 => None,
            1 => Some(0),
            c => return Err(bad(format!("unknown compression {c}"))),
        };
        let tokens = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let width = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let body = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as u64;
        if tokens == 0 || width == 0 {
            return Err(bad(format!("empty shape [{tokens}, {width}]")));
        }
        let out_bytes = tokens.checked_mul(width).and_then(|n| n.checked_mul(4));
        let raw = dtype.raw_len(tokens, width);
        match (out_bytes, raw) {
            (Some(o), Some(r)) if o <= limits.max_decoded && r <= limits.max_decoded => {}
            _ => {
                return Err(ProtocolError::TooLargeDecoded {
                    len: (tokens as u64).saturating_mul(width as u64).saturating_mul(4),
                    max: limits.max_decoded as u64,
                });
            }
        }
        let have = (bytes.len() - ACT_HEADER_LEN) as u64;
        if have != body {
            return Err(bad(format!("header announces a body of {body} bytes, {have} present")));
        }
        Ok(ActivationInfo { tokens, width, encoding: Encoding { dtype, zstd } })
    }

    /// Decodes `bytes` into `out` (resized to `tokens * width`).
    pub fn decode(&mut self, bytes: &[u8], limits: &Limits, out: &mut Vec<f32>) -> Result<ActivationInfo> {
        let info = Self::info(bytes, limits)?;
        let (tokens, width) = (info.tokens, info.width);
        let n = tokens * width;
        let raw_len = info.encoding.dtype.raw_len(tokens, width).unwrap_or(usize::MAX);
        let body = &bytes[ACT_HEADER_LEN..];
        let raw: &[u8] = if info.encoding.zstd.is_some() {
            let d = match &mut self.decompressor {
                Some(d) => d,
                slot => slot.insert(zstd::bulk::Decompressor::new().map_err(zstd_err)?),
            };
            self.raw.clear();
            // Capacity is the bound: zstd refuses to write past it.
            self.raw.reserve_exact(raw_len);
            let got = d.decompress_to_buffer(body, &mut self.raw).map_err(|e| {
                ProtocolError::Zstd(format!("{e} (the header promises {raw_len} raw bytes)"))
            })?;
            if got != raw_len {
                return Err(bad(format!("decompressed to {got} bytes, the shape needs {raw_len}")));
            }
            &self.raw
        } else {
            if body.len() != raw_len {
                return Err(bad(format!("{} body bytes, the shape [{tokens}, {width}] needs {raw_len}", body.len())));
            }
            body
        };
        out.clear();
        out.resize(n, 0.0);
        match info.encoding.dtype {
            WireDType::F32 => {
                for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            WireDType::F16 | WireDType::Bf16 => {
                self.halfs.clear();
                self.halfs.extend(raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
                if info.encoding.dtype == WireDType::F16 {
                    let h: &[f16] = self.halfs.reinterpret_cast();
                    h.convert_to_f32_slice(out);
                } else {
                    let h: &[bf16] = self.halfs.reinterpret_cast();
                    h.convert_to_f32_slice(out);
                }
            }
            WireDType::Int8Outliers => {
                let k = width.min(OUTLIERS);
                let (outl, rest) = raw.split_at(tokens * k * 4);
                let (scales, vals) = rest.split_at(tokens * 2);
                for t in 0..tokens {
                    let scale = f16::from_le_bytes([scales[2 * t], scales[2 * t + 1]]).to_f32();
                    if !scale.is_finite() || scale < 0.0 {
                        return Err(bad(format!("row {t} has scale {scale}")));
                    }
                    let orow = &mut out[t * width..(t + 1) * width];
                    for (o, &q) in orow.iter_mut().zip(&vals[t * width..(t + 1) * width]) {
                        *o = q as i8 as f32 * scale;
                    }
                    for o in outl[t * k * 4..(t + 1) * k * 4].chunks_exact(4) {
                        let i = u16::from_le_bytes([o[0], o[1]]) as usize;
                        let v = f16::from_le_bytes([o[2], o[3]]).to_f32();
                        if i >= width || !v.is_finite() {
                            return Err(bad(format!("row {t} has outlier {v} at index {i} of {width}")));
                        }
                        orow[i] = v;
                    }
                }
            }
            WireDType::Int8 => int8_rows(raw, tokens, width, out)?,
        }
        Ok(info)
    }
}

/// Decodes `tokens` f32 row scales followed by the int8 values into `out`.
fn int8_rows(raw: &[u8], tokens: usize, width: usize, out: &mut [f32]) -> Result<()> {
    let (scales, vals) = raw.split_at(tokens * 4);
    for t in 0..tokens {
        let s = &scales[t * 4..t * 4 + 4];
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        if !scale.is_finite() || scale < 0.0 {
            return Err(bad(format!("row {t} has scale {scale}")));
        }
        for (o, &q) in out[t * width..(t + 1) * width].iter_mut().zip(&vals[t * width..(t + 1) * width]) {
            *o = q as i8 as f32 * scale;
        }
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(x: &[f32], tokens: usize, enc: Encoding) -> Vec<f32> {
        let mut c = ActivationCodec::new();
        let mut wire = Vec::new();
        c.encode(x, tokens, x.len() / tokens, enc, &mut wire).unwrap();
        let mut out = Vec::new();
        let info = c.decode(&wire, &Limits::default(), &mut out).unwrap();
        assert_eq!((info.tokens, info.width, info.encoding.dtype), (tokens, x.len() / tokens, enc.dtype));
        out
    }

    fn rows() -> impl Strategy<Value = (usize, Vec<f32>)> {
        (1usize..6, 1usize..80).prop_flat_map(|(t, w)| (Just(t), proptest::collection::vec(-300f32..300.0, t * w)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn f32_is_exact((t, x) in rows(), z in proptest::option::of(1i32..4)) {
            prop_assert_eq!(round_trip(&x, t, Encoding { dtype: WireDType::F32, zstd: z }), x);
        }

        #[test]
        fn f16_error_is_bounded((t, x) in rows(), z in proptest::option::of(1i32..4)) {
            let y = round_trip(&x, t, Encoding { dtype: WireDType::F16, zstd: z });
            for (a, b) in x.iter().zip(&y) {
                // Relative 2^-11 for normal values, absolute 2^-25 below f16's normal range.
                prop_assert!((a - b).abs() <= a.abs() / 2048.0 + 3e-8, "{} vs {}", a, b);
            }
        }

        #[test]
        fn bf16_error_is_bounded((t, x) in rows(), z in proptest::option::of(1i32..4)) {
            let y = round_trip(&x, t, Encoding { dtype: WireDType::Bf16, zstd: z });
            for (a, b) in x.iter().zip(&y) {
                prop_assert!((a - b).abs() <= a.abs() / 256.0, "{} vs {}", a, b);
            }
        }

        #[test]
        fn int8_error_is_bounded_per_row((t, x) in rows(), z in proptest::option::of(1i32..4)) {
            let y = round_trip(&x, t, Encoding { dtype: WireDType::Int8, zstd: z });
            let w = x.len() / t;
            for r in 0..t {
                let amax = x[r * w..(r + 1) * w].iter().fold(0f32, |m, v| m.max(v.abs()));
                for i in r * w..(r + 1) * w {
                    prop_assert!((x[i] - y[i]).abs() <= amax / 254.0 * 1.0001 + 1e-6, "{} vs {}", x[i], y[i]);
                }
            }
        }

        #[test]
        fn int8_outliers_error_is_bounded((t, x) in rows(), z in proptest::option::of(1i32..4)) {
            let y = round_trip(&x, t, Encoding { dtype: WireDType::Int8Outliers, zstd: z });
            let w = x.len() / t;
            let k = w.min(OUTLIERS);
            for r in 0..t {
                let row = &x[r * w..(r + 1) * w];
                let mut idx: Vec<usize> = (0..w).collect();
                idx.sort_by(|&a, &b| row[b].abs().total_cmp(&row[a].abs()).then(a.cmp(&b)));
                let outliers = &idx[..k];
                let rest = idx.get(k).map_or(0.0, |&i| row[i].abs());
                for i in 0..w {
                    let (a, b) = (row[i], y[r * w + i]);
                    let bound = if outliers.contains(&i) {
                        a.abs() / 2048.0 + 3e-8
                    } else {
                        // Half a step, the step rounded to f16 (2^-11 relative, up to 127 steps).
                        rest / 254.0 + rest / 2048.0 + 1e-6
                    };
                    prop_assert!((a - b).abs() <= bound, "row {} col {}: {} vs {}", r, i, a, b);
                }
                // The largest magnitude travels exactly as f16.
                prop_assert_eq!(y[r * w + idx[0]], f16::from_f32(row[idx[0]]).to_f32());
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ActivationCodec::new().decode(&bytes, &Limits::default(), &mut Vec::new());
        }
    }

    fn encoded(enc: Encoding) -> Vec<u8> {
        let x: Vec<f32> = (0..64).map(|i| i as f32 * 0.5 - 7.0).collect();
        let mut wire = Vec::new();
        ActivationCodec::new().encode(&x, 4, 16, enc, &mut wire).unwrap();
        wire
    }

    #[test]
    fn malformed_activations_are_errors() {
        let l = Limits::default();
        let mut c = ActivationCodec::new();
        let mut out = Vec::new();
        let good = encoded(Encoding::F32);
        for cut in 0..good.len() {
            assert!(c.decode(&good[..cut], &l, &mut out).is_err(), "cut {cut}");
        }
        let mut b = good.clone();
        b[0] = b'X';
        assert!(c.decode(&b, &l, &mut out).unwrap_err().to_string().contains("magic"));
        let mut b = good.clone();
        b[1] = 2;
        assert!(c.decode(&b, &l, &mut out).unwrap_err().to_string().contains("version"));
        let mut b = good.clone();
        b[2] = 9;
        assert!(c.decode(&b, &l, &mut out).unwrap_err().to_string().contains("dtype"));
        // A shape that does not match the body.
        let mut b = good.clone();
        b[4..8].copy_from_slice(&5u32.to_le_bytes());
        assert!(c.decode(&b, &l, &mut out).is_err());
        // A shape past the limit is refused from the header alone.
        let mut b = good.clone();
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(c.decode(&b, &l, &mut out), Err(ProtocolError::TooLargeDecoded { .. })));
        // NaN scales in int8 are refused.
        let mut b = encoded(Encoding { dtype: WireDType::Int8, zstd: None });
        b[16..20].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(c.decode(&b, &l, &mut out).is_err());
        // Encoding checks its inputs too.
        assert!(c.encode(&[1.0; 5], 2, 2, Encoding::F32, &mut Vec::new()).is_err());
        assert!(c.encode(&[1e6; 4], 1, 4, Encoding { dtype: WireDType::F16, zstd: None }, &mut Vec::new()).is_err());
    }

    #[test]
    fn zstd_bombs_are_refused() {
        let l = Limits::default();
        // 64 MiB of zeros compress to a few KiB; a header claiming 16 values must not inflate them.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        let mut b = vec![ACT_MAGIC, ACT_VERSION, 0, 1];
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
        b.extend_from_slice(&bomb);
        let err = ActivationCodec::new().decode(&b, &l, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, ProtocolError::Zstd(_)), "{err:?}");
        // Garbage after a valid header.
        let mut g = encoded(Encoding { dtype: WireDType::F16, zstd: Some(1) });
        let n = g.len();
        g[n - 3] ^= 0xff;
        assert!(ActivationCodec::new().decode(&g, &l, &mut Vec::new()).is_err());
    }
}
