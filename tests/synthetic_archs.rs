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
