//! Gemma 3 (issue 15). On the real Gemma 3 270M Q4_K_M file, against
//! llama.cpp's reference outputs (`tests/data/gemma3-270m-q4_k_m-greedy.json`,
//! its criterion): greedy tokens equal before the first near-tie, the
//! teacher-forced argmax equal at every confident step, top-1 logits close;
//! any split of the layers bit-identical to one shard; three processes
//! equal to one; prompts no reference covers against the f32 oracle
//! (`models::reference`). Needs the file
//! (`fogmesh fetch gemma3-270m`; skipped without it, failed under CI). On a
//! tiny synthetic Gemma 3 file (always): sliding-window attention and the
//! local/global split cut anywhere, and malformed metadata as clear errors.

mod common;

use std::io::Cursor;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use common::{encode, ids, pseudo_random};
use fogmesh::models::gguf::{Gguf, TensorData, Value, write_gguf};
use fogmesh::models::{LocalModel, LogitsFor, ModelError, SamplingParams, Shard, ShardInput, ShardOutput, ThreadPool};

const GAP: f64 = 0.75;

fn gemma_path() -> Option<std::path::PathBuf> {
    let p = fogmesh::models::home_dir().join("models").join("gemma-3-270m-q4_k_m.gguf");
    if !p.exists() {
        assert!(std::env::var_os("CI").is_none(), "this test needs {} (fogmesh fetch gemma3-270m)", p.display());
        eprintln!("SKIPPED: needs {} (fogmesh fetch gemma3-270m)", p.display());
        return None;
    }
    Some(p)
}

fn reference() -> serde_json::Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gemma3-270m-q4_k_m-greedy.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every reference case: raw prompts and the chat prompt.
fn cases(r: &serde_json::Value) -> Vec<serde_json::Value> {
    r["raw"].as_array().unwrap().iter().chain(r["chat"].as_array().unwrap()).cloned().collect()
}

#[test]
fn greedy_and_teacher_forced_match_llama_cpp() {
    let Some(path) = gemma_path() else { return };
    let m = LocalModel::load(&path, None, 2).unwrap();
    let r = reference();
    let (mut greedy, mut forced, mut worst) = (0, 0, 0f64);
    let mut diffs = Vec::new();
    for c in cases(&r) {
        let prompt = ids(&c["prompt_token_ids"]);
        let want = ids(&c["generated_token_ids"]);
        let gaps: Vec<f64> = c["top1_top2_logit_gap"].as_array().unwrap().iter().map(|g| g.as_f64().unwrap()).collect();
        let top = |i: usize| c["top5"][i][0]["logit"].as_f64().unwrap();
        let out = m.generate(prompt.clone(), want.len(), SamplingParams::greedy(), vec![], 1, |_| {}).unwrap();
        for (i, (&got, &exp)) in out.tokens.iter().zip(&want).enumerate() {
            if gaps[i] < GAP {
                break;
            }
            assert_eq!(got, exp, "greedy step {i} of {:?}", prompt);
            greedy += 1;
        }
        let seq: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let scored = m.score(&seq, 1).unwrap();
        for (i, &next) in want.iter().enumerate() {
            let at = prompt.len() - 1 + i;
            let d = (scored[at][0].logit as f64 - top(i)).abs();
            if gaps[i] >= GAP {
                assert_eq!(scored[at][0].id, next, "teacher-forced step {i} of {:?}", prompt);
                worst = worst.max(d);
                diffs.push(scored[at][0].logit as f64 - top(i));
                forced += 1;
            }
        }
    }
    let mut abs: Vec<f64> = diffs.iter().map(|d| d.abs()).collect();
    abs.sort_by(f64::total_cmp);
    let mean = diffs.iter().sum::<f64>() / diffs.len().max(1) as f64;
    eprintln!(
        "greedy steps compared {greedy}, teacher-forced {forced}; top-1 logit minus llama.cpp's: mean {mean:+.3}, median |d| {:.3}, p90 {:.3}, max {worst:.3}",
        abs[abs.len() / 2],
        abs[abs.len() * 9 / 10]
    );
    assert!(greedy >= 3 && forced >= 40, "too few steps compared: {greedy} greedy, {forced} teacher-forced");
    // Measured: median 0.20, max 1.15 (llama.cpp keeps an f16 KV cache and
    // quantizes activations per 256 for K-quants; we do neither).
    assert!(abs[abs.len() / 2] <= 0.3 && worst <= 1.5, "confident top-1 logits are too far from llama.cpp's");
}

