//! Why things fail: [`RuntimeError`] (the runtime refused something),
//! [`Refusal`] (a call this peer refuses, as the wire carries it) and
//! [`SessionError`] (a generation that did not finish).

use fogmesh_protocols::ErrorCode;

/// Why the runtime refused something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// This peer has no model file.
    #[error("this peer serves no model")]
    NoModel,
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No route can be formed.
    #[error("no route: {0}")]
    NoRoute(String),
    /// The model engine failed.
    #[error(transparent)]
    Model(#[from] fogmesh_models::ModelError),
    /// An actor could not be started or reached.
    #[error("actor: {0}")]
    Actor(String),
}

/// Why a generation ended without finishing; its text is what the caller
/// sees in [`crate::SessionEvent::Error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No route could be formed (the runtime's reason).
    #[error("{0}")]
    NoRoute(String),
    /// The failover budget is spent.
    #[error("gave up after {failovers} failovers; last: {last}")]
    GaveUp {
        /// Failovers made.
        failovers: u32,
        /// The last failure.
        last: String,
    },
    /// A stage's model failed on the input (no other route would do better).
    #[error("stage {peer} failed: {reason}")]
    Stage {
        /// The stage's peer.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// This peer's own stage refused the input.
    #[error("stage failed: {0}")]
    LocalStage(String),
    /// The token loop failed (sampling, decoding).
    #[error("{0}")]
    Generation(String),
    /// The caller stopped reading events.
    #[error("the caller went away")]
    CallerGone,
    /// The caller cancelled it.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// Every route stayed full (running sessions hold the room for caches).
    #[error("{0}")]
    Busy(String),
}

/// A call this peer refuses: the code and reason its error frame carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    /// The wire's reason code.
    pub code: ErrorCode,
    /// What is wrong.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `code` for `reason`.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Refusal { code, reason: reason.into() }
    }
}

/// The error frame answering a call that failed.
pub fn error_frame(code: fogmesh_protocols::ErrorCode, message: impl Into<String>) -> fogmesh_protocols::Message {
    fogmesh_protocols::Message::Error(fogmesh_protocols::ErrorFrame { request: 0, code, message: message.into() })
}
