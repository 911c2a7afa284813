//! Qwen 3: the Llama block (`llama.rs`) with queries and keys RMS-normed
//! per head before RoPE on half-split pairs; heads may be wider than
//! `d / heads` (the file's `key_length`).

use std::io::{Read, Seek};

use super::Loader;
use super::llama::Layer;
use crate::config::LlamaConfig;
use crate::error::Result;

/// Reads block `i`'s tensors.
pub(crate) fn load<R: Read + Seek>(ld: &mut Loader<'_, R>, cfg: &LlamaConfig, i: usize) -> Result<Layer> {
    let mut l = Layer::load(ld, cfg, i)?;
    let n = |s: &str| format!("blk.{i}.{s}.weight");
    l.qk_norm = Some((ld.vector(&n("attn_q_norm"), cfg.head_dim)?, ld.vector(&n("attn_k_norm"), cfg.head_dim)?));
    Ok(l)
}
