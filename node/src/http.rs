//! The node's local HTTP endpoint: `GET /health`, `GET /status` (the node and
//! its view) and `GET /peers` (the view as a JSON array). Later issues grow it
//! into the OpenAI-compatible API and the dashboard.

use std::future::Future;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::net::{NetError, NetHandle};

/// The router over a node's handle.
pub fn router(handle: NetHandle) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/peers", get(peers))
        .with_state(handle)
}

fn unavailable(e: NetError) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": { "message": e.to_string(), "type": "unavailable" } })))
        .into_response()
}

async fn status(State(h): State<NetHandle>) -> Response {
    match h.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn peers(State(h): State<NetHandle>) -> Response {
    match h.peers().await {
        Ok(p) => Json(p).into_response(),
        Err(e) => unavailable(e),
    }
}

/// Serves the router on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: NetHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(handle)).with_graceful_shutdown(shutdown).await
}
