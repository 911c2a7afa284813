//! fogmesh's own endpoints: `GET /status`, `GET /peers`, `GET /plan`,
//! `GET /v1/fogmesh/dashboard` (what the page at `/` draws, in one answer),
//! `GET /v1/fogmesh/invite` (a join token, for local clients) and `POST /v1/fogmesh/generate` (a generation on the mesh, streamed as
//! JSON lines: what `fogmesh run` reads).

use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fogmesh_actors::{GenerateRequest, SessionEvent};

use super::types::{Dashboard, Done, GenEvent, GenFlags, PlanView, route_hops};
use super::{AppState, api_error, error};
use crate::mesh::NetError;

/// `GET /v1/fogmesh/dashboard`.
pub(super) async fn dashboard(State(s): State<AppState>) -> Response {
    let st = match s.net.status().await {
        Ok(st) => st,
        Err(e) => return unavailable(e),
    };
    let (route, no_route, shards, layers) = match &s.rt {
        Some(rt) => {
            let (route, why) = match rt.route(&[]).await {
                Ok(r) => (route_hops(&r), None),
                Err(e) => (Vec::new(), Some(e.to_string())),
            };
            let layers = rt.model().map_or(0, |m| m.config.layers);
            (route, why, rt.shard_status().await, layers)
        }
        None => (Vec::new(), Some("this node serves no model".to_string()), Vec::new(), 0),
    };
    Json(Dashboard {
        peer_id: st.peer_id,
        version: env!("CARGO_PKG_VERSION").to_string(),
        model: s.model_id(),
        layers,
        uptime_s: s.board.started.elapsed().as_secs_f64(),
        listen_addrs: st.listen_addrs,
        mdns: st.mdns,
        secret: st.secret,
        connections: st.connections,
        measurement: st.measurement,
        shards,
        route,
        no_route,
        peers: st.peers,
        nat: st.nat,
        relays: st.relays,
        links: s.rt.as_ref().map(|rt| rt.links().links()).unwrap_or_default(),
        generated_tokens: s.board.generated.load(Ordering::Relaxed),
        sessions: s.board.sessions.load(Ordering::Relaxed),
        incidents: s.incidents(),
        weights: s.rt.as_ref().map(|rt| rt.weights().status()),
    })
    .into_response()
}

/// `GET /v1/fogmesh/invite` (local clients, or with the API key): a token
/// another host joins this mesh with (`fogmesh node --join TOKEN`).
pub(super) async fn invite(State(s): State<AppState>) -> Response {
    match s.net.invite().await {
        Ok(i) => Json(serde_json::json!({
            "token": i.encode(),
            "secret": i.secret.is_some(),
            "addrs": i.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => unavailable(e),
    }
}

fn unavailable(e: NetError) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
}

pub(super) async fn status(State(s): State<AppState>) -> Response {
    match s.net.status().await {
        Ok(mut st) => {
            st.weights = s.rt.as_ref().map(|rt| rt.weights().status());
            Json(st).into_response()
        }
        Err(e) => unavailable(e),
    }
}

pub(super) async fn peers(State(s): State<AppState>) -> Response {
    match s.net.peers().await {
        Ok(p) => Json(p).into_response(),
        Err(e) => unavailable(e),
    }
}

/// `GET /plan`.
pub(super) async fn plan(State(s): State<AppState>) -> Response {
    let Some(rt) = s.rt else {
        return error(StatusCode::NOT_FOUND, "not_served", "this node serves no model (start it with --model PATH)");
    };
    let (routes, no_route) = match rt.routes(&[]).await {
        Ok(r) => (r.iter().map(|r| route_hops(r)).collect::<Vec<_>>(), None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let shards = rt.shard_status().await;
    let links = rt.links();
    Json(PlanView {
        peer_id: rt.local_peer().to_string(),
        route: routes.first().cloned().unwrap_or_default(),
        routes,
        no_route,
        shards,
        activations: links.policy().to_string(),
        links: links.links(),
        wire_frames: links.frames(),
    })
    .into_response()
}

fn event(e: SessionEvent, seed: u64, prompt_len: usize) -> GenEvent {
    match e {
        SessionEvent::Started { route } => GenEvent::Started { route: route_hops(&route), prompt_tokens: prompt_len },
        SessionEvent::Token { step, logprob } => {
            GenEvent::Token { token: step.token, text: step.text, logprob, finish_reason: step.finish }
        }
        SessionEvent::Failover { banned, reason } => GenEvent::Failover { banned, reason },
        SessionEvent::Recovered { route, recovery_ms } => GenEvent::Recovered { route: route_hops(&route), recovery_ms },
        SessionEvent::Done { generation: g, route, failovers } => GenEvent::Done(Done {
            prompt_tokens: g.prompt_tokens,
            tokens: g.tokens,
            text: g.text,
            finish_reason: g.finish_reason,
            seed,
            timings: g.timings,
            route: route_hops(&route),
            failovers,
        }),
        SessionEvent::Error(message) => GenEvent::Error { message },
        SessionEvent::Busy(why) => GenEvent::Error { message: format!("busy: {why}") },
    }
}

/// `POST /v1/fogmesh/generate`.
pub(super) async fn generate(State(s): State<AppState>, body: Body) -> Response {
    let Some(rt) = s.rt.clone() else {
        return error(StatusCode::NOT_FOUND, "not_served", "this node serves no model (start it with --model PATH)");
    };
    let flags: GenFlags = match super::parse(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let slot = match s.slot() {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(model) = rt.model().cloned() else {
        return error(StatusCode::NOT_FOUND, "not_served", "this node serves no model (start it with --model PATH)");
    };
    if flags.prompt.is_empty() {
        return api_error(StatusCode::BAD_REQUEST, "invalid_request_error", Some("prompt"), None, "prompt is empty");
    }
    let prompt = match flags.prompt_tokens(&model.tokenizer) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", e.to_string()),
    };
    let req = GenerateRequest { prompt: prompt.clone(), max_tokens: flags.max_tokens, sampling: flags.sampling(), stop: flags.stop.clone() };
    if let Err(e) = req.validate(&model.config) {
        return super::request_error(&e);
    }
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
    let mut h = s.capped(h, "fogmesh");
    if let Err(r) = h.admitted().await {
        return r;
    }
    let lines = futures::stream::unfold((h, s, slot), move |(mut h, s, slot)| async move {
        let e = h.next().await?;
        s.observe(&e);
        let mut line = serde_json::to_string(&event(e, seed, n)).unwrap_or_default();
        line.push('\n');
        Some((Ok::<_, std::convert::Infallible>(line), (h, s, slot)))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

