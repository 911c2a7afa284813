//! Phi-3: the Llama block (`llama.rs`) with Q, K and V in one tensor
//! (`attn_qkv`; separate ones load too), the feed-forward's gate and up in
//! one (`ffn_up`, gate first), and RoPE on half-split pairs.

use std::io::{Read, Seek};

use super::Loader;
use super::llama::Layer;
use crate::config::LlamaConfig;
use crate::error::Result;

/// Reads block `i`'s tensors.
pub(crate) fn load<R: Read + Seek>(ld: &mut Loader<'_, R>, cfg: &LlamaConfig, i: usize) -> Result<Layer> {
    let (d, qkv_w) = (cfg.hidden, cfg.q_dim + 2 * cfg.kv_dim());
    let n = |s: &str| format!("blk.{i}.{s}.weight");
    let qkv = if ld.has(&n("attn_qkv")) { vec![ld.matrix(&n("attn_qkv"), d, qkv_w)?] } else { Layer::separate_qkv(ld, cfg, i)? };
    let gate_up = vec![ld.matrix(&n("ffn_up"), d, 2 * cfg.ffn)?];
    Layer::assemble(ld, cfg, i, qkv, gate_up)
}
