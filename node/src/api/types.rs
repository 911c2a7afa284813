//! Every JSON body the node writes and the project reads back, as serde
//! types: the generation request of `POST /v1/fogmesh/generate` (also the
//! flags of `fogmesh generate` and `fogmesh run`), its streamed events, the
//! plan, the dashboard (status, peers, shards, incidents). The handlers
//! write these; `fogmesh run`, `fogmesh status`, `LocalCluster` and the tests
//! read them.

use clap::Args;
use fogmesh_actors::Hop;
use fogmesh_actors::shard_actor::ShardStatus;
use fogmesh_models::{ChatMessage, FinishReason, REPEAT_LAST_N, SamplingParams, Timings};
use serde::{Deserialize, Serialize};

use crate::measure::SelfMeasurement;
pub use crate::mesh::{NodeStatus, PeerInfo};

/// The generation flags `fogmesh generate` and `fogmesh run` share; also the
/// body of a node's `POST /v1/fogmesh/generate` (missing fields take the
/// same defaults).
#[derive(Debug, Clone, Args, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenFlags {
    /// The prompt: a user message sent through the model's chat template,
    /// or the literal text with --raw.
    #[arg(long, short)]
    pub prompt: String,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A system message for chat mode (replaces the template's default).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Repetition penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// RNG seed: the same seed and flags give the same tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl Default for GenFlags {
    fn default() -> Self {
        GenFlags {
            prompt: String::new(),
            raw: false,
            system: None,
            max_tokens: 256,
            temperature: 0.7,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

impl GenFlags {
    /// The prompt's token ids (through the chat template unless `raw`).
    /// A chat prompt's content never yields control tokens; a raw prompt is
    /// the caller's whole prompt and keeps them.
    pub fn prompt_tokens(&self, tok: &fogmesh_models::Tokenizer) -> fogmesh_models::Result<Vec<u32>> {
        if self.raw {
            return tok.encode(&self.prompt);
        }
        let mut msgs = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &self.prompt));
        tok.encode_chat(&msgs)
    }

    /// The sampling parameters.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            repeat_last_n: REPEAT_LAST_N,
            seed: self.seed,
        }
    }
}

/// One hop of a route: `{"peer": …, "layers": [start, end]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteHop {
    /// The peer id.
    pub peer: String,
    /// `[first layer, one past the last]`.
    pub layers: [usize; 2],
}

/// A route as the API shows it.
pub fn route_hops(route: &[Hop]) -> Vec<RouteHop> {
    route.iter().map(|h| RouteHop { peer: h.peer.clone(), layers: [h.start, h.end] }).collect()
}

/// The finished generation, as the `done` event carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// The prompt's token ids.
    pub prompt_tokens: Vec<u32>,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The seed it sampled with.
    pub seed: u64,
    /// Timings.
    pub timings: Timings,
    /// The route that finished it.
    pub route: Vec<RouteHop>,
    /// Failovers on the way.
    pub failovers: u32,
}

/// One line of `POST /v1/fogmesh/generate`'s stream (`{"event": …, …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GenEvent {
    /// The route is open.
    Started {
        /// The route.
        route: Vec<RouteHop>,
        /// Prompt length in tokens.
        prompt_tokens: usize,
    },
    /// One generated token.
    Token {
        /// Its id.
        token: u32,
        /// Its final text (may be empty while a stop string is possible).
        text: String,
        /// Its log-probability.
        logprob: f32,
        /// Set on the last token.
        finish_reason: Option<FinishReason>,
    },
    /// A hop failed; the session moves to a new route.
    Failover {
        /// Peers banned for it.
        banned: Vec<String>,
        /// What went wrong.
        reason: String,
    },
    /// The first token after a failover arrived.
    Recovered {
        /// The new route.
        route: Vec<RouteHop>,
        /// From noticing the failure to that token.
        recovery_ms: f64,
    },
    /// The generation finished.
    Done(Done),
    /// The generation failed.
    Error {
        /// Why.
        message: String,
    },
}

/// A failover or recovery the dashboard remembers (`{"kind": …, …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Incident {
    /// A session banned peers and moved.
    Failover {
        /// When (Unix milliseconds).
        at_ms: u64,
        /// Peers banned.
        banned: Vec<String>,
        /// Why.
        reason: String,
    },
    /// A session's first token after a failover.
    Recovered {
        /// When (Unix milliseconds).
        at_ms: u64,
        /// The new route.
        route: Vec<RouteHop>,
        /// How long the recovery took.
        recovery_ms: f64,
    },
}

/// `GET /plan`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanView {
    /// This node.
    pub peer_id: String,
    /// The route placement prefers now (empty when none).
    pub route: Vec<RouteHop>,
    /// Every route placement gives now, the preferred first: whole
    /// replicas (one hop) and pipelines. Each request takes one of them.
    #[serde(default)]
    pub routes: Vec<Vec<RouteHop>>,
    /// Why there is no route, when there is none.
    pub no_route: Option<String>,
    /// The shards loaded here.
    pub shards: Vec<ShardStatus>,
    /// How activations cross the hops this node sends (`--activations`).
    #[serde(default)]
    pub activations: String,
    /// The links this node has sent stage traffic over, as measured.
    #[serde(default)]
    pub links: Vec<fogmesh_actors::links::LinkView>,
    /// Activation frames this node sent, by encoding.
    #[serde(default)]
    pub wire_frames: std::collections::BTreeMap<String, u64>,
}

/// `GET /v1/fogmesh/dashboard`: what the dashboard and `fogmesh status` show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dashboard {
    /// This node.
    pub peer_id: String,
    /// Its fogmesh version.
    pub version: String,
    /// The id of the model it serves.
    pub model: Option<String>,
    /// The model's layers (0 without one).
    pub layers: usize,
    /// Seconds since the node started.
    pub uptime_s: f64,
    /// Addresses it listens on.
    pub listen_addrs: Vec<String>,
    /// Whether mDNS is on.
    pub mdns: bool,
    /// Whether a cluster secret is set.
    pub secret: bool,
    /// Open connections.
    pub connections: u32,
    /// What the host measured about itself.
    pub measurement: SelfMeasurement,
    /// The shards loaded here.
    pub shards: Vec<ShardStatus>,
    /// The route placement gives now.
    pub route: Vec<RouteHop>,
    /// Why there is no route, when there is none.
    pub no_route: Option<String>,
    /// The membership view.
    pub peers: Vec<PeerInfo>,
    /// Whether peers can dial this node (AutoNAT's verdict).
    #[serde(default)]
    pub nat: crate::mesh::Nat,
    /// Relays holding a reservation for this node.
    #[serde(default)]
    pub relays: Vec<String>,
    /// The links this node has sent stage traffic over, as measured.
    #[serde(default)]
    pub links: Vec<fogmesh_actors::links::LinkView>,
    /// Tokens generated by sessions this node owned.
    pub generated_tokens: u64,
    /// Generations started here.
    pub sessions: u64,
    /// Recent failovers and recoveries, oldest first.
    pub incidents: Vec<Incident>,
    /// Model weights: fetch progress from peers, bytes fetched and served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<fogmesh_actors::weights::WeightsStatus>,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Always `ok` when it answers.
    pub status: String,
    /// The id of the model it serves.
    pub model: Option<String>,
    /// Whole seconds since the node started.
    pub uptime_s: u64,
}

/// An error body in OpenAI's shape (every error the node's HTTP answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong.
    pub message: String,
    /// The kind (`invalid_request_error`, `not_found_error`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<String>,
}