#[test]
fn any_split_of_gemma3_is_bit_identical() {
    let Some(path) = gemma_path() else { return };
    let r = reference();
    let c = &r["raw"][1];
    let seq: Vec<u32> = ids(&c["prompt_token_ids"]).into_iter().chain(ids(&c["generated_token_ids"]).into_iter().take(8)).collect();
    let one = LocalModel::load(&path, None, 2).unwrap().score(&seq, 3).unwrap();
    for k in [2, 3, 7, 18] {
        let ranges = fogmesh::models::uneven_ranges(18, k).unwrap();
        let split = LocalModel::load(&path, Some(&ranges), 1).unwrap().score(&seq, 3).unwrap();
        assert_eq!(split, one, "{k} shards");
    }
}

/// Three `fogmesh node` processes on loopback splitting Gemma 3 (lossless
/// activations) give the single-process greedy tokens, chat-formatted
/// prompts included. Each offers the file's size in all (three quarters
/// for weights): the 170 MB embedding and the head it doubles as leave the
/// end stages room for a few layers each, so the plan needs all three.
/// (Unbounded, placement picks two stages: the head stage is the
/// bottleneck, and a third stage would only add a hop.)
#[test]
fn three_processes_equal_one_process_on_gemma3() {
    use fogmesh::node::cluster::{ClusterOptions, LocalCluster};
    let Some(path) = gemma_path() else { return };
    let local = LocalModel::load(&path, None, 1).unwrap();
    let bin = env!("CARGO_BIN_EXE_fogmesh");
    let file = std::fs::metadata(&path).unwrap().len();
    let o = ClusterOptions {
        activations: Some("lossless".into()),
        max_memory: Some(file),
        ..ClusterOptions::new(bin, Some(path.clone()), 3)
    };
    let c = LocalCluster::start(&o).unwrap();
    c.wait_plan(3, std::time::Duration::from_secs(120)).unwrap();
    for prompt in [
        "The capital of Japan is",
        "import os\nimport sys\n",
        "<start_of_turn>user\nName a fruit that is yellow.<end_of_turn>\n<start_of_turn>model\n",
    ] {
        let out = std::process::Command::new(bin)
            .args(["run", "--node", &c.peers[0].http, "--raw", "--temperature", "0", "--max-tokens", "16", "--json", "--prompt", prompt])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let got: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        let ids = local.tokenizer().encode(prompt).unwrap();
        let want = local.generate(ids, 16, SamplingParams::greedy(), vec![], 0, |_| {}).unwrap().tokens;
        assert_eq!(got, want, "prompt {prompt:?}");
        assert_eq!(v["route"].as_array().unwrap().len(), 3, "{v}");
    }
}

// ---- A tiny synthetic Gemma 3 (always runs). ----

const D: usize = 256;
const HEADS: usize = 2;
const HD: usize = 128;
const KV: usize = 1;
const FFN: usize = 512;
const VOCAB: usize = 64;
const LAYERS: usize = 7;
const WINDOW: u32 = 4;

