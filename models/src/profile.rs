//! Per-layer cost of a model, read from the file's directory without loading
//! weights: what placement needs to size layer ranges to peers.

use serde::Serialize;

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::gguf::Gguf;

/// The cost of one transformer block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerCost {
    /// Layer index.
    pub layer: usize,
    /// Bytes of its weights in the file.
    pub weight_bytes: u64,
    /// Floating-point operations per token, excluding attention over the context.
    pub flops_per_token: u64,
    /// Additional operations per token for each token already in the context.
    pub attention_flops_per_context_token: u64,
    /// KV-cache bytes per token (f32 keys and values).
    pub kv_bytes_per_token: u64,
    /// Bytes of the hidden state leaving this layer, per token (f32).
    pub activation_bytes_per_token: u64,
}

/// The cost of a whole model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelProfile {
    /// Bytes of the token embedding (first stage only).
    pub embedding_bytes: u64,
    /// Bytes of the final norm and output head (last stage only; with tied
    /// embeddings this is the embedding again).
    pub head_bytes: u64,
    /// Operations per token of the output head.
    pub head_flops_per_token: u64,
    /// Whether the head is the token embedding itself (tied): a shard
    /// holding both the first and the last layer holds it once.
    pub tied_head: bool,
    /// One entry per layer.
    pub layers: Vec<LayerCost>,
}

impl ModelProfile {
    /// Computes the profile from a parsed file.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let size = |n: &str| g.tensors.get(n).map_or(0, |t| t.size);
        let (d, qd, kvd, ffn) = (cfg.hidden as u64, cfg.q_dim as u64, cfg.kv_dim() as u64, cfg.ffn as u64);
        let matmul_params = d * qd * 2 + d * kvd * 2 + 3 * d * ffn;
        let layers = (0..cfg.layers)
            .map(|i| {
                let prefix = format!("blk.{i}.");
                let weight_bytes = g.tensors.iter().filter(|(n, _)| n.starts_with(&prefix)).map(|(_, t)| t.size).sum();
                LayerCost {
                    layer: i,
                    weight_bytes,
                    flops_per_token: 2 * matmul_params,
                    attention_flops_per_context_token: 4 * qd,
                    kv_bytes_per_token: 2 * kvd * 4,
                    activation_bytes_per_token: d * 4,
                }
            })
            .collect();
        let head = if g.tensors.contains_key("output.weight") { "output.weight" } else { "token_embd.weight" };
        Ok(ModelProfile {
            embedding_bytes: size("token_embd.weight"),
            head_bytes: size(head) + size("output_norm.weight"),
            head_flops_per_token: 2 * d * cfg.vocab as u64,
            tied_head: head == "token_embd.weight",
            layers,
        })
    }
}
