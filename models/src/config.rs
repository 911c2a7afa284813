//! Model hyper-parameters read from GGUF metadata.

use crate::error::{ModelError, Result};
use crate::gguf::Gguf;

/// Architectures whose GGUF layout and block are the Llama ones.
const LLAMA_FAMILY: &[&str] = &["llama", "mistral", "granite"];
/// Every architecture that loads.
const SUPPORTED: &[&str] = &["llama", "mistral", "granite", "gemma3", "qwen2", "qwen3", "phi3"];

/// Which block an architecture's layers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// RMSNorm, grouped-query attention with RoPE on adjacent pairs,
    /// SwiGLU (`llama`, `mistral`, `granite`).
    Llama,
    /// Gemma 3: q/k RMSNorm, RoPE on half-split pairs with a local and a
    /// global base, sliding-window attention on five layers of six, norms
    /// before and after attention and feed-forward, GeGLU, embeddings
    /// scaled by √d.
    Gemma3,
    /// Qwen 2 / 2.5: the Llama block with biases on Q, K and V and RoPE on
    /// half-split pairs.
    Qwen2,
    /// Qwen 3: the Llama block with q/k RMSNorm per head before RoPE on
    /// half-split pairs; heads may be wider than `d / heads`.
    Qwen3,
    /// Phi-3: the Llama block with Q, K and V in one tensor, gate and up in
    /// one tensor, and RoPE on half-split pairs.
    Phi3,
}

impl Family {
    /// Whether RoPE rotates half-split pairs (`x[i]`, `x[i + n/2]`; "NeoX")
    /// rather than adjacent ones.
    pub fn rope_half_split(self) -> bool {
        !matches!(self, Family::Llama)
    }
}

/// Gemma 3 runs every sixth layer (5, 11, 17, …) with global attention,
/// the others within the sliding window (llama.cpp's pattern).
pub(crate) const GEMMA3_GLOBAL_EVERY: usize = 6;
/// RoPE base of Gemma 3's local (sliding-window) layers.
pub(crate) const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;

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
    /// Width of all query heads together (`heads × head_dim`; the hidden
    /// width in Llama models, not in Gemma's).
    pub q_dim: usize,
    /// The block its layers run.
    pub family: Family,
    /// Sliding-window attention: how many positions (itself included) a
    /// local layer's query sees.
    pub window: Option<usize>,
    /// RoPE base of the local layers (the global base elsewhere).
    pub rope_base_local: f32,
    /// RoPE position scale (`1 / factor` of linear scaling; 1 without).
    pub rope_scale: f32,
    /// Scale of query-key products (`1/√head_dim` unless the model says).
    pub attn_scale: f32,
}

impl LlamaConfig {
    /// Reads the configuration, checking that it is self-consistent.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g.get_str("general.architecture")?.to_string();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::Unsupported(format!("architecture `{arch}` (supported: {})", SUPPORTED.join(", "))));
        }
        let family = match arch.as_str() {
            a if LLAMA_FAMILY.contains(&a) => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "phi3" => Family::Phi3,
            _ => Family::Gemma3,
        };
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
        if heads % kv_heads != 0 {
            return Err(bad("attention.head_count_kv", format!("{kv_heads} KV heads do not divide {heads} heads")));
        }
        let head_dim = match (g.metadata.get(&key("attention.key_length")), family) {
            (Some(_), _) => {
                let k = g.get_usize(&key("attention.key_length"))?;
                if k == 0 || k > 4096 || k % 2 != 0 {
                    return Err(bad("attention.key_length", format!("{k} is not a usable head width")));
                }
                let v = match g.metadata.get(&key("attention.value_length")) {
                    Some(_) => g.get_usize(&key("attention.value_length"))?,
                    None => k,
                };
                if k != v {
                    return Err(ModelError::Unsupported(format!("keys of {k} and values of {v} per head (they must match)")));
                }
                k
            }
            (None, Family::Gemma3) => return Err(bad("attention.key_length", "missing (Gemma 3 files name their head width)".into())),
            (None, _) => {
                if hidden % heads != 0 {
                    return Err(bad("attention.head_count", format!("{heads} heads do not divide width {hidden}")));
                }
                hidden / heads
            }
        };
        if matches!(family, Family::Llama | Family::Qwen2 | Family::Phi3) && head_dim * heads != hidden {
            return Err(bad("attention.key_length", format!("{heads} heads of {head_dim} do not make width {hidden}")));
        }
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
        if family != Family::Llama && g.tensors.contains_key("rope_freqs.weight") {
            return Err(ModelError::Unsupported(format!("RoPE frequency factors (rope_freqs.weight) in a `{arch}` file")));
        }
        if g.tensors.keys().any(|t| t.contains("rope_factors_long") || t.contains("rope_factors_short")) {
            return Err(ModelError::Unsupported(format!("LongRoPE factors (rope_factors_long/short, the 128k-context `{arch}` files)")));
        }
        let rope_scale = match g.metadata.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => 1.0,
            Some("linear") => {
                let f = g.get_f64(&key("rope.scaling.factor"))? as f32;
                if !(f.is_finite() && f >= 1.0) {
                    return Err(bad("rope.scaling.factor", format!("{f} is not a usable factor")));
                }
                1.0 / f
            }
            Some(other) => return Err(ModelError::Unsupported(format!("RoPE scaling `{other}`"))),
        };
        let window = match (family, g.metadata.get(&key("attention.sliding_window"))) {
            (Family::Gemma3, Some(_)) => {
                let w = g.get_usize(&key("attention.sliding_window"))?;
                if w == 0 || w > context {
                    return Err(bad("attention.sliding_window", format!("{w} is not within the context of {context}")));
                }
                Some(w)
            }
            (Family::Gemma3, None) => return Err(bad("attention.sliding_window", "missing (Gemma 3 files name their window)".into())),
            // llama.cpp runs Phi-3 files without their window too (its
            // converters do not say which layers have one).
            (Family::Phi3, _) => None,
            (_, Some(_)) => return Err(ModelError::Unsupported(format!("sliding-window attention in a `{arch}` file"))),
            (_, None) => None,
        };
        // llama.cpp scales Gemma 3 27B's queries by the width per head of
        // the model, every other size by the head width.
        let attn_scale = if family == Family::Gemma3 && layers == 62 {
            1.0 / ((hidden / heads) as f32).sqrt()
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
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
            q_dim: heads * head_dim,
            family,
            window,
            rope_base_local: if family == Family::Gemma3 { GEMMA3_LOCAL_ROPE_BASE } else { rope_base },
            rope_scale,
            attn_scale,
        })
    }

    /// The attention window of layer `i` (None: it sees every position).
    pub fn window_of(&self, i: usize) -> Option<usize> {
        self.window.filter(|_| self.family == Family::Gemma3 && (i + 1) % GEMMA3_GLOBAL_EVERY != 0)
    }

    /// Width of the keys (and values) of one token.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