fn metadata() -> Vec<(String, Value)> {
    let kv = |k: &str, v: Value| (k.to_string(), v);
    vec![
        kv("general.architecture", Value::String("gemma3".into())),
        kv("gemma3.block_count", Value::U32(LAYERS as u32)),
        kv("gemma3.context_length", Value::U32(64)),
        kv("gemma3.embedding_length", Value::U32(D as u32)),
        kv("gemma3.feed_forward_length", Value::U32(FFN as u32)),
        kv("gemma3.attention.head_count", Value::U32(HEADS as u32)),
        kv("gemma3.attention.head_count_kv", Value::U32(KV as u32)),
        kv("gemma3.attention.key_length", Value::U32(HD as u32)),
        kv("gemma3.attention.value_length", Value::U32(HD as u32)),
        kv("gemma3.attention.sliding_window", Value::U32(WINDOW)),
        kv("gemma3.rope.freq_base", Value::F32(1_000_000.0)),
        kv("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        kv("gemma3.vocab_size", Value::U32(VOCAB as u32)),
    ]
}

fn tensors() -> Vec<TensorData> {
    let (qd, kvd) = (HEADS * HD, KV * HD);
    let mut seed = 100;
    let mut mat = |name: String, cols: usize, rows: usize, dtype: GgmlDType| {
        seed += 1;
        TensorData { name, dims: vec![cols, rows], dtype, data: encode(dtype, &pseudo_random(rows * cols, seed, 0.25)) }
    };
    let norm = |name: String, n: usize| TensorData {
        name,
        dims: vec![n],
        dtype: GgmlDType::F32,
        data: (0..n).flat_map(|i| (1.0 + 0.01 * (i % 7) as f32).to_le_bytes()).collect(),
    };
    let mut t = vec![mat("token_embd.weight".into(), D, VOCAB, GgmlDType::Q8_0)];
    for l in 0..LAYERS {
        let n = |x: &str| format!("blk.{l}.{x}.weight");
        t.push(norm(n("attn_norm"), D));
        t.push(mat(n("attn_q"), D, qd, GgmlDType::Q5_0));
        t.push(mat(n("attn_k"), D, kvd, GgmlDType::Q5_0));
        t.push(mat(n("attn_v"), D, kvd, GgmlDType::Q8_0));
        t.push(norm(n("attn_q_norm"), HD));
        t.push(norm(n("attn_k_norm"), HD));
        t.push(mat(n("attn_output"), qd, D, GgmlDType::Q4K));
        t.push(norm(n("post_attention_norm"), D));
        t.push(norm(n("ffn_norm"), D));
        t.push(mat(n("ffn_gate"), D, FFN, GgmlDType::Q5_0));
        t.push(mat(n("ffn_up"), D, FFN, GgmlDType::Q5_0));
        t.push(mat(n("ffn_down"), FFN, D, GgmlDType::Q6K));
        t.push(norm(n("post_ffw_norm"), D));
    }
    t.push(norm("output_norm.weight".into(), D));
    t
}

fn load(bytes: &[u8], range: std::ops::Range<usize>) -> Result<Shard, ModelError> {
    let g = Gguf::parse(Cursor::new(bytes), bytes.len() as u64)?;
    Shard::load_from(&g, Cursor::new(bytes), range, Arc::new(ThreadPool::new(2)))
}

/// Logits of every position of `tokens` through shards over `ranges`.
fn logits(bytes: &[u8], ranges: &[std::ops::Range<usize>], tokens: &[u32]) -> Vec<f32> {
    let shards: Vec<Shard> = ranges.iter().map(|r| load(bytes, r.clone()).unwrap()).collect();
    let mut caches: Vec<_> = shards.iter().map(|s| s.new_session()).collect();
    let mut out = Vec::new();
    // Two calls (a prompt, then one token at a time) so the window slides
    // across calls too.
    for chunk in [&tokens[..5], &tokens[5..6], &tokens[6..7], &tokens[7..]] {
        let mut x: Option<Vec<f32>> = None;
        for (s, c) in shards.iter().zip(&mut caches) {
            let input = match &x {
                None => ShardInput::Tokens(chunk),
                Some(h) => ShardInput::Hidden(h.as_slice()),
            };
            match s.forward(c, input, LogitsFor::All).unwrap() {
                ShardOutput::Hidden(h) => x = Some(h),
                ShardOutput::Logits(l) => out.extend(l),
            }
        }
    }
    out
}

#[test]
fn synthetic_gemma3_splits_anywhere_and_the_window_matters() {
    let bytes = write_gguf(&metadata(), &tensors());
    let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    let one = logits(&bytes, &[0..LAYERS], &tokens);
    assert_eq!(one.len(), tokens.len() * VOCAB);
    assert!(one.iter().all(|v| v.is_finite()));
    for ranges in [vec![0..1, 1..LAYERS], vec![0..3, 3..6, 6..7], vec![0..5, 5..6, 6..7]] {
        assert_eq!(logits(&bytes, &ranges, &tokens), one, "{ranges:?}");
    }
    // The same file with a window wider than the prompt: positions past the
    // window differ, positions inside it do not.
    let mut wide = metadata();
    for (k, v) in wide.iter_mut() {
        if k == "gemma3.attention.sliding_window" {
            *v = Value::U32(64);
        }
    }
    let unwindowed = logits(&write_gguf(&wide, &tensors()), &[0..LAYERS], &tokens);
    let row = |l: &[f32], t: usize| l[t * VOCAB..(t + 1) * VOCAB].to_vec();
    for t in 0..WINDOW as usize {
        assert_eq!(row(&one, t), row(&unwindowed, t), "position {t} is inside the window");
    }
    assert_ne!(row(&one, 11), row(&unwindowed, 11), "position 11 sees beyond a window of {WINDOW}");
}

#[test]
fn malformed_gemma3_metadata_is_a_clear_error() {
    let with = |f: &dyn Fn(&mut Vec<(String, Value)>)| {
        let mut m = metadata();
        f(&mut m);
        write_gguf(&m, &tensors())
    };
    let set = |key: &'static str, v: Value| {
        move |m: &mut Vec<(String, Value)>| {
            for (k, x) in m.iter_mut() {
                if k == key {
                    *x = v.clone();
                }
            }
        }
    };
    let err = |bytes: Vec<u8>| load(&bytes, 0..LAYERS).expect_err("refused").to_string();
    for (bytes, needle) in [
        (with(&|m| m.retain(|(k, _)| k != "gemma3.attention.key_length")), "key_length"),
        (with(&|m| m.retain(|(k, _)| k != "gemma3.attention.sliding_window")), "sliding_window"),
        (with(&set("gemma3.attention.sliding_window", Value::U32(4096))), "sliding_window"),
        (with(&set("gemma3.attention.key_length", Value::U32(3))), "key_length"),
        (with(&set("gemma3.attention.value_length", Value::U32(64))), "values"),
        (with(&set("gemma3.attention.head_count_kv", Value::U32(3))), "head_count_kv"),
        (with(&|m| m.push(("gemma3.rope.scaling.type".into(), Value::String("yarn".into())))), "RoPE scaling `yarn`"),
    ] {
        let e = err(bytes);
        assert!(e.contains(needle), "{needle:?} not in {e:?}");
    }
    // A missing tensor names itself.
    let mut t = tensors();
    t.retain(|x| x.name != "blk.2.attn_q_norm.weight");
    let e = load(&write_gguf(&metadata(), &t), 0..LAYERS).expect_err("refused").to_string();
    assert!(e.contains("blk.2.attn_q_norm.weight"), "{e}");
}

