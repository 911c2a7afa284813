//! The error type of the model engine.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
///
/// Every variant names the problem precisely enough for a user to act on it: a
/// malformed file says which field or tensor is wrong, never just "invalid".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The model file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not a GGUF file, or its structure is damaged.
    #[error("malformed GGUF: {0}")]
    Gguf(String),
    /// The file is well formed but holds a model this engine cannot run.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A required metadata key is missing or has the wrong type.
    #[error("GGUF metadata key `{key}`: {problem}")]
    Metadata {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A tensor is missing or has the wrong shape or type.
    #[error("tensor `{name}`: {problem}")]
    Tensor {
        /// The tensor's name in the file.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A requested layer range does not fit the model.
    #[error("layer range {start}..{end} is invalid for a model of {layers} layers")]
    LayerRange {
        /// First layer (inclusive).
        start: usize,
        /// Last layer (exclusive).
        end: usize,
        /// Number of layers in the model.
        layers: usize,
    },
    /// The input given to a shard does not fit it (token ids to a middle stage,
    /// wrong hidden width, a token id out of the vocabulary...).
    #[error("bad shard input: {0}")]
    Input(String),
    /// A session ran past the model's context length.
    #[error("context full: position {pos} + {tokens} tokens exceeds the context of {ctx}")]
    ContextFull {
        /// Tokens already in the session.
        pos: usize,
        /// Tokens that were to be added.
        tokens: usize,
        /// The model's context length.
        ctx: usize,
    },
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// Invalid sampling parameters.
    #[error("sampling: {0}")]
    Sampling(String),
    /// An error from candle.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The result type of the model engine.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn gguf_err(msg: impl Into<String>) -> ModelError {
    ModelError::Gguf(msg.into())
}

/// What kind of check a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestErrorKind {
    /// A field is out of its range.
    Invalid,
    /// The prompt, or the prompt plus `max_tokens`, does not fit the context.
    ContextExceeded,
}

/// Why a request was refused: the field at fault and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// The field at fault, as the APIs name it (`prompt`, `max_tokens`,
    /// `temperature`, `top_p`, `repeat_penalty`, `stop`).
    pub param: &'static str,
    /// The kind of failure.
    pub kind: RequestErrorKind,
    /// What is wrong, and what would be accepted.
    pub message: String,
}

pub(crate) fn invalid(param: &'static str, message: String) -> RequestError {
    RequestError { param, kind: RequestErrorKind::Invalid, message }
}
