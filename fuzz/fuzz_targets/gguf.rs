//! Feeds arbitrary bytes to the GGUF reader, the model loader and the
//! tokenizer builder: any result is fine, a panic or a huge allocation is not.
#![no_main]

use std::io::Cursor;
use std::sync::Arc;

use fogmesh_models::gguf::Gguf;
use fogmesh_models::{LlamaConfig, Shard, ThreadPool, Tokenizer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::parse(Cursor::new(data), data.len() as u64) else { return };
    let _ = Tokenizer::from_gguf(&g);
    if let Ok(cfg) = LlamaConfig::from_gguf(&g) {
        let pool = Arc::new(ThreadPool::new(1));
        let _ = Shard::load_from(&g, Cursor::new(data), 0..cfg.layers.min(2), pool);
    }
});
