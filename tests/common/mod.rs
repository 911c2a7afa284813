//! Helpers shared by the integration tests: locating the default model, the
//! llama.cpp reference outputs, and tiny synthetic GGUF models.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
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

/// Encodes `x` as GGUF tensor bytes of `dtype` with candle's quantizers.
pub fn encode(dtype: GgmlDType, x: &[f32]) -> Vec<u8> {
    fogmesh::models::testing::encode(dtype, x).expect("encodable").0
}

pub use fogmesh::models::testing::pseudo_random;

/// Shape of a synthetic Llama model.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub layers: usize,
    pub d: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

/// The tiny model of most tests (K-quants need rows of 256).
pub const TINY: Shape = Shape { layers: 3, d: 256, ffn: 512, vocab: 64, heads: 4, kv_heads: 2 };
pub const TINY_LAYERS: usize = TINY.layers;
pub const TINY_D: usize = TINY.d;

pub fn metadata(s: Shape) -> Vec<(String, Value)> {
    let kv = |k: &str, v: Value| (k.to_string(), v);
    vec![
        kv("general.architecture", Value::String("llama".into())),
        kv("llama.block_count", Value::U32(s.layers as u32)),
        kv("llama.context_length", Value::U32(128)),
        kv("llama.embedding_length", Value::U32(s.d as u32)),
        kv("llama.feed_forward_length", Value::U32(s.ffn as u32)),
        kv("llama.attention.head_count", Value::U32(s.heads as u32)),
        kv("llama.attention.head_count_kv", Value::U32(s.kv_heads as u32)),
        kv("llama.rope.freq_base", Value::F32(10000.0)),
        kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        kv("llama.vocab_size", Value::U32(s.vocab as u32)),
    ]
}

pub fn tiny_metadata() -> Vec<(String, Value)> {
    metadata(TINY)
}

/// The tensors of a Llama model whose matrices are stored as `dtype`.
pub fn tensors(s: Shape, dtype: GgmlDType, tied: bool) -> Vec<TensorData> {
    let kvd = s.d / s.heads * s.kv_heads;
    let mut seed = 1;
    let mut mat = |name: String, cols: usize, rows: usize, dtype: GgmlDType| {
        seed += 1;
        let x = pseudo_random(rows * cols, seed, 0.25);
        TensorData { name, dims: vec![cols, rows], dtype, data: encode(dtype, &x) }
    };
    let norm = |name: String| TensorData {
        name,
        dims: vec![s.d],
        dtype: GgmlDType::F32,
        data: (0..s.d).flat_map(|i| (1.0 + 0.01 * (i % 7) as f32).to_le_bytes()).collect(),
    };
    let mut t = vec![mat("token_embd.weight".into(), s.d, s.vocab, GgmlDType::Q8_0)];
    for l in 0..s.layers {
        let n = |x: &str| format!("blk.{l}.{x}.weight");
        t.push(norm(n("attn_norm")));
        t.push(mat(n("attn_q"), s.d, s.d, dtype));
        t.push(mat(n("attn_k"), s.d, kvd, dtype));
        t.push(mat(n("attn_v"), s.d, kvd, dtype));
        t.push(mat(n("attn_output"), s.d, s.d, dtype));
        t.push(norm(n("ffn_norm")));
        t.push(mat(n("ffn_gate"), s.d, s.ffn, dtype));
        t.push(mat(n("ffn_up"), s.d, s.ffn, dtype));
        t.push(mat(n("ffn_down"), s.ffn, s.d, dtype));
    }
    t.push(norm("output_norm.weight".into()));
    if !tied {
        t.push(mat("output.weight".into(), s.d, s.vocab, dtype));
    }
    t
}

pub fn tiny_tensors(dtype: GgmlDType, tied: bool) -> Vec<TensorData> {
    tensors(TINY, dtype, tied)
}

/// A complete tiny GGUF file.
pub fn tiny_gguf(dtype: GgmlDType, tied: bool) -> Vec<u8> {
    write_gguf(&tiny_metadata(), &tiny_tensors(dtype, tied))
}

