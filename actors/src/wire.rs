//! Conversions between the engine's types and their wire forms, in one
//! place: sampling parameters travel as [`SamplingSpec`] in session opens.

use fogmesh_models::SamplingParams;
use fogmesh_protocols::SamplingSpec;

/// The wire form of `p` (counts saturate at `u32::MAX`).
pub fn sampling_spec(p: &SamplingParams) -> SamplingSpec {
    SamplingSpec {
        temperature: p.temperature,
        top_k: p.top_k.min(u32::MAX as usize) as u32,
        top_p: p.top_p,
        repetition_penalty: p.repetition_penalty,
        repeat_last_n: p.repeat_last_n.min(u32::MAX as usize) as u32,
        seed: p.seed,
    }
}

/// The parameters a stage samples with, from the wire (checked by the
/// sampler it builds).
pub fn sampling_params(s: &SamplingSpec) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        repetition_penalty: s.repetition_penalty,
        repeat_last_n: s.repeat_last_n as usize,
        seed: s.seed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sampling_survives_the_round_trip(t in 0f32..2.0, k in 0usize..1000, p in 0.01f32..1.0, r in 0.1f32..10.0, n in 0usize..512, seed: u64) {
            let params = SamplingParams { temperature: t, top_k: k, top_p: p, repetition_penalty: r, repeat_last_n: n, seed };
            prop_assert_eq!(sampling_params(&sampling_spec(&params)), params);
        }
    }
}
