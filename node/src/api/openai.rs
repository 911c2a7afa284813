//! The OpenAI-compatible API: `POST /v1/chat/completions`,
//! `POST /v1/completions` (streamed as server-sent events or not),
//! `GET /v1/models` and `GET /v1/models/{id}`.
//!
//! Requests are parsed by hand from the body (bounded by
//! [`super::MAX_BODY`]) so that every mistake gets a 400 in OpenAI's
//! error shape naming the field, rather than a framework's plain-text
//! rejection. Fields OpenAI defines that do not change what fogmesh does
//! (`user`, `presence_penalty`, …) are accepted and ignored; `n` above 1,
//! unknown roles, out-of-range sampling values, an unknown model and a
//! prompt plus `max_tokens` past the context are refused.

// Handlers' helpers return the finished error response as their `Err`; it
// is built once per refused request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fogmesh_actors::{GenerateRequest, ModelInfo, Runtime, SessionEvent};
use fogmesh_models::{ChatMessage, FinishReason, REPEAT_LAST_N, SamplingParams, Tokenizer};
use serde::Deserialize;
use serde_json::{Value, json};

use super::types::GenFlags;
use super::{AppState, Capped, api_error, error, request_error};

/// Most messages in one chat request.
pub const MAX_MESSAGES: usize = 1024;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// fogmesh extension: keep the K most likely tokens (0: all).
    #[serde(default)]
    top_k: Option<usize>,
    /// fogmesh extension: repetition penalty (1: off).
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    /// Chat: `true` for each chosen token's log-probability. Completions:
    /// refused unless null/0 (its legacy format is not served).
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(flatten)]
    common: Common,
}

/// A message's content: text, or a list of parts of which text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// `prompt` of `/v1/completions`: text, one text in a list, token ids, or
/// one list of token ids in a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn bad_param(param: &str, message: impl Into<String>) -> Response {
    api_error(StatusCode::BAD_REQUEST, "invalid_request_error", Some(param), None, message)
}

/// Reads a JSON body (bounded) into `T`, or answers 400/413 saying what is
/// wrong.
pub async fn parse<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, Response> {
    parse_json(&super::read_body(body).await?)
}

/// A JSON body into `T`, or a 400 saying what is wrong.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    if body.is_empty() {
        return Err(bad("the request body is empty; send a JSON object (Content-Type: application/json)"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let msg = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => format!("invalid JSON: {e}"),
            _ => format!("invalid request: {e}"),
        };
        bad(msg)
    })
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Context => "length",
    }
}

/// What both endpoints settle before generating.
#[derive(Debug)]
pub struct Plan {
    /// The model as the request named it.
    pub model: String,
    /// The generation, checked against the model.
    pub req: GenerateRequest,
    /// Streamed as server-sent events.
    pub stream: bool,
    /// A usage chunk ends the stream.
    pub include_usage: bool,
    /// Each chosen token's log-probability is returned.
    pub logprobs: bool,
}

/// Checks the shared fields against the served model; `prompt` is already
/// tokenized.
fn plan(model: &ModelInfo, c: Common, prompt: Vec<u32>, kind: Endpoint) -> Result<Plan, Response> {
    let logprobs = match (kind, &c.logprobs) {
        (_, None | Some(Value::Null)) => false,
        (Endpoint::Chat, Some(Value::Bool(b))) => *b,
        (Endpoint::Chat, Some(other)) => return Err(bad_param("logprobs", format!("logprobs must be true or false, got {other}"))),
        (Endpoint::Completions, Some(v)) if v == &json!(0) || v == &json!(false) => false,
        (Endpoint::Completions, Some(_)) => {
            return Err(bad_param("logprobs", "logprobs is not served on /v1/completions; use /v1/chat/completions with logprobs: true"));
        }
    };
    if c.top_logprobs.is_some_and(|n| n > 0) {
        return Err(bad_param("top_logprobs", "top_logprobs above 0 is not supported: fogmesh returns each chosen token's log-probability"));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(bad_param("n", "only n = 1 is supported"));
    }
    let defaults = GenFlags::default();
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(bad_param("stream_options", "stream_options is only allowed with stream: true"));
    }
    let include_usage = c.stream_options.unwrap_or_default().include_usage.unwrap_or(false);
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(defaults.temperature),
        top_k: c.top_k.unwrap_or(defaults.top_k),
        top_p: c.top_p.unwrap_or(defaults.top_p),
        repetition_penalty: c.repeat_penalty.unwrap_or(defaults.repeat_penalty),
        repeat_last_n: REPEAT_LAST_N,
        // No seed: a fresh one, as OpenAI's sampling is not reproducible
        // without one.
        seed: c.seed.map_or_else(rand::random::<u64>, |s| s as u64),
    };
    // Without max_tokens, the rest of the context.
    let room = model.config.context.saturating_sub(prompt.len());
    let asked = c.max_completion_tokens.or(c.max_tokens);
    let max_tokens = asked.map_or(room, |m| m.min(usize::MAX as u64) as usize);
    let req = GenerateRequest { prompt, max_tokens, sampling, stop };
    req.validate(&model.config).map_err(|e| request_error(&e))?;
    Ok(Plan { model: c.model, req, stream, include_usage, logprobs })
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat(State(s): State<AppState>, body: Body) -> Response {
    handle(s, body, Endpoint::Chat).await
}

