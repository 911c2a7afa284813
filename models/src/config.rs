//! Model hyper-parameters read from GGUF metadata.

use crate::error::{ModelError, Result};
use crate::gguf::Gguf;

/// Architectures whose GGUF layout and block are the Llama ones.
const LLAMA_FAMILY: &[&str] = &["llama", "mistral", "granite"];

/// The shape of a Llama-family model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    /// `general.architecture`.
    pub architecture: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden width `d`.
    pub hidden: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (per head).
    pub rope_dims: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length the model was trained for.
    pub context: usize,
}

impl LlamaConfig {
    /// Reads the configuration, checking that it is self-consistent.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g.get_str("general.architecture")?.to_string();
        if !LLAMA_FAMILY.contains(&arch.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "architecture `{arch}` (supported: {})",
                LLAMA_FAMILY.join(", ")
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let layers = g.get_usize(&key("block_count"))?;
        let hidden = g.get_usize(&key("embedding_length"))?;
        let ffn = g.get_usize(&key("feed_forward_length"))?;
        let heads = g.get_usize(&key("attention.head_count"))?;
        let kv_heads = match g.metadata.get(&key("attention.head_count_kv")) {
            Some(_) => g.get_usize(&key("attention.head_count_kv"))?,
            None => heads,
        };
        let context = g.get_usize(&key("context_length"))?;
        let rope_base = match g.metadata.get(&key("rope.freq_base")) {
            Some(_) => g.get_f64(&key("rope.freq_base"))? as f32,
            None => 10_000.0,
        };
        let eps = g.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32;
        let vocab = match g.metadata.get(&key("vocab_size")) {
            Some(_) => g.get_usize(&key("vocab_size"))?,
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let bad = |k: &str, p: String| ModelError::Metadata { key: key(k), problem: p };
        let limit = 1 << 20;
        for (k, v) in [
            ("block_count", layers),
            ("embedding_length", hidden),
            ("feed_forward_length", ffn),
            ("attention.head_count", heads),
            ("attention.head_count_kv", kv_heads),
            ("context_length", context),
        ] {
            if v == 0 || v > limit {
                return Err(bad(k, format!("{v} is out of range (1..={limit})")));
            }
        }
        if vocab == 0 || vocab > 1 << 24 {
            return Err(bad("vocab_size", format!("{vocab} is out of range")));
        }
        if hidden % heads != 0 {
            return Err(bad("attention.head_count", format!("{heads} heads do not divide width {hidden}")));
        }
        if heads % kv_heads != 0 {
            return Err(bad("attention.head_count_kv", format!("{kv_heads} KV heads do not divide {heads} heads")));
        }
        let head_dim = hidden / heads;
        let rope_dims = match g.metadata.get(&key("rope.dimension_count")) {
            Some(_) => g.get_usize(&key("rope.dimension_count"))?,
            None => head_dim,
        };
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(bad("rope.dimension_count", format!("{rope_dims} does not fit heads of {head_dim}")));
        }
        if !(rope_base.is_finite() && rope_base > 1.0) {
            return Err(bad("rope.freq_base", format!("{rope_base} is not a usable base")));
        }
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return Err(bad("attention.layer_norm_rms_epsilon", format!("{eps} is not a usable epsilon")));
        }
        if g.tensors.contains_key("rope_freqs.weight") {
            return Err(ModelError::Unsupported("RoPE frequency factors (rope_freqs.weight)".into()));
        }
        Ok(LlamaConfig {
            architecture: arch,
            layers,
            hidden,
            ffn,
            heads,
            kv_heads,
            head_dim,
            rope_dims,
            rope_base,
            eps,
            vocab,
            context,
        })
    }

    /// Width of the keys (and values) of one token.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
