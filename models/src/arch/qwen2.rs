//! Qwen 2 and 2.5: the Llama block (`llama.rs`) with a bias on each of Q,
//! K and V, and RoPE on half-split pairs.

use std::io::{Read, Seek};

use super::Loader;
use super::llama::Layer;
use crate::config::LlamaConfig;
use crate::error::Result;

/// Reads block `i`'s tensors.
pub(crate) fn load<R: Read + Seek>(ld: &mut Loader<'_, R>, cfg: &LlamaConfig, i: usize) -> Result<Layer> {
    let mut l = Layer::load(ld, cfg, i)?;
    let (qd, kvd) = (cfg.q_dim, cfg.kv_dim());
    let b = |s: &str| format!("blk.{i}.{s}.bias");
    let mut bias = ld.vector(&b("attn_q"), qd)?;
    bias.extend(ld.vector(&b("attn_k"), kvd)?);
    bias.extend(ld.vector(&b("attn_v"), kvd)?);
    l.qkv_bias = Some(bias);
    Ok(l)
}
