//! [`RuntimeError`]: why a peer's runtime refused something.

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
