//! Replays the fuzz corpora (and any crash artifacts) through the decoders on
//! stable Rust, so every input a fuzzer ever found stays an error, not a panic.
//! `--ignored write_gguf_seeds` regenerates the GGUF seed corpus.

mod common;

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use common::*;
use fogmesh::models::gguf::{Gguf, write_gguf};
use fogmesh::models::{LlamaConfig, Shard, ThreadPool, Tokenizer};

/// The same work as `fuzz/fuzz_targets/gguf.rs`.
fn decode_gguf(data: &[u8]) -> bool {
    let Ok(g) = Gguf::parse(Cursor::new(data), data.len() as u64) else { return false };
    let _ = Tokenizer::from_gguf(&g);
    if let Ok(cfg) = LlamaConfig::from_gguf(&g) {
        let pool = Arc::new(ThreadPool::new(1));
        return Shard::load_from(&g, Cursor::new(data), 0..cfg.layers.min(2), pool).is_ok();
    }
    true
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect()
}

#[test]
fn gguf_corpus_replays_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = files(&root.join("corpus/gguf"));
    assert!(seeds.len() >= 4, "the GGUF seed corpus is missing");
    let mut loaded = 0;
    for f in seeds.iter().chain(&files(&root.join("artifacts/gguf"))) {
        let data = std::fs::read(f).unwrap();
        if decode_gguf(&data) {
            loaded += 1;
        }
    }
    assert!(loaded >= 3, "the valid seeds must load ({loaded} did)");
}

const MICRO: Shape = Shape { layers: 2, d: 64, ffn: 64, vocab: 10, heads: 2, kv_heads: 1 };

#[test]
#[ignore = "writes the seed corpus"]
fn write_gguf_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let mut meta = metadata(MICRO);
    meta.extend(tokenizer_metadata());
    std::fs::write(dir.join("metadata-only.gguf"), write_gguf(&meta, &[])).unwrap();
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::F32, GgmlDType::Q5_1] {
        let bytes = write_gguf(&meta, &tensors(MICRO, dtype, dtype != GgmlDType::F32));
        std::fs::write(dir.join(format!("micro-{dtype:?}.gguf").to_lowercase()), bytes).unwrap();
    }
}

#[test]
fn micro_seed_model_has_a_working_tokenizer() {
    let mut meta = metadata(MICRO);
    meta.extend(tokenizer_metadata());
    let bytes = write_gguf(&meta, &tensors(MICRO, GgmlDType::Q8_0, true));
    let g = Gguf::parse(Cursor::new(&bytes), bytes.len() as u64).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(t.encode("ab a").unwrap(), vec![5, 7]);
    assert_eq!(t.encode("<|im_start|>ab").unwrap(), vec![1, 5]);
    assert_eq!(t.decode(&[5, 7], false).unwrap(), "ab a");
    assert!(t.is_end(2));
}