/// Metadata of a byte-level BPE tokenizer over a handful of tokens.
pub fn tokenizer_metadata() -> Vec<(String, Value)> {
    let s = |x: &str| Value::String(x.into());
    let toks = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "\u{120}", "\u{120}a", "1", "2"];
    vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), Value::Array(toks.iter().map(|t| s(t)).collect())),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(toks.iter().enumerate().map(|(i, _)| Value::I32(if i < 3 { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![s("a b"), s("\u{120} a")])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.chat_template".into(), s("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")),
    ]
}

/// Raw-prompt generation flags (no chat template).
pub fn raw_flags(prompt: &str, max: usize, temperature: f32, seed: u64) -> fogmesh::node::api::types::GenFlags {
    fogmesh::node::api::types::GenFlags { prompt: prompt.into(), raw: true, max_tokens: max, temperature, seed, ..Default::default() }
}

/// The tokens one process generates for `f`.
pub fn solo_tokens(model: &fogmesh::models::LocalModel, f: &fogmesh::node::api::types::GenFlags) -> Vec<u32> {
    let prompt = f.prompt_tokens(model.tokenizer()).unwrap();
    model.generate(prompt, f.max_tokens, f.sampling(), f.stop.clone(), 0, |_| {}).unwrap().tokens
}

/// `n` peer processes of `exe` serving `model` (or none), lossless (these
/// tests hold peers to the single-process tokens), `threads` each, with
/// `extra` flags; planned over all of them.
pub fn lossless_cluster(exe: &str, model: Option<&std::path::Path>, n: usize, threads: usize, extra: &[&str]) -> fogmesh::node::cluster::LocalCluster {
    use fogmesh::node::cluster::{ClusterOptions, LocalCluster};
    let o = ClusterOptions {
        activations: Some("lossless".into()),
        threads,
        extra: extra.iter().map(|s| s.to_string()).collect(),
        // Several peers: each offers too little to hold the whole model, so
        // they form a pipeline (that two of them still carry).
        max_memory: model.filter(|_| n > 1).map(split_offer),
        ..ClusterOptions::new(exe, model.map(std::path::Path::to_path_buf), n)
    };
    let c = LocalCluster::start(&o).unwrap();
    if model.is_some() {
        c.wait_plan(n, std::time::Duration::from_secs(60)).unwrap();
    }
    c
}

/// The `--max-memory` that makes peers split the default model: 95 % of the
/// file, three quarters of it (71 % of the file) for weights. The whole
/// model needs 98 % of the file (its tied embedding held once), a split
/// 129 % (the embedding on both ends): no peer holds it alone, any two
/// carry it.
pub fn split_offer(model: &std::path::Path) -> u64 {
    std::fs::metadata(model).map_or(0, |m| m.len()) * 95 / 100
}

/// The model hash the in-memory meshes of the tests announce.
pub const MEMNET_HASH: [u8; 32] = [0xab; 32];

/// Peers `peer-0..` on one in-memory network, each with its own config,
/// serving the default model (`None` when it is absent). Placement sees
/// every peer at 10 GFLOPS with 4 GiB (less where a config's
/// `memory_cap` says so).
pub async fn memnet_peers(cfgs: Vec<fogmesh::actors::RuntimeConfig>) -> Option<(std::sync::Arc<fogmesh::actors::memnet::MemNet>, Vec<fogmesh::actors::Runtime>)> {
    use fogmesh::actors::{ModelInfo, PeerView, Runtime};
    let path = model_path()?;
    let info = std::sync::Arc::new(ModelInfo::open(&path, MEMNET_HASH).unwrap());
    let net = fogmesh::actors::memnet::MemNet::new(std::time::Duration::from_secs(5));
    let mut peers = Vec::new();
    for (i, mut c) in cfgs.into_iter().enumerate() {
        let id = format!("peer-{i}");
        let view = PeerView { peer: id.clone(), gflops: 10.0, memory_bytes: 1 << 32, models: vec![MEMNET_HASH], shards: vec![], queued: 0, rtt_ms: None, partial: vec![] };
        let link = net.add(view);
        c.gflops = 10.0;
        c.memory_bytes = 1 << 32;
        let rt = Runtime::start(link, Some(info.clone()), c).await.unwrap();
        net.attach(&id, rt.clone());
        peers.push(rt);
    }
    Some((net, peers))
}