/// Prompts no reference file covers, against the independent f32 oracle
/// (`models::reference`: weights dequantized by candle, plain f32 products,
/// candle's GELU): greedy continuations scored by both; at every confident
/// position (the oracle's top-2 gap at least 0.75) the top-1 ids agree; the
/// top-1 logits differ from the oracle's by a median of at most 0.5 and at
/// most 2.5 anywhere (both engines quantize activations to 8 bits, the
/// oracle does not: on "Water boils at", at a logit of 34.9, llama.cpp is
/// 1.25 below the oracle and fogmesh 1.83).
#[test]
fn unseen_prompts_agree_with_the_f32_oracle() {
    let Some(path) = gemma_path() else { return };
    let m = LocalModel::load(&path, None, 2).unwrap();
    let g = Gguf::open(&path).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let mut compared = 0;
    let mut diffs = Vec::new();
    for text in ["The history of the printing press began", "Water boils at", "def add(a, b):\n    return"] {
        let prompt = m.tokenizer().encode(text).unwrap();
        let out = m.generate(prompt.clone(), 8, SamplingParams::greedy(), vec![], 0, |_| {}).unwrap();
        let seq: Vec<u32> = prompt.iter().chain(&out.tokens).copied().collect();
        let want = fogmesh::models::reference::reference_logits(&g, &mut file, &seq).unwrap();
        let ours = m.score(&seq, 1).unwrap();
        for at in prompt.len() - 1..seq.len() {
            let w = &want[at];
            let best = fogmesh::models::argmax(w) as usize;
            let mut sorted = w.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let our = ours[at][0];
            diffs.push((our.logit - w[best]).abs());
            assert!((our.logit - w[best]).abs() <= 2.5, "{text:?} position {at}: our top logit {} vs the oracle's {}", our.logit, w[best]);
            if (sorted[0] - sorted[1]) as f64 >= GAP {
                assert_eq!(our.id as usize, best, "{text:?} position {at}");
                compared += 1;
            }
        }
    }
    assert!(compared >= 10, "only {compared} positions compared");
    diffs.sort_by(f32::total_cmp);
    let median = diffs[diffs.len() / 2];
    eprintln!("{compared} confident positions; top-1 logit vs the oracle: median {median:.3}, worst {:.3}", diffs[diffs.len() - 1]);
    assert!(median <= 0.5, "median top-1 logit difference {median}");
}

