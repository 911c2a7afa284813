//! GGUF loading on synthetic files: every supported tensor type runs and
//! agrees with the f32 candle reference, and malformed files give errors that
//! name the problem, never a panic. Needs no downloaded model.

mod common;

use std::io::Cursor;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use common::*;
use fogmesh::models::gguf::{Gguf, TensorData, Value, write_gguf};
use fogmesh::models::reference::reference_logits;
use fogmesh::models::{LogitsFor, ModelError, Shard, ShardInput, ShardOutput, ThreadPool};
use proptest::prelude::*;

fn parse(bytes: &[u8]) -> Result<Gguf, ModelError> {
    Gguf::parse(Cursor::new(bytes), bytes.len() as u64)
}

fn load(bytes: &[u8], range: std::ops::Range<usize>) -> Result<Shard, ModelError> {
    let g = parse(bytes)?;
    Shard::load_from(&g, Cursor::new(bytes), range, Arc::new(ThreadPool::new(2)))
}

fn logits_all(shard: &Shard, tokens: &[u32]) -> Vec<f32> {
    let mut cache = shard.new_session();
    match shard.forward(&mut cache, ShardInput::Tokens(tokens), LogitsFor::All).unwrap() {
        ShardOutput::Logits(l) => l,
        ShardOutput::Hidden(_) => panic!("expected logits"),
    }
}

const TOKENS: [u32; 7] = [1, 5, 9, 63, 0, 17, 5];

#[test]
fn every_tensor_type_matches_the_f32_reference() {
    for dtype in fogmesh::models::testing::ENCODABLE_TYPES {
        for tied in [true, false] {
            let bytes = tiny_gguf(dtype, tied);
            let shard = load(&bytes, 0..TINY_LAYERS).unwrap();
            let got = logits_all(&shard, &TOKENS);
            let g = parse(&bytes).unwrap();
            let want: Vec<f32> = reference_logits(&g, &mut Cursor::new(&bytes), &TOKENS).unwrap().concat();
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.1, "{dtype:?}: degenerate logits");
            let err2: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
            let rel = (err2 / want.iter().map(|b| b * b).sum::<f32>()).sqrt();
            // Exact f32 products where nothing is quantized; otherwise the error
            // of int8 activations (candle's own Q6_K x Q8_K kernel shows ~5% on
            // these random weights, too).
            let bound = if dtype == GgmlDType::F32 && !tied { 1e-4 } else { 0.07 };
            assert!(rel <= bound, "{dtype:?} tied={tied}: relative RMS error {rel} > {bound}");
        }
    }
}

#[test]
fn tiny_model_split_is_bit_identical() {
    let bytes = tiny_gguf(GgmlDType::Q4K, false);
    let whole = logits_all(&load(&bytes, 0..TINY_LAYERS).unwrap(), &TOKENS);
    let a = load(&bytes, 0..1).unwrap();
    let b = load(&bytes, 1..TINY_LAYERS).unwrap();
    let (mut ca, mut cb) = (a.new_session(), b.new_session());
    let h = a.forward(&mut ca, ShardInput::Tokens(&TOKENS), LogitsFor::All).unwrap();
    let ShardOutput::Hidden(h) = h else { panic!("first stage returned logits") };
    let ShardOutput::Logits(l) = b.forward(&mut cb, ShardInput::Hidden(&h), LogitsFor::All).unwrap() else {
        panic!("last stage returned hidden states")
    };
    assert_eq!(whole, l);
}

fn expect_err(r: Result<impl std::fmt::Debug, ModelError>, needle: &str) {
    match r {
        Ok(v) => panic!("expected an error containing {needle:?}, got Ok({v:?})"),
        Err(e) => assert!(e.to_string().contains(needle), "error {e:?} does not mention {needle:?}"),
    }
}

