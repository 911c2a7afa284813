//! Choosing an activation encoding for a link.
//!
//! Sending `raw` bytes of f32 activation over a link costs
//! `encode + latency + wire / bandwidth + decode`, where `wire` is the
//! encoded size. [`choose_encoding`] picks the encoding with the lowest cost
//! among those no lossier than the caller's floor. When several cost about the
//! same (within 1% of the cheapest, or within 5% of the stage's compute time,
//! which the pipeline hides anyway), it takes the least lossy of them.

use crate::activation::{Encoding, WireDType};

/// What is known of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkStats {
    /// Bytes per second.
    pub bandwidth: f64,
    /// One-way latency in seconds.
    pub latency: f64,
}

/// Measured speed and size of one encoding, relative to raw f32 bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecProfile {
    /// The encoding.
    pub encoding: Encoding,
    /// f32 bytes encoded per second.
    pub encode_rate: f64,
    /// f32 bytes decoded per second.
    pub decode_rate: f64,
    /// Encoded bytes per f32 byte.
    pub ratio: f64,
}

impl CodecProfile {
    /// Seconds to move `raw` f32 bytes over `link` with this encoding.
    pub fn cost(&self, raw: f64, link: &LinkStats) -> f64 {
        raw / self.encode_rate + link.latency + raw * self.ratio / link.bandwidth + raw / self.decode_rate
    }
}

/// Defaults for one core of a small x86 host, rounded down from the 128-token
/// prefill row of `examples/codec_bench.rs` on SmolLM2 hidden states (see
/// BENCHMARKS.md); callers should measure their own with
/// [`crate::activation::ActivationCodec`] and pass them instead.
pub fn default_profiles() -> Vec<CodecProfile> {
    let p = |dtype, zstd, enc: f64, dec: f64, ratio| CodecProfile {
        encoding: Encoding { dtype, zstd },
        encode_rate: enc * 1e9,
        decode_rate: dec * 1e9,
        ratio,
    };
    vec![
        p(WireDType::F32, None, 20.0, 20.0, 1.0),
        p(WireDType::F32, Some(1), 1.0, 1.3, 0.93),
        p(WireDType::F16, None, 2.0, 12.0, 0.5),
        p(WireDType::F16, Some(1), 1.0, 2.2, 0.47),
        p(WireDType::Bf16, None, 9.0, 15.0, 0.5),
        p(WireDType::Bf16, Some(1), 1.7, 2.2, 0.40),
        p(WireDType::Int8Outliers, None, 1.7, 15.0, 0.27),
        p(WireDType::Int8Outliers, Some(1), 1.2, 3.8, 0.24),
        p(WireDType::Int8, None, 2.6, 15.0, 0.26),
        p(WireDType::Int8, Some(1), 1.6, 5.5, 0.16),
    ]
}

/// Picks the encoding for `raw` f32 bytes over `link`, never lossier than
/// `floor`, given `compute` seconds of stage work the transfer overlaps with.
/// Returns lossless f32 if no profile qualifies.
pub fn choose_encoding(raw: usize, link: &LinkStats, compute: f64, floor: WireDType, profiles: &[CodecProfile]) -> Encoding {
    let raw = raw as f64;
    let allowed: Vec<(f64, &CodecProfile)> = profiles
        .iter()
        .filter(|p| p.encoding.dtype <= floor)
        .map(|p| (p.cost(raw, link), p))
        .filter(|(c, _)| c.is_finite())
        .collect();
    let Some(best) = allowed.iter().map(|(c, _)| *c).min_by(f64::total_cmp) else {
        return Encoding::F32;
    };
    let slack = (best * 0.01).max(compute.max(0.0) * 0.05);
    allowed
        .iter()
        .filter(|(c, _)| *c <= best + slack)
        // Least lossy first; then uncompressed before compressed; then cheapest.
        .min_by(|(ca, a), (cb, b)| {
            (a.encoding.dtype, a.encoding.zstd.is_some())
                .cmp(&(b.encoding.dtype, b.encoding.zstd.is_some()))
                .then(ca.total_cmp(cb))
        })
        .map_or(Encoding::F32, |(_, p)| p.encoding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LAN: LinkStats = LinkStats { bandwidth: 1.25e9, latency: 0.0002 };
    const SLOW: LinkStats = LinkStats { bandwidth: 1.25e6, latency: 0.02 };

    #[test]
    fn fast_links_keep_precision_slow_links_shrink_bytes() {
        let p = default_profiles();
        let raw = 576 * 4 * 128;
        assert_eq!(choose_encoding(raw, &LAN, 0.01, WireDType::Int8, &p).dtype, WireDType::F32);
        let slow = choose_encoding(raw, &SLOW, 0.01, WireDType::Int8, &p);
        assert!(slow.dtype >= WireDType::Int8Outliers, "{slow:?}");
        let slow_f16 = choose_encoding(raw, &SLOW, 0.01, WireDType::F16, &p);
        assert!(slow_f16.dtype <= WireDType::F16);
        assert_eq!(choose_encoding(raw, &SLOW, 0.01, WireDType::F32, &p).dtype, WireDType::F32);
    }

    proptest! {
        #[test]
        fn never_lossier_than_the_floor_and_never_worse_than_allowed(
            raw in 1usize..50_000_000, bw in 1e4f64..1e11, lat in 0f64..0.5, compute in 0f64..1.0, floor in 0usize..5,
        ) {
            let p = default_profiles();
            let link = LinkStats { bandwidth: bw, latency: lat };
            let floor = WireDType::ALL[floor];
            let e = choose_encoding(raw, &link, compute, floor, &p);
            prop_assert!(e.dtype <= floor);
            let cost = |e: Encoding| p.iter().find(|q| q.encoding == e).unwrap().cost(raw as f64, &link);
            let best = p.iter().filter(|q| q.encoding.dtype <= floor).map(|q| q.cost(raw as f64, &link)).fold(f64::INFINITY, f64::min);
            prop_assert!(cost(e) <= best + (best * 0.01).max(compute * 0.05) + 1e-12);
        }
    }
}
