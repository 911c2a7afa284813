//! Hidden states that cross a lossy activation encoding at every stage
//! boundary leave greedy generation unchanged, by the engine's criterion
//! applied against the lossless run: the same tokens at every step before the
//! first near-tie (top-2 gap < 0.75) with top-1 logits within 1.0, and,
//! teacher forced, the same argmax wherever the winner is clear. (Logits
//! themselves move by up to ~1 even under f16: a tiny change at a boundary
//! flips int8 roundings of the next matmul inputs, as kernel differences do.)
//! Needs the default model (`fogmesh fetch`).

mod common;

use common::model_path;
use fogmesh::models::{LocalModel, LogitsFor, ModelError, SamplingParams, argmax, uneven_ranges};
use fogmesh::protocols::{ActivationCodec, Encoding, Limits, WireDType};

const PROMPTS: [&str; 6] = [
    "The capital of France is",
    "Once upon a time,",
    "def fibonacci(n):",
    "Fog computing moves computation from the cloud to",
    "<|im_start|>user\nList three uses of edge devices.<|im_end|>\n<|im_start|>assistant\n",
    "The three laws of robotics are",
];
const STEPS: usize = 32;
const GAP: f32 = 0.75;

fn gap(row: &[f32]) -> f32 {
    let best = argmax(row) as usize;
    let second = row.iter().enumerate().filter(|(i, _)| *i != best).map(|(_, v)| *v).fold(f32::MIN, f32::max);
    row[best] - second
}

/// Steps compared, or the first violation.
fn check(m: &LocalModel, enc: Option<Encoding>) -> Result<usize, String> {
    let mut codec = ActivationCodec::new();
    let mut wire = Vec::new();
    let width = m.config().hidden;
    let vocab = m.config().vocab;
    let limits = Limits::default();
    let mut compared = 0;
    for text in PROMPTS {
        let prompt = m.tokenizer().encode(text).unwrap();
        let base = m.generate(prompt.clone(), STEPS, SamplingParams::greedy(), vec![], 1, |_| {}).unwrap();
        let seq: Vec<u32> = prompt.iter().chain(&base.tokens).copied().collect();
        let want = m.forward(&mut m.new_session(), &seq, LogitsFor::All).unwrap();
        let Some(enc) = enc else { continue };
        let mut hook = |_: usize, h: &mut Vec<f32>| -> Result<(), ModelError> {
            wire.clear();
            codec.encode(h, h.len() / width, width, enc, &mut wire).map_err(|e| ModelError::Input(e.to_string()))?;
            codec.decode(&wire, &limits, h).map_err(|e| ModelError::Input(e.to_string()))?;
            Ok(())
        };
        let got = m
            .generate_hooked(prompt.clone(), STEPS, SamplingParams::greedy(), vec![], 1, |_| {}, &mut hook)
            .map_err(|e| e.to_string())?;
        for (i, (&g, &w)) in got.tokens.iter().zip(&base.tokens).enumerate() {
            let row = &want[(prompt.len() - 1 + i) * vocab..(prompt.len() + i) * vocab];
            if gap(row) < GAP {
                break;
            }
            let diff = (got.top_logits[i][0].logit - base.top_logits[i][0].logit).abs();
            if g != w || diff > 1.0 {
                return Err(format!("{text:?} step {i}: token {g} (lossless {w}), top-1 logit moved {diff:.3}"));
            }
            compared += 1;
        }
        let forced = m.forward_hooked(&mut m.new_session(), &seq, LogitsFor::All, &mut hook).map_err(|e| e.to_string())?;
        for at in prompt.len() - 1..seq.len() {
            let (w, f) = (&want[at * vocab..(at + 1) * vocab], &forced[at * vocab..(at + 1) * vocab]);
            let (bw, bf) = (argmax(w), argmax(f));
            if gap(w) >= GAP {
                if bw != bf {
                    return Err(format!("{text:?} forced position {at}: argmax {bf} (lossless {bw})"));
                }
                compared += 1;
            }
        }
    }
    Ok(compared)
}

#[test]
fn lossy_encodings_at_every_boundary_leave_greedy_generation_unchanged() {
    let Some(path) = model_path() else { return };
    for k in [3, 30] {
        let m = LocalModel::load(&path, Some(&uneven_ranges(30, k).unwrap()), 2).unwrap();
        for dtype in [WireDType::F16, WireDType::Bf16, WireDType::Int8Outliers] {
            for zstd in [None, Some(1)] {
                let enc = Encoding { dtype, zstd };
                let n = check(&m, Some(enc)).unwrap_or_else(|e| panic!("{k} stages, {}: {e}", enc.name()));
                assert!(n >= 100, "{}: only {n} steps compared", enc.name());
            }
        }
    }
}

/// Per-row int8 is not good enough for this model: its outlier dimensions
/// (up to ~50x the median magnitude) leave a step too coarse for the rest.
#[test]
fn per_row_int8_is_known_to_be_too_lossy() {
    let Some(path) = model_path() else { return };
    let m = LocalModel::load(&path, Some(&uneven_ranges(30, 3).unwrap()), 2).unwrap();
    assert!(check(&m, Some(Encoding { dtype: WireDType::Int8, zstd: None })).is_err());
}