fn with_tensors(f: impl FnOnce(&mut Vec<TensorData>)) -> Vec<u8> {
    let mut t = tiny_tensors(GgmlDType::Q8_0, true);
    f(&mut t);
    write_gguf(&tiny_metadata(), &t)
}

fn with_metadata(f: impl FnOnce(&mut Vec<(String, Value)>)) -> Vec<u8> {
    let mut m = tiny_metadata();
    f(&mut m);
    write_gguf(&m, &tiny_tensors(GgmlDType::Q8_0, true))
}

fn set_meta(m: &mut [(String, Value)], key: &str, v: Value) {
    m.iter_mut().find(|(k, _)| k == key).expect("key").1 = v;
}

#[test]
fn malformed_headers_are_errors() {
    let good = tiny_gguf(GgmlDType::Q8_0, true);
    let mut b = good.clone();
    b[0] = b'X';
    expect_err(parse(&b), "bad magic");
    let mut b = good.clone();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    expect_err(parse(&b), "unsupported GGUF version 7");
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(parse(&b), "absurd counts");
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 19).to_le_bytes());
    assert!(parse(&b).is_err());
    expect_err(parse(&good[..3]), "truncated");
    expect_err(parse(&[]), "truncated");
}

#[test]
fn truncation_anywhere_is_an_error() {
    let good = tiny_gguf(GgmlDType::Q4_1, true);
    let mut cut = 0;
    while cut < good.len() {
        let r = load(&good[..cut], 0..TINY_LAYERS);
        assert!(r.is_err(), "a file cut at {cut} of {} bytes loaded", good.len());
        cut += if cut < 4096 { 13 } else { 4093 };
    }
    assert!(load(&good, 0..TINY_LAYERS).is_ok());
}

