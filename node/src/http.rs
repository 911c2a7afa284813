//! The node's local HTTP endpoint: `GET /health`, `GET /status` (the node and
//! its view), `GET /peers` (the view as a JSON array), `GET /plan` (the
//! placement route and this node's shards) and `POST /v1/fogmesh/generate`
//! (a generation on the mesh, streamed as JSON lines; what `fogmesh run`
//! uses). Later issues grow it into the OpenAI-compatible API and the
//! dashboard.

use std::future::Future;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fogmesh_actors::{GenerateRequest, Hop, Runtime, SessionEvent};
use serde_json::{Value, json};

use crate::cli::GenFlags;
use crate::net::{NetError, NetHandle};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    net: NetHandle,
    rt: Option<Runtime>,
}

/// The router over a node's handle and (when it serves a model) its actors.
pub fn router(net: NetHandle, rt: Option<Runtime>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/peers", get(peers))
        .route("/plan", get(plan))
        .route("/v1/fogmesh/generate", post(generate))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(AppState { net, rt })
}

/// An error in OpenAI's shape.
pub fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": { "message": message.into(), "type": kind } }))).into_response()
}

fn unavailable(e: NetError) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
}

async fn status(State(s): State<AppState>) -> Response {
    match s.net.status().await {
        Ok(st) => Json(st).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn peers(State(s): State<AppState>) -> Response {
    match s.net.peers().await {
        Ok(p) => Json(p).into_response(),
        Err(e) => unavailable(e),
    }
}

/// A route as JSON: `[{"peer": …, "layers": [start, end]}, …]`.
pub fn route_json(route: &[Hop]) -> Value {
    Value::Array(route.iter().map(|h| json!({ "peer": h.peer, "layers": [h.start, h.end] })).collect())
}

async fn plan(State(s): State<AppState>) -> Response {
    let Some(rt) = s.rt else {
        return error(StatusCode::NOT_FOUND, "not_served", "this node serves no model (start it with --model PATH)");
    };
    let route = rt.route(&[]).await.map(|r| route_json(&r)).map_err(|e| e.to_string());
    let shards = rt.shard_status().await;
    let (route, why) = match route {
        Ok(r) => (r, Value::Null),
        Err(e) => (Value::Array(vec![]), Value::String(e)),
    };
    Json(json!({ "peer_id": rt.local_peer(), "route": route, "no_route": why, "shards": shards })).into_response()
}

fn event_json(e: SessionEvent, seed: u64, prompt_len: usize) -> Value {
    match e {
        SessionEvent::Started { route } => json!({ "event": "started", "route": route_json(&route), "prompt_tokens": prompt_len }),
        SessionEvent::Token { step, logprob } => {
            json!({ "event": "token", "token": step.token, "text": step.text, "logprob": logprob, "finish_reason": step.finish })
        }
        SessionEvent::Failover { banned, reason } => json!({ "event": "failover", "banned": banned, "reason": reason }),
        SessionEvent::Recovered { route, recovery_ms } => {
            json!({ "event": "recovered", "route": route_json(&route), "recovery_ms": recovery_ms })
        }
        SessionEvent::Done { generation: g, route, failovers } => json!({
            "event": "done", "prompt_tokens": g.prompt_tokens, "tokens": g.tokens, "text": g.text,
            "finish_reason": g.finish_reason, "seed": seed, "timings": g.timings, "route": route_json(&route),
            "failovers": failovers,
        }),
        SessionEvent::Error(m) => json!({ "event": "error", "message": m }),
    }
}

async fn generate(State(s): State<AppState>, body: axum::body::Bytes) -> Response {
    let Some(rt) = s.rt else {
        return error(StatusCode::NOT_FOUND, "not_served", "this node serves no model (start it with --model PATH)");
    };
    let flags: GenFlags = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", format!("bad request body: {e}")),
    };
    let model = rt.model().expect("a runtime with a model").clone();
    if flags.prompt.is_empty() {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "prompt is empty");
    }
    let prompt = match flags.prompt_tokens(&model.tokenizer) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", e.to_string()),
    };
    if flags.max_tokens > model.config.context {
        let m = format!("max_tokens {} exceeds the model's context of {}", flags.max_tokens, model.config.context);
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", m);
    }
    let req = GenerateRequest {
        prompt: prompt.clone(),
        max_tokens: flags.max_tokens,
        sampling: flags.sampling(),
        stop: flags.stop.clone(),
    };
    let h = match rt.generate(req).await {
        Ok(h) => h,
        Err(e @ fogmesh_actors::RuntimeError::Invalid(_)) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", e.to_string());
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    };
    let (seed, n) = (flags.seed, prompt.len());
    // Dropping the body (a client that went away) drops the receiver; the
    // session notices on its next event and cancels everywhere.
    let lines = futures::stream::unfold(h.events, move |mut rx| async move {
        let e = rx.recv().await?;
        let mut line = event_json(e, seed, n).to_string();
        line.push('\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// Serves the router on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    net: NetHandle,
    rt: Option<Runtime>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(net, rt)).with_graceful_shutdown(shutdown).await
}
