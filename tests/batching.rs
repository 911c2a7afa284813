//! Batched forward passes (`Shard::forward_batch`, what continuous batching
//! runs on every stage): several sessions share one pass, and each gets
//! exactly — bit for bit — what it gets alone, whatever shares its batch,
//! on every weight type, both architectures, whole and split. Needs no
//! downloaded model (the default model is added when present).

mod common;

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use fogmesh::models::gguf::Gguf;
use fogmesh::models::{BatchItem, LogitsFor, ModelError, SessionCache, Shard, ShardInput, ShardOutput, ThreadPool, argmax};

fn pipeline(bytes: &[u8], cuts: &[usize], threads: usize) -> Vec<Shard> {
    let g = Gguf::parse(Cursor::new(bytes), bytes.len() as u64).unwrap();
    let pool = Arc::new(ThreadPool::new(threads));
    cuts.windows(2).map(|w| Shard::load_from(&g, Cursor::new(bytes), w[0]..w[1], pool.clone()).unwrap()).collect()
}

/// A session's part of one step: its prompt at its first step, then the
/// token it drew last.
struct Sess {
    prompt: Vec<u32>,
    start: usize,
    logits: LogitsFor,
    caches: Vec<SessionCache>,
    next: Option<u32>,
    out: Vec<Vec<f32>>,
}

impl Sess {
    fn input(&self, step: usize) -> Option<Vec<u32>> {
        if step < self.start {
            None
        } else if step == self.start {
            Some(self.prompt.clone())
        } else {
            self.next.map(|t| vec![t])
        }
    }

    fn took(&mut self, logits: Vec<f32>, vocab: usize) {
        self.next = Some(argmax(&logits[logits.len() - vocab..]) as u32);
        self.out.push(logits);
    }
}

fn sessions(shards: &[Shard], vocab: usize, starts: &[usize]) -> Vec<Sess> {
    let lens = [1, 5, 9, 17, 3, 2];
    starts
        .iter()
        .enumerate()
        .map(|(i, &start)| Sess {
            prompt: (0..lens[i % lens.len()]).map(|j| ((i * 7 + j * 13 + 1) % vocab) as u32).collect(),
            start,
            logits: if i % 3 == 1 { LogitsFor::All } else { LogitsFor::Last },
            caches: shards.iter().map(Shard::new_session).collect(),
            next: None,
            out: Vec::new(),
        })
        .collect()
}

fn logits(out: ShardOutput) -> Vec<f32> {
    match out {
        ShardOutput::Logits(l) => l,
        ShardOutput::Hidden(_) => panic!("the last stage gave hidden states"),
    }
}

/// Every session alone, each step through every stage with `forward`.
fn solo(shards: &[Shard], vocab: usize, starts: &[usize], steps: usize) -> Vec<Vec<Vec<f32>>> {
    let mut all = sessions(shards, vocab, starts);
    for s in all.iter_mut() {
        for step in 0..steps {
            let Some(ids) = s.input(step) else { continue };
            let mut h = Vec::new();
            for (k, shard) in shards.iter().enumerate() {
                let input = if k == 0 { ShardInput::Tokens(&ids) } else { ShardInput::Hidden(&h) };
                h = shard.forward(&mut s.caches[k], input, s.logits).unwrap().into_vec();
            }
            s.took(h, vocab);
        }
    }
    all.into_iter().map(|s| s.out).collect()
}

/// All sessions that have work at a step share one `forward_batch` per
/// stage: prompts of different lengths beside single decode tokens.
fn batched(shards: &[Shard], vocab: usize, starts: &[usize], steps: usize) -> Vec<Vec<Vec<f32>>> {
    let mut all = sessions(shards, vocab, starts);
    for step in 0..steps {
        let inputs: Vec<Option<Vec<u32>>> = all.iter().map(|s| s.input(step)).collect();
        let live: Vec<usize> = (0..all.len()).filter(|&i| inputs[i].is_some()).collect();
        let mut hidden: Vec<Vec<f32>> = Vec::new();
        for (k, shard) in shards.iter().enumerate() {
            let mut items: Vec<BatchItem<'_>> = Vec::new();
            let mut caches: Vec<&mut SessionCache> = all.iter_mut().map(|s| &mut s.caches[k]).collect();
            let mut picked: Vec<&mut SessionCache> = Vec::new();
            for (i, c) in caches.drain(..).enumerate() {
                if inputs[i].is_some() {
                    picked.push(c);
                }
            }
            for (j, c) in picked.into_iter().enumerate() {
                let i = live[j];
                let input = if k == 0 { ShardInput::Tokens(inputs[i].as_ref().unwrap()) } else { ShardInput::Hidden(&hidden[j]) };
                let which = if i % 3 == 1 { LogitsFor::All } else { LogitsFor::Last };
                items.push(BatchItem { cache: c, input, logits: which });
            }
            let outs = shard.forward_batch(&mut items);
            drop(items);
            hidden = outs.into_iter().map(|r| r.unwrap().into_vec()).collect();
        }
        for (j, h) in hidden.into_iter().enumerate() {
            all[live[j]].took(h, vocab);
        }
    }
    all.into_iter().map(|s| s.out).collect()
}