/// `POST /v1/completions`.
pub(super) async fn completions(State(s): State<AppState>, body: Body) -> Response {
    handle(s, body, Endpoint::Completions).await
}

async fn handle(s: AppState, body: Body, endpoint: Endpoint) -> Response {
    let bytes = match super::read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut rt = None;
    let p = check(endpoint, &bytes, |id| {
        let (r, m) = s.served_model(id)?;
        rt = Some(r.clone());
        Ok(m.clone())
    });
    match (p, rt) {
        (Ok(p), Some(rt)) => respond(s, rt, p, endpoint).await,
        (Err(r), _) => r,
        (Ok(_), None) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "a plan without a runtime"),
    }
}

/// A request body sent to `endpoint`, read and checked against the model
/// `resolve` gives for the id the body names: the generation to run, or
/// the 4xx to answer. No runtime is involved (the fuzz target and the
/// corpus replay drive it directly).
pub fn check(endpoint: Endpoint, body: &[u8], resolve: impl FnOnce(&str) -> Result<Arc<ModelInfo>, Response>) -> Result<Plan, Response> {
    match endpoint {
        Endpoint::Chat => {
            let req: ChatRequest = parse_json(body)?;
            let model = resolve(&req.common.model)?;
            check_chat(req, &model)
        }
        Endpoint::Completions => {
            let req: CompletionRequest = parse_json(body)?;
            let model = resolve(&req.common.model)?;
            check_completion(req, &model)
        }
    }
}

fn check_chat(req: ChatRequest, model: &ModelInfo) -> Result<Plan, Response> {
    if req.messages.is_empty() || req.messages.len() > MAX_MESSAGES {
        return Err(bad_param("messages", format!("messages must hold 1 to {MAX_MESSAGES} messages")));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(bad_param("messages", format!("messages[{i}].role {other:?} is not one of system, developer, user, assistant")));
            }
        };
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(x)) => t.push_str(x),
                        (kind, _) => {
                            return Err(bad_param("messages", format!("messages[{i}]: content part of type {kind:?} is not supported (text only)")));
                        }
                    }
                }
                t
            }
        };
        msgs.push(ChatMessage::new(role, &text));
    }
    let prompt = model.tokenizer.encode_chat(&msgs).map_err(|e| bad_param("messages", format!("cannot render the chat template: {e}")))?;
    plan(model, req.common, prompt, Endpoint::Chat)
}