#[test]
fn absurd_metadata_is_an_error() {
    // A string length far past the end of the file.
    let mut b = tiny_gguf(GgmlDType::Q8_0, true);
    b[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    expect_err(parse(&b), "exceeds");
    // An array claiming 2^40 elements.
    let mut m = tiny_metadata();
    m.push(("x.array".into(), Value::Array(vec![Value::U8(1)])));
    let bytes = write_gguf(&m, &[]);
    let needle = b"x.array";
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len() + 4 + 4;
    let mut b = bytes.clone();
    b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(parse(&b), "array");
    expect_err(load(&with_metadata(|m| set_meta(m, "llama.block_count", Value::U32(0))), 0..1), "block_count");
    expect_err(load(&with_metadata(|m| set_meta(m, "llama.attention.head_count", Value::U32(3))), 0..1), "head_count");
    expect_err(
        load(&with_metadata(|m| set_meta(m, "general.architecture", Value::String("gpt2".into()))), 0..1),
        "architecture `gpt2`",
    );
    expect_err(
        load(&with_metadata(|m| set_meta(m, "llama.embedding_length", Value::String("wide".into()))), 0..1),
        "embedding_length",
    );
    expect_err(load(&with_metadata(|m| m.retain(|(k, _)| k != "llama.feed_forward_length")), 0..1), "missing");
}

#[test]
fn bad_tensors_are_errors_naming_the_tensor() {
    let missing = with_tensors(|t| t.retain(|t| t.name != "blk.1.attn_q.weight"));
    expect_err(load(&missing, 0..TINY_LAYERS), "blk.1.attn_q.weight");
    // A shard that does not need the missing tensor still loads.
    assert!(load(&missing, 2..TINY_LAYERS).is_ok());
    let misshapen = with_tensors(|t| {
        let q = t.iter_mut().find(|t| t.name == "blk.0.attn_q.weight").unwrap();
        q.dims = vec![TINY_D, TINY_D / 2];
        q.data.truncate(q.data.len() / 2);
    });
    expect_err(load(&misshapen, 0..1), "shape");
    let huge = with_tensors(|t| t[1].dims = vec![1 << 30, 1 << 30, 1 << 30]);
    expect_err(parse(&huge), "absurd dimensions");
    let mut bad_type = tiny_gguf(GgmlDType::Q8_0, true);
    let needle = b"token_embd.weight";
    let at = bad_type.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len() + 4 + 16;
    bad_type[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    expect_err(parse(&bad_type), "unknown tensor type 99");
    let nan = with_tensors(|t| {
        let n = t.iter_mut().find(|t| t.name == "blk.0.attn_norm.weight").unwrap();
        n.data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    expect_err(load(&nan, 0..1), "NaN");
}

#[test]
fn bad_ranges_and_inputs_are_errors() {
    let b = tiny_gguf(GgmlDType::Q8_0, true);
    expect_err(load(&b, 2..5), "layer range 2..5");
    expect_err(load(&b, 2..2), "layer range");
    let first = load(&b, 0..1).unwrap();
    let middle = load(&b, 1..2).unwrap();
    let mut c = first.new_session();
    expect_err(first.forward(&mut c, ShardInput::Tokens(&[64]), LogitsFor::Last), "outside the vocabulary");
    expect_err(first.forward(&mut c, ShardInput::Tokens(&[]), LogitsFor::Last), "no tokens");
    expect_err(first.forward(&mut c, ShardInput::Hidden(&[0.0; TINY_D]), LogitsFor::Last), "token ids");
    let mut m = middle.new_session();
    expect_err(middle.forward(&mut m, ShardInput::Tokens(&[1]), LogitsFor::Last), "hidden states");
    expect_err(middle.forward(&mut m, ShardInput::Hidden(&[0.0; 7]), LogitsFor::Last), "width");
    expect_err(middle.forward(&mut m, ShardInput::Hidden(&[f32::NAN; TINY_D]), LogitsFor::Last), "NaN");
    expect_err(middle.forward(&mut c, ShardInput::Hidden(&[0.0; TINY_D]), LogitsFor::Last), "session cache");
    // Same layers, another loaded shard (another model, say): refused too.
    let twin = load(&b, 1..2).unwrap();
    expect_err(twin.forward(&mut m, ShardInput::Hidden(&[0.0; TINY_D]), LogitsFor::Last), "another shard");
    // The context (128) is enforced.
    let long = vec![1u32; 129];
    expect_err(first.forward(&mut first.new_session(), ShardInput::Tokens(&long), LogitsFor::Last), "context");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_corruption_never_panics(flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let mut b = tiny_gguf(GgmlDType::Q4_0, true);
        for (at, v) in flips {
            let at = at % b.len().min(4096);
            b[at] = v;
        }
        if let Ok(g) = parse(&b) {
            let _ = Shard::load_from(&g, Cursor::new(&b), 0..TINY_LAYERS, Arc::new(ThreadPool::new(1)));
        }
    }
}

#[test]
fn cost_profile_accounts_for_every_tensor() {
    for tied in [true, false] {
        let bytes = tiny_gguf(GgmlDType::Q4K, tied);
        let g = parse(&bytes).unwrap();
        let p = fogmesh::models::ModelProfile::from_gguf(&g).unwrap();
        assert_eq!(p.layers.len(), TINY_LAYERS);
        let layers: u64 = p.layers.iter().map(|l| l.weight_bytes).sum();
        let all: u64 = g.tensors.values().map(|t| t.size).sum();
        let norm = g.tensor("output_norm.weight").unwrap().size;
        let head_only = if tied { 0 } else { p.head_bytes - norm };
        assert_eq!(layers + p.embedding_bytes + norm + head_only, all);
        let (d, kvd, ffn) = (TINY_D as u64, (TINY_D / 2) as u64, 2 * TINY_D as u64);
        assert_eq!(p.layers[0].flops_per_token, 2 * (2 * d * d + 2 * d * kvd + 3 * d * ffn));
        assert_eq!(p.head_flops_per_token, 2 * d * 64);
        assert_eq!(p.layers[0].activation_bytes_per_token, d * 4);
    }
}
