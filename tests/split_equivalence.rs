//! Cutting the real model into 2, 3, 5 and 30 uneven shards changes nothing:
//! logits are bit-identical to one shard, and so are the tokens. Needs the
//! default model (`fogmesh fetch`).

mod common;

use fogmesh::models::{LocalModel, LogitsFor, SamplingParams, uneven_ranges};

/// Prefill logits of every position, then 8 greedy decode steps' logits.
fn trace(m: &LocalModel, prompt: &[u32]) -> (Vec<f32>, Vec<u32>) {
    let mut caches = m.new_session();
    let mut all = m.forward(&mut caches, prompt, LogitsFor::All).unwrap();
    let vocab = m.config().vocab;
    let mut tokens = Vec::new();
    let mut next = fogmesh::models::argmax(&all[all.len() - vocab..]);
    for _ in 0..8 {
        tokens.push(next);
        let l = m.forward(&mut caches, &[next], LogitsFor::Last).unwrap();
        next = fogmesh::models::argmax(&l);
        all.extend_from_slice(&l);
    }
    (all, tokens)
}

#[test]
fn split_shards_give_bit_identical_logits_and_tokens() {
    let Some(path) = common::model_path() else { return };
    let one = LocalModel::load(&path, None, 2).unwrap();
    let prompt = one.tokenizer().encode("The three laws of robotics are").unwrap();
    let (want_logits, want_tokens) = trace(&one, &prompt);
    let want_gen = one.generate(prompt.clone(), 20, SamplingParams::greedy(), vec![], 0, |_| {}).unwrap();
    for k in [2, 3, 5, 30] {
        let ranges = uneven_ranges(30, k).unwrap();
        if k < 30 {
            assert!(ranges.iter().any(|r| r.len() != ranges[0].len()), "ranges {ranges:?} are even");
        }
        let m = LocalModel::load(&path, Some(&ranges), 2).unwrap();
        let (logits, tokens) = trace(&m, &prompt);
        assert_eq!(tokens, want_tokens, "{k} shards");
        assert!(logits == want_logits, "{k} shards: logits differ");
        let g = m.generate(prompt.clone(), 20, SamplingParams::greedy(), vec![], 0, |_| {}).unwrap();
        assert_eq!(g.tokens, want_gen.tokens, "{k} shards");
    }
}

#[test]
fn thread_count_does_not_change_logits() {
    let Some(path) = common::model_path() else { return };
    let a = LocalModel::load(&path, None, 1).unwrap();
    let b = LocalModel::load(&path, None, 3).unwrap();
    let prompt = a.tokenizer().encode("Edge devices").unwrap();
    assert!(trace(&a, &prompt) == trace(&b, &prompt));
}

#[test]
fn shard_memory_is_its_share_of_the_model() {
    let Some(path) = common::model_path() else { return };
    let whole = LocalModel::load(&path, None, 1).unwrap();
    let total = whole.shards()[0].memory_bytes();
    let parts = LocalModel::load(&path, Some(&[0..10, 10..20, 20..30]), 1).unwrap();
    let middle = parts.shards()[1].memory_bytes();
    // The middle third holds no embedding or head: well under half the model.
    assert!(middle * 3 < total, "middle shard {middle} bytes vs whole {total}");
    let sum: usize = parts.shards().iter().map(|s| s.memory_bytes()).sum();
    // The tied embedding is held twice when first and last stages differ.
    assert!(sum <= total * 3 / 2, "{sum} vs {total}");
}