fn same(what: &str, a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len(), "{what}: session {i} steps");
        for (step, (p, q)) in x.iter().zip(y).enumerate() {
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert!(bits(p) == bits(q), "{what}: session {i} step {step} differs in a batch");
        }
    }
}

/// Sessions entering at different steps: prompts beside decode tokens.
const STARTS: [usize; 6] = [0, 0, 1, 2, 2, 4];
const STEPS: usize = 7;

fn check_file(what: &str, bytes: &[u8], layers: usize, vocab: usize) {
    for (cuts, threads) in [(vec![0, layers], 2), (vec![0, layers / 2, layers], 1), (vec![0, 1, layers], 2)] {
        let shards = pipeline(bytes, &cuts, threads);
        let want = solo(&shards, vocab, &STARTS, STEPS);
        let got = batched(&shards, vocab, &STARTS, STEPS);
        same(&format!("{what} cut at {cuts:?}"), &want, &got);
    }
}

#[test]
fn every_weight_type_batches_bit_identically() {
    for dtype in fogmesh::models::testing::ENCODABLE_TYPES {
        let bytes = tiny_gguf(dtype, dtype as usize % 2 == 0);
        check_file(&format!("{dtype:?}"), &bytes, TINY_LAYERS, 64);
    }
}

fn synthetic(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/synthetic").join(format!("{name}.gguf"))).unwrap()
}

/// Gemma 3 (sliding window of 4: the prompts cross it) and Llama with RoPE
/// frequency factors.
#[test]
fn both_architectures_batch_bit_identically() {
    for name in ["gemma3", "llama-rope-freqs"] {
        let bytes = synthetic(name);
        let g = Gguf::parse(Cursor::new(&bytes), bytes.len() as u64).unwrap();
        let cfg = fogmesh::models::LlamaConfig::from_gguf(&g).unwrap();
        check_file(name, &bytes, cfg.layers, cfg.vocab);
    }
}

/// The default model (Q4_1 and Q8_0 kernels at full width), when present.
#[test]
fn the_default_model_batches_bit_identically() {
    let Some(path) = model_path() else { return };
    let bytes = std::fs::read(path).unwrap();
    check_file("SmolLM2", &bytes, 30, 49152);
}

/// An item that cannot run (a token outside the vocabulary, a full
/// context, a cache of another shard) fails alone: the others in its batch
/// get their results, and its own cache is unchanged.
#[test]
fn a_bad_item_fails_alone() {
    let bytes = tiny_gguf(candle_core::quantized::GgmlDType::Q4_1, true);
    let shards = pipeline(&bytes, &[0, TINY_LAYERS], 2);
    let other = pipeline(&bytes, &[0, TINY_LAYERS], 2);
    let s = &shards[0];
    let (mut a, mut b, mut c, mut d) = (s.new_session(), s.new_session(), s.new_session(), other[0].new_session());
    let alone = logits(s.forward(&mut s.new_session(), ShardInput::Tokens(&[3, 4, 5]), LogitsFor::Last).unwrap());
    let mut items = vec![
        BatchItem { cache: &mut a, input: ShardInput::Tokens(&[3, 4, 5]), logits: LogitsFor::Last },
        BatchItem { cache: &mut b, input: ShardInput::Tokens(&[3, 999]), logits: LogitsFor::Last },
        BatchItem { cache: &mut c, input: ShardInput::Hidden(&[0.5; TINY_D]), logits: LogitsFor::Last },
        BatchItem { cache: &mut d, input: ShardInput::Tokens(&[1]), logits: LogitsFor::Last },
    ];
    let out = s.forward_batch(&mut items);
    drop(items);
    assert_eq!(logits(out[0].as_ref().unwrap().clone()), alone);
    assert!(matches!(&out[1], Err(ModelError::Input(m)) if m.contains("999")), "{:?}", out[1]);
    assert!(matches!(&out[2], Err(ModelError::Input(m)) if m.contains("hidden")), "{:?}", out[2]);
    assert!(matches!(&out[3], Err(ModelError::Input(m)) if m.contains("another shard")), "{:?}", out[3]);
    assert_eq!((a.pos(), b.pos(), c.pos(), d.pos()), (3, 0, 0, 0));
}
