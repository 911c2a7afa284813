//! Activation codec benchmark on real SmolLM2 hidden states.
//!
//! Dumps the hidden states leaving layers 5, 15 and 25 for one decode token
//! and for a 128-token prefill, then reports, per encoding: bytes per token,
//! reduction against raw f32, and single-thread encode/decode speed (GB/s of
//! f32 data; median of repeated runs). Also checks that 32 greedy tokens of
//! each reference prompt are unchanged when every boundary of a 30-stage split
//! goes through the encoding.
//!
//! `cargo run --release --example codec_bench [-- --json]`

use std::time::Instant;

use anyhow::Result;
use fogmesh::models::{LocalModel, LogitsFor, SamplingParams, default_model_path, uneven_ranges};
use fogmesh::protocols::{ActivationCodec, Encoding, Limits, WireDType};
use fogmesh::models::stats::median;

const BOUNDARIES: [usize; 3] = [5, 15, 25];

fn encodings() -> Vec<Encoding> {
    let mut v = Vec::new();
    for dtype in WireDType::ALL {
        for zstd in [None, Some(-3), Some(-1), Some(1), Some(3)] {
            v.push(Encoding { dtype, zstd });
        }
    }
    v
}

/// Hidden states leaving the shards that end at `BOUNDARIES`, for `tokens`.
fn dump(model: &LocalModel, tokens: &[u32]) -> Result<Vec<(usize, Vec<f32>)>> {
    let mut caches = model.new_session();
    let mut out = Vec::new();
    let ends: Vec<usize> = model.shards().iter().map(|s| s.range().end).collect();
    model.forward_hooked(&mut caches, tokens, LogitsFor::Last, &mut |i, h| {
        if BOUNDARIES.contains(&ends[i]) {
            out.push((ends[i], h.clone()));
        }
        Ok(())
    })?;
    Ok(out)
}

fn main() -> Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    let path = default_model_path();
    let ranges = vec![0..5, 5..15, 15..25, 25..30];
    let model = LocalModel::load(&path, Some(&ranges), 1)?;
    let width = model.config().hidden;
    let text = "Fog computing brings computation close to where data is produced. ".repeat(12);
    let mut prompt = model.tokenizer().encode(&text)?;
    prompt.truncate(128);
    anyhow::ensure!(prompt.len() == 128, "prompt too short");
    // Decode: the hidden state of one token after a short context.
    let mut caches = model.new_session();
    model.forward(&mut caches, &prompt[..16], LogitsFor::Last)?;
    let mut decode = Vec::new();
    let ends: Vec<usize> = model.shards().iter().map(|s| s.range().end).collect();
    model.forward_hooked(&mut caches, &prompt[16..17], LogitsFor::Last, &mut |i, h| {
        if BOUNDARIES.contains(&ends[i]) {
            decode.push((ends[i], h.clone()));
        }
        Ok(())
    })?;
    let prefill = dump(&model, &prompt)?;
    let limits = Limits::default();
    let mut rows = Vec::new();
    for (case, states) in [("decode 1 token", &decode), ("prefill 128 tokens", &prefill)] {
        for enc in encodings() {
            let mut codec = ActivationCodec::new();
            let (mut bytes, mut raw) = (0usize, 0usize);
            let (mut enc_t, mut dec_t) = (Vec::new(), Vec::new());
            let mut wire = Vec::new();
            let mut back = Vec::new();
            for (_, h) in states.iter() {
                let tokens = h.len() / width;
                let reps = (2_000_000 / h.len()).clamp(20, 5000);
                for _ in 0..reps {
                    wire.clear();
                    let t = Instant::now();
                    codec.encode(h, tokens, width, enc, &mut wire)?;
                    enc_t.push((h.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
                    let t = Instant::now();
                    codec.decode(&wire, &limits, &mut back)?;
                    dec_t.push((h.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
                }
                bytes += wire.len();
                raw += h.len() * 4;
            }
            let tokens: usize = states.iter().map(|(_, h)| h.len() / width).sum();
            rows.push(serde_json::json!({
                "case": case, "encoding": enc.name(), "bytes_per_token": bytes as f64 / tokens as f64,
                "reduction": raw as f64 / bytes as f64, "encode_gb_s": median(&enc_t), "decode_gb_s": median(&dec_t),
            }));
        }
    }
    // Greedy tokens through every boundary of a 30-stage split.
    let fine = LocalModel::load(&path, Some(&uneven_ranges(30, 30)?), 2)?;
    let prompts = ["The capital of France is", "Once upon a time,", "def fibonacci(n):"];
    let base: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| Ok(fine.generate(fine.tokenizer().encode(p)?, 32, SamplingParams::greedy(), vec![], 0, |_| {})?.tokens))
        .collect::<Result<_>>()?;
    let mut same = Vec::new();
    for dtype in WireDType::ALL {
        let enc = Encoding { dtype, zstd: None };
        let mut codec = ActivationCodec::new();
        let mut wire = Vec::new();
        let mut unchanged = 0;
        for (p, want) in prompts.iter().zip(&base) {
            let mut hook = |_: usize, h: &mut Vec<f32>| {
                wire.clear();
                codec
                    .encode(h, h.len() / width, width, enc, &mut wire)
                    .and_then(|_| codec.decode(&wire, &limits, h))
                    .map(|_| ())
                    .map_err(|e| fogmesh::models::ModelError::Input(e.to_string()))
            };
            let got = fine.generate_hooked(fine.tokenizer().encode(p)?, 32, SamplingParams::greedy(), vec![], 0, |_| {}, &mut hook)?;
            let agree = got.tokens.iter().zip(want).take_while(|(a, b)| a == b).count();
            unchanged += usize::from(agree == want.len());
            same.push(serde_json::json!({"encoding": enc.name(), "prompt": p, "tokens_equal_to_lossless": agree}));
        }
        if !json {
            println!("{}: {unchanged}/3 prompts give the same 32 greedy tokens as lossless f32", enc.name());
        }
    }
    if json {
        println!("{}", serde_json::json!({"codec": rows, "greedy_through_29_boundaries": same}));
    } else {
        println!("| case | encoding | bytes/token | vs f32 | encode GB/s | decode GB/s |");
        println!("|---|---|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {:.0} | {:.2}x | {:.2} | {:.2} |",
                r["case"].as_str().unwrap_or(""),
                r["encoding"].as_str().unwrap_or(""),
                r["bytes_per_token"].as_f64().unwrap_or(0.0),
                r["reduction"].as_f64().unwrap_or(0.0),
                r["encode_gb_s"].as_f64().unwrap_or(0.0),
                r["decode_gb_s"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
