//! Helpers shared by the integration tests: locating the default model, the
//! llama.cpp reference outputs, and tiny synthetic GGUF models.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use fogmesh::models::gguf::{TensorData, Value, write_gguf};

/// The default model, or `None` (test skipped, loudly) when it is absent
/// locally. Under CI (`CI` set) or with `FOGMESH_REQUIRE_MODEL=1` a missing
/// model fails the test instead.
pub fn model_path() -> Option<PathBuf> {
    let p = fogmesh::models::default_model_path();
    if p.exists() {
        return Some(p);
    }
    let required = std::env::var_os("CI").is_some() || std::env::var_os("FOGMESH_REQUIRE_MODEL").is_some();
    assert!(!required, "this test needs the default model at {}: run `fogmesh fetch`", p.display());
    eprintln!("SKIPPED: needs the default model at {} (run `cargo run -- fetch`)", p.display());
    None
}

/// llama.cpp's greedy reference outputs on the default model.
pub fn reference() -> serde_json::Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/smollm2-q4_1-greedy.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference file")).expect("reference JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn candle_encode<T: GgmlType>(x: &[f32]) -> Vec<u8> {
    let mut blocks = vec![T::zeros(); x.len() / T::BLCK_SIZE];
    T::from_float(x, &mut blocks);
    let n = std::mem::size_of_val(&blocks[..]);
    // SAFETY: candle blocks are plain data; we copy their bytes.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, n) }.to_vec()
}

/// Encodes `x` as GGUF tensor bytes of `dtype` with candle's quantizers.
pub fn encode(dtype: GgmlDType, x: &[f32]) -> Vec<u8> {
    match dtype {
        GgmlDType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlDType::F16 => x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlDType::Q4_0 => candle_encode::<BlockQ4_0>(x),
        GgmlDType::Q4_1 => candle_encode::<BlockQ4_1>(x),
        GgmlDType::Q5_0 => candle_encode::<BlockQ5_0>(x),
        GgmlDType::Q5_1 => candle_encode::<BlockQ5_1>(x),
        GgmlDType::Q8_0 => candle_encode::<BlockQ8_0>(x),
        GgmlDType::Q4K => candle_encode::<BlockQ4K>(x),
        GgmlDType::Q5K => candle_encode::<BlockQ5K>(x),
        GgmlDType::Q6K => candle_encode::<BlockQ6K>(x),
        other => panic!("no encoder for {other:?}"),
    }
}

pub fn pseudo_random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// Shape of the tiny synthetic model.
pub const TINY_LAYERS: usize = 3;
pub const TINY_D: usize = 256;
pub const TINY_FFN: usize = 512;
pub const TINY_VOCAB: usize = 64;
pub const TINY_HEADS: usize = 4;
pub const TINY_KV_HEADS: usize = 2;

pub fn tiny_metadata() -> Vec<(String, Value)> {
    let kv = |k: &str, v: Value| (k.to_string(), v);
    vec![
        kv("general.architecture", Value::String("llama".into())),
        kv("llama.block_count", Value::U32(TINY_LAYERS as u32)),
        kv("llama.context_length", Value::U32(128)),
        kv("llama.embedding_length", Value::U32(TINY_D as u32)),
        kv("llama.feed_forward_length", Value::U32(TINY_FFN as u32)),
        kv("llama.attention.head_count", Value::U32(TINY_HEADS as u32)),
        kv("llama.attention.head_count_kv", Value::U32(TINY_KV_HEADS as u32)),
        kv("llama.rope.freq_base", Value::F32(10000.0)),
        kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        kv("llama.vocab_size", Value::U32(TINY_VOCAB as u32)),
    ]
}

/// The tensors of a tiny Llama model whose matrices are stored as `dtype`.
pub fn tiny_tensors(dtype: GgmlDType, tied: bool) -> Vec<TensorData> {
    let kvd = TINY_D / TINY_HEADS * TINY_KV_HEADS;
    let mut seed = 1;
    let mut mat = |name: String, cols: usize, rows: usize, dtype: GgmlDType| {
        seed += 1;
        let x = pseudo_random(rows * cols, seed, 0.25);
        TensorData { name, dims: vec![cols, rows], dtype, data: encode(dtype, &x) }
    };
    let norm = |name: String| TensorData {
        name,
        dims: vec![TINY_D],
        dtype: GgmlDType::F32,
        data: (0..TINY_D).flat_map(|i| (1.0 + 0.01 * (i % 7) as f32).to_le_bytes()).collect(),
    };
    let mut t = vec![mat("token_embd.weight".into(), TINY_D, TINY_VOCAB, GgmlDType::Q8_0)];
    for l in 0..TINY_LAYERS {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        t.push(norm(n("attn_norm")));
        t.push(mat(n("attn_q"), TINY_D, TINY_D, dtype));
        t.push(mat(n("attn_k"), TINY_D, kvd, dtype));
        t.push(mat(n("attn_v"), TINY_D, kvd, dtype));
        t.push(mat(n("attn_output"), TINY_D, TINY_D, dtype));
        t.push(norm(n("ffn_norm")));
        t.push(mat(n("ffn_gate"), TINY_D, TINY_FFN, dtype));
        t.push(mat(n("ffn_up"), TINY_D, TINY_FFN, dtype));
        t.push(mat(n("ffn_down"), TINY_FFN, TINY_D, dtype));
    }
    t.push(norm("output_norm.weight".into()));
    if !tied {
        t.push(mat("output.weight".into(), TINY_D, TINY_VOCAB, dtype));
    }
    t
}

/// A complete tiny GGUF file.
pub fn tiny_gguf(dtype: GgmlDType, tied: bool) -> Vec<u8> {
    write_gguf(&tiny_metadata(), &tiny_tensors(dtype, tied))
}
