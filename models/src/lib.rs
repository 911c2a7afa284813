//! # fogmesh-models
//!
//! The model engine: runs any contiguous layer range of a Llama-family GGUF
//! model, token-for-token right, on candle-core's quantized types plus fused
//! CPU kernels for the hot path. It knows nothing about peers.
//!
//! ```no_run
//! # fn main() -> fogmesh_models::Result<()> {
//! use fogmesh_models::{LocalModel, SamplingParams};
//! let model = LocalModel::load(&fogmesh_models::default_model_path(), None, 2)?;
//! let prompt = model.tokenizer().encode("The capital of France is")?;
//! let out = model.generate(prompt, 16, SamplingParams::greedy(), vec![], 0, |_| {})?;
//! println!("{}", out.text);
//! # Ok(()) }
//! ```
//!
//! ## Layout
//! - `gguf.rs`: bounded GGUF reader (metadata, tensor directory, tensor bytes).
//! - `config.rs`: [`LlamaConfig`] from metadata.
//! - `quant.rs` (+ `quant/`): the weight layout, activation quantization and the
//!   matrix kernels (`repack.rs` GGUF blocks → affine layout, `scales.rs` their
//!   scales in the file's width, `portable.rs` the portable kernel, `x86.rs`
//!   AVX-512 VNNI / AVX2 kernels with `x86/float.rs` for float weights,
//!   `float.rs` F32/F16/BF16 matrices, `generic.rs` candle `vec_dot` for other
//!   types).
//! - `pool.rs`: the fork-join [`ThreadPool`].
//! - `ops.rs`: RMSNorm, RoPE, SiLU, attention.
//! - `shard.rs`: [`Shard`] (a loaded layer range: range loading, embedding,
//!   head, dispatch through the blocks) and [`SessionCache`] (its KV cache for
//!   one session).
//! - `arch.rs` (+ `arch/`): the blocks, one file per architecture
//!   (`llama.rs`: Llama, Mistral, Granite; `gemma3.rs`; `qwen2.rs`,
//!   `qwen3.rs`, `phi3.rs`, which load into the Llama block), the `Block` that
//!   dispatches to them, and what they share (tensor loader, scratch
//!   buffers, the `Pass` a block runs with).
//! - `tokenizer.rs` (+ `tokenizer/`): [`Tokenizer`] and chat template from
//!   metadata; `spm.rs` (the SentencePiece-style vocabulary of `llama`
//!   tokenizer files, as llama.cpp reads it).
//! - `sampling.rs`: [`Sampler`].
//! - `request.rs`: [`GenerateRequest`] and its one set of checks.
//! - `generate.rs`: [`GenerationState`] (the token loop) and [`LocalModel`].
//! - `profile.rs`: per-layer cost for placement.
//! - `stats.rs`: the median of measurements (bench command, benchmarks).
//! - `paths.rs`: cache directory and the default model's identity.
//! - `reference.rs`: a slow f32 forward pass on candle tensors, the test oracle.
//! - `testing.rs`: quantized test tensors and pseudo-random data (hidden).

mod arch;
mod config;
mod error;
pub mod gguf;
mod generate;
mod ops;
mod paths;
mod pool;
mod profile;
mod quant;
mod request;
pub mod reference;
mod sampling;
mod shard;
pub mod stats;
mod tokenizer;
#[doc(hidden)]
pub mod testing;

pub use config::{Family, LlamaConfig};
pub use error::{ModelError, RequestError, RequestErrorKind, Result};
pub use generate::{
    BoundaryHook, FinishReason, Generation, GenerationState, LocalModel, PREFILL_CHUNK, Step, Timings, uneven_ranges,
};
pub use paths::{
    CATALOGUE, CatalogueModel, DEFAULT_MODEL_FILE, DEFAULT_MODEL_MEMBER, DEFAULT_MODEL_PIP, DEFAULT_MODEL_SHA256, catalogue,
    catalogue_path, default_model_cache_path, default_model_path, home_dir,
};
pub use pool::ThreadPool;
pub use profile::{LayerCost, ModelProfile};
pub use request::{GenerateRequest, MAX_STOP_BYTES, MAX_STOPS};
pub use sampling::{MAX_REPEAT_PENALTY, MAX_TEMPERATURE, REPEAT_LAST_N, Sampler, SamplingParams, TokenLogit, argmax, log_prob, top_logits};
pub use shard::{BatchItem, LogitsFor, SessionCache, Shard, ShardInput, ShardOutput};
pub use tokenizer::{ChatMessage, Tokenizer};

/// The name of the matrix kernel this process uses (`vnni`, `avx2` or `portable`).
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match quant::x86_level() {
            quant::KernelLevel::Vnni => "vnni",
            quant::KernelLevel::Avx2 => "avx2",
            quant::KernelLevel::Portable => "portable",
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "portable"
    }
}
