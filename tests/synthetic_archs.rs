//! Small random-weight GGUF files (F32 weights, so the check is about the
//! architecture, not the kernels) against llama.cpp's logits on the same
//! files: `tests/data/synthetic/*.gguf`, made with their reference logits by
//! `models/bench/synthetic_models.py` (llama.cpp built from the vendored
//! source; CI does not build it). At every position the top-1 id equals
//! llama.cpp's wherever its top-2 gap is at least 0.05, and the top-1 logit
//! is within 0.05 of llama.cpp's; and any split gives the same logits.

use std::path::PathBuf;

use fogmesh::models::{LocalModel, uneven_ranges};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/synthetic").join(name)
}

fn check(name: &str) {
    let path = data(&format!("{name}.gguf"));
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data(&format!("{name}.logits.json"))).unwrap()).unwrap();
    let tokens: Vec<u32> = reference["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    let m = LocalModel::load(&path, None, 2).unwrap();
    let ours = m.score(&tokens, 1).unwrap();
    let (mut compared, mut worst) = (0, 0f32);
    for (at, row) in reference["logits"].as_array().unwrap().iter().enumerate() {
        let row: Vec<f32> = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let (best, second) = (order[0], order[1]);
        let d = (ours[at][0].logit - row[best]).abs();
        worst = worst.max(d);
        assert!(d <= 0.05, "{name} position {at}: top-1 logit {} vs llama.cpp's {}", ours[at][0].logit, row[best]);
        if row[best] - row[second] >= 0.05 {
            assert_eq!(ours[at][0].id as usize, best, "{name} position {at}");
            compared += 1;
        }
    }
    eprintln!("{name}: {compared} of {} positions compared by id; largest top-1 logit difference {worst:.5}", tokens.len());
    // The independent f32 oracle agrees too (F32 weights: closely).
    let g = fogmesh::models::gguf::Gguf::open(&path).unwrap();
    let oracle = fogmesh::models::reference::reference_logits(&g, &mut std::fs::File::open(&path).unwrap(), &tokens).unwrap();
    for (at, row) in oracle.iter().enumerate() {
        let best = fogmesh::models::argmax(row) as usize;
        assert!((ours[at][0].logit - row[best]).abs() <= 0.05, "{name} position {at}: {} vs the oracle's {}", ours[at][0].logit, row[best]);
    }
    assert!(compared >= tokens.len() / 2, "{name}: too few confident positions");
    // Any split gives the same logits.
    let layers = m.config().layers;
    let whole = m.score(&tokens, 3).unwrap();
    for k in 2..=layers.min(4) {
        let split = LocalModel::load(&path, Some(&uneven_ranges(layers, k).unwrap()), 1).unwrap();
        assert_eq!(split.score(&tokens, 3).unwrap(), whole, "{name}: {k} shards");
    }
}

/// Llama with RoPE frequency factors (`rope_freqs.weight`, as Llama 3.1 and
/// 3.2 files carry).
#[test]
fn llama_with_rope_frequency_factors_matches_llama_cpp() {
    check("llama-rope-freqs");
}

/// Gemma 3 with a window of 4 positions: 16 tokens cross it on the local
/// layers; layer 5 is global.
#[test]
fn gemma3_with_a_small_window_matches_llama_cpp() {
    check("gemma3");
}

/// Qwen 2: biases on Q, K and V, RoPE on half-split pairs, the output tied
/// to the embedding.
#[test]
fn qwen2_matches_llama_cpp() {
    check("qwen2");
}

/// Qwen 3: q/k RMSNorm per head, heads of 32 in a width of 64 (4 heads).
#[test]
fn qwen3_matches_llama_cpp() {
    check("qwen3");
}

/// Phi-3: Q, K and V in one tensor, gate and up in one tensor.
#[test]
fn phi3_matches_llama_cpp() {
    check("phi3");
}