fn check_completion(req: CompletionRequest, model: &ModelInfo) -> Result<Plan, Response> {
    if req.echo == Some(true) {
        return Err(bad_param("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|x| !x.is_empty()) {
        return Err(bad_param("suffix", "suffix is not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(bad_param("best_of", "only best_of = 1 is supported"));
    }
    let vocab = model.config.vocab;
    let ids = |ids: Vec<u32>| -> Result<Vec<u32>, Response> {
        match ids.iter().find(|&&t| t as usize >= vocab) {
            Some(t) => Err(bad_param("prompt", format!("token id {t} is outside the vocabulary of {vocab}"))),
            None => Ok(ids),
        }
    };
    let text = |t: String| model.tokenizer.encode(&t).map_err(|e| bad_param("prompt", format!("cannot tokenize the prompt: {e}")));
    let prompt = match req.prompt {
        Prompt::Text(t) => text(t),
        Prompt::Texts(mut v) if v.len() == 1 => text(v.remove(0)),
        Prompt::Ids(v) => ids(v),
        Prompt::IdLists(mut v) if v.len() == 1 => ids(v.remove(0)),
        _ => Err(bad_param("prompt", "one prompt per request (a list of prompts is not supported)")),
    }?;
    plan(model, req.common, prompt, Endpoint::Completions)
}

/// Which OpenAI endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

/// The response's fixed fields, and what its metrics need.
#[derive(Clone)]
struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Endpoint,
    prompt_len: usize,
    started: Instant,
    endpoint: &'static str,
    /// Set when the request asked for logprobs: the tokenizer that names
    /// each token.
    logprobs: Option<Arc<Tokenizer>>,
}

impl Head {
    /// One chosen token's entry of `logprobs.content`.
    fn logprob(&self, token: u32, logprob: f32) -> Option<Value> {
        let tok = self.logprobs.as_ref()?;
        let text = tok.decode(&[token], false).unwrap_or_default();
        Some(json!({ "token": text, "logprob": logprob, "bytes": text.as_bytes(), "top_logprobs": [] }))
    }

    /// `logprobs` of a choice holding `entries` (null when not asked for).
    fn logprobs_of(&self, entries: Vec<Value>) -> Value {
        if self.logprobs.is_some() { json!({ "content": entries }) } else { Value::Null }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    /// One streamed choice: `text` (None: the first chat chunk, carrying
    /// the role), the log-probabilities of the tokens it covers, and a
    /// finish reason.
    fn chunk(&self, text: Option<&str>, logprobs: Vec<Value>, finish: Option<&str>) -> Value {
        let lp = if text.is_some() || !logprobs.is_empty() { self.logprobs_of(logprobs) } else { Value::Null };
        let choice = match self.kind {
            Endpoint::Chat => {
                let delta = match (text, finish) {
                    (None, None) => json!({ "role": "assistant", "content": "" }),
                    (Some(t), _) => json!({ "content": t }),
                    (None, Some(_)) => json!({}),
                };
                json!({ "index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish })
            }
            Endpoint::Completions => json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": finish }),
        };
        json!({ "id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
                "system_fingerprint": fingerprint(), "choices": [choice] })
    }

    fn usage_chunk(&self, usage: Value) -> Value {
        json!({ "id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
                "system_fingerprint": fingerprint(), "choices": [], "usage": usage })
    }
}

fn fingerprint() -> String {
    format!("fogmesh-{}", env!("CARGO_PKG_VERSION"))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

async fn respond(s: AppState, rt: Runtime, p: Plan, kind: Endpoint) -> Response {
    let slot = match s.slot() {
        Ok(p) => p,
        Err(r) => return r,
    };
    let started = Instant::now();
    let prompt_len = p.req.prompt.len();
    let h = match rt.generate(p.req).await {
        Ok(h) => h,
        Err(e @ fogmesh_actors::RuntimeError::Invalid(_)) => return bad(e.to_string()),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    };
    let prefix = if kind == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let endpoint = if kind == Endpoint::Chat { "chat" } else { "completions" };
    let id = format!("{prefix}-{:016x}", rand::random::<u64>());
    let logprobs = p.logprobs.then(|| rt.model().map(|m| m.tokenizer.clone())).flatten();
    let head = Head { id, created: now_s(), model: p.model, kind, prompt_len, started, endpoint, logprobs };
    let mut h = s.capped(h, endpoint);
    if let Err(r) = h.admitted().await {
        return r;
    }
    if p.stream {
        stream(s, h, head, p.include_usage, slot)
    } else {
        let r = whole(s, h, head).await;
        drop(slot);
        r
    }
}

/// Waits for the whole generation and answers one JSON object.
async fn whole(s: AppState, mut h: Capped, head: Head) -> Response {
    let (prompt_len, started, endpoint) = (head.prompt_len, head.started, head.endpoint);
    let mut first = true;
    let mut entries = Vec::new();
    while let Some(e) = h.next().await {
        s.observe(&e);
        match e {
            SessionEvent::Token { step, logprob } => {
                if first {
                    first = false;
                    metrics::histogram!(crate::metrics::TTFT_SECONDS, "endpoint" => endpoint).record(started.elapsed().as_secs_f64());
                }
                entries.extend(head.logprob(step.token, logprob));
            }
            SessionEvent::Done { generation: g, .. } => {
                metrics::counter!(crate::metrics::API_TOKENS, "endpoint" => endpoint).increment(g.tokens.len() as u64);
                let finish = finish_name(g.finish_reason);
                let choice = match head.kind {
                    Endpoint::Chat => json!({ "index": 0, "message": { "role": "assistant", "content": g.text },
                                          "logprobs": head.logprobs_of(entries), "finish_reason": finish }),
                    Endpoint::Completions => json!({ "index": 0, "text": g.text, "logprobs": Value::Null, "finish_reason": finish }),
                };
                let body = json!({ "id": head.id, "object": head.object(false), "created": head.created, "model": head.model,
                                   "system_fingerprint": fingerprint(), "choices": [choice],
                                   "usage": usage(prompt_len, g.tokens.len()) });
                return Json(body).into_response();
            }
            SessionEvent::Error(m) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("the generation failed: {m}")),
            _ => {}
        }
    }
    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the generation ended without an answer (the node is shutting down?)")
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Streams the generation as server-sent events in OpenAI's chunk format,
/// ending with `data: [DONE]`. A client that goes away drops the stream,
/// which drops the handle and cancels the session on every hop.
fn stream(s: AppState, h: Capped, head: Head, include_usage: bool, slot: tokio::sync::OwnedSemaphorePermit) -> Response {
    let (prompt_len, started, endpoint) = (head.prompt_len, head.started, head.endpoint);
    struct St {
        s: AppState,
        h: Capped,
        head: Head,
        first: bool,
        ended: bool,
        /// Log-probabilities of tokens whose text is still held back.
        pending: Vec<Value>,
        /// Held until the stream is dropped (finished or abandoned).
        _slot: tokio::sync::OwnedSemaphorePermit,
    }
    let st = St { s, h, head, first: true, ended: false, pending: Vec::new(), _slot: slot };
    let chunks = futures::stream::unfold(st, move |mut st| async move {
        if st.ended {
            return None;
        }
        loop {
            let Some(e) = st.h.next().await else {
                st.ended = true;
                let err = json!({ "error": { "message": "the generation ended without an answer (the node is shutting down?)", "type": "unavailable" } });
                return Some((Ok::<_, Infallible>(sse(&err)), st));
            };
            st.s.observe(&e);
            match e {
                SessionEvent::Started { .. } if st.head.kind == Endpoint::Chat => {
                    return Some((Ok(sse(&st.head.chunk(None, Vec::new(), None))), st));
                }
                SessionEvent::Token { step, logprob } => {
                    if st.first {
                        st.first = false;
                        metrics::histogram!(crate::metrics::TTFT_SECONDS, "endpoint" => endpoint).record(started.elapsed().as_secs_f64());
                    }
                    st.pending.extend(st.head.logprob(step.token, logprob));
                    if !step.text.is_empty() {
                        let lp = std::mem::take(&mut st.pending);
                        return Some((Ok(sse(&st.head.chunk(Some(&step.text), lp, None))), st));
                    }
                }
                SessionEvent::Done { generation: g, .. } => {
                    st.ended = true;
                    metrics::counter!(crate::metrics::API_TOKENS, "endpoint" => endpoint).increment(g.tokens.len() as u64);
                    let lp = std::mem::take(&mut st.pending);
                    let mut out = sse(&st.head.chunk(None, lp, Some(finish_name(g.finish_reason)))).to_vec();
                    if include_usage {
                        out.extend_from_slice(&sse(&st.head.usage_chunk(usage(prompt_len, g.tokens.len()))));
                    }
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    return Some((Ok(Bytes::from(out)), st));
                }
                SessionEvent::Error(m) => {
                    st.ended = true;
                    let err = json!({ "error": { "message": format!("the generation failed: {m}"), "type": "unavailable" } });
                    return Some((Ok(sse(&err)), st));
                }
                _ => {}
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(chunks))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// `GET /v1/models`.
pub(super) async fn models(State(s): State<AppState>) -> Response {
    let data: Vec<Value> = s.model_id().into_iter().map(|id| model_object(&id)).collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

/// `GET /v1/models/{id}`.
pub(super) async fn model(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.served_model(&id) {
        Ok(_) => Json(model_object(&id)).into_response(),
        Err(r) => r,
    }
}

fn model_object(id: &str) -> Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": "fogmesh" })
}
