//! What a generation reports to its caller.

use fogmesh_models::{Generation, Step};

use crate::link::PeerKey;
use crate::policy::Hop;

/// What a generation reports to its caller, in order.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// The route is open and the prompt is on its way.
    Started {
        /// The route.
        route: Vec<Hop>,
    },
    /// One generated token.
    Token {
        /// The token, its final text and whether it ended the generation.
        step: Step,
        /// Its log-probability.
        logprob: f32,
    },
    /// A hop failed; the session moves to a new route.
    Failover {
        /// Peers banned for it.
        banned: Vec<PeerKey>,
        /// What went wrong.
        reason: String,
    },
    /// The first token after a failover arrived.
    Recovered {
        /// The new route.
        route: Vec<Hop>,
        /// From noticing the failure to that token, in milliseconds.
        recovery_ms: f64,
    },
    /// The generation finished.
    Done {
        /// Everything generated, with timings.
        generation: Generation,
        /// The route that finished it.
        route: Vec<Hop>,
        /// Failovers on the way.
        failovers: u32,
    },
    /// The generation failed.
    Error(String),
    /// No route had room for the session within the wait bound
    /// (`RuntimeConfig::open_wait`); nothing was generated. Retry later.
    Busy(String),
}