/// A synthetic file's metadata and tensors, changed by `f`, loaded whole:
/// the error's text.
fn load_changed(name: &str, f: impl FnOnce(&mut Vec<(String, fogmesh::models::gguf::Value)>, &mut Vec<fogmesh::models::gguf::TensorData>)) -> String {
    use fogmesh::models::gguf::{Gguf, TensorData, write_gguf};
    let path = data(&format!("{name}.gguf"));
    let g = Gguf::open(&path).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let mut meta: Vec<_> = g.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut tensors: Vec<TensorData> = g
        .tensors
        .values()
        .map(|t| TensorData { name: t.name.clone(), dims: t.dims.clone(), dtype: t.dtype, data: g.read_tensor(&mut file, t).unwrap() })
        .collect();
    f(&mut meta, &mut tensors);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("changed.gguf");
    std::fs::write(&out, write_gguf(&meta, &tensors)).unwrap();
    match LocalModel::load(&out, None, 1) {
        Ok(_) => panic!("{name}: a changed file loaded"),
        Err(e) => e.to_string(),
    }
}

/// Malformed Qwen 2, Qwen 3 and Phi-3 files: errors that name the problem.
#[test]
fn malformed_qwen_and_phi3_files_are_clear_errors() {
    use fogmesh::models::gguf::{TensorData, Value};
    let drop = |t: &'static str| move |_: &mut Vec<(String, Value)>, ts: &mut Vec<TensorData>| ts.retain(|x| x.name != t);
    let unset = |k: &'static str| move |m: &mut Vec<(String, Value)>, _: &mut Vec<TensorData>| m.retain(|(x, _)| x != k);
    let cases: Vec<(&str, Box<dyn FnOnce(&mut Vec<(String, Value)>, &mut Vec<TensorData>)>, &str)> = vec![
        ("qwen2", Box::new(drop("blk.1.attn_k.bias")), "blk.1.attn_k.bias"),
        ("qwen2", Box::new(unset("qwen2.attention.head_count")), "qwen2.attention.head_count"),
        ("qwen3", Box::new(drop("blk.2.attn_q_norm.weight")), "blk.2.attn_q_norm.weight"),
        ("qwen3", Box::new(unset("qwen3.attention.key_length")), "shape"),
        ("phi3", Box::new(drop("blk.0.ffn_up.weight")), "blk.0.ffn_up.weight"),
        (
            "phi3",
            Box::new(|_: &mut Vec<(String, Value)>, ts: &mut Vec<TensorData>| {
                let mut f = ts.iter().find(|t| t.name == "output_norm.weight").unwrap().clone();
                f.name = "rope_factors_long.weight".into();
                ts.push(f);
            }),
            "LongRoPE",
        ),
        (
            "phi3",
            Box::new(|m: &mut Vec<(String, Value)>, _: &mut Vec<TensorData>| {
                for (k, v) in m.iter_mut() {
                    if k == "phi3.attention.head_count_kv" {
                        *v = Value::U32(3);
                    }
                }
            }),
            "head_count_kv",
        ),
    ];
    for (name, change, needle) in cases {
        let e = load_changed(name, change);
        assert!(e.contains(needle), "{name}: {needle:?} not in {e:?}");
    }
}

/// The `qwen2` pre-tokenizer (Qwen 2 and 3 files): the synthetic Qwen 2
/// file's byte-level BPE vocabulary gives llama.cpp's ids on texts with
/// digit runs, contractions, punctuation runs, newlines, spaces, bytes past
/// ASCII and a control token (`tests/data/synthetic/qwen2.tokens.json`).
#[test]
fn the_qwen2_pre_tokenizer_gives_llama_cpps_ids() {
    let g = fogmesh::models::gguf::Gguf::open(&data("qwen2.gguf")).unwrap();
    let t = fogmesh::models::Tokenizer::from_gguf(&g).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data("qwen2.tokens.json")).unwrap()).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(t.encode_with(text, true).unwrap(), want, "{text:?}");
    }
}
