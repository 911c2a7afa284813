//! The HTTP client side of a node's API, for commands and local clusters:
//! where a running node's address is found, plain GETs, and a streamed
//! generation read back as typed events.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::api::types::{Done, ErrorBody, GenEvent, GenFlags};

/// Where `fogmesh node` serves HTTP unless told otherwise.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8469";
/// File in the data dir holding the HTTP address of the running node.
pub const HTTP_ADDR_FILE: &str = "http.addr";

/// The address of the node to ask: `node` when given, else the one the node
/// in `dir` wrote, else [`DEFAULT_HTTP`].
pub fn node_addr(node: &Option<String>, dir: &Path) -> String {
    if let Some(n) = node {
        return n.clone();
    }
    std::fs::read_to_string(dir.join(HTTP_ADDR_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_HTTP.to_string())
}

/// Fetches `path` from the node's HTTP endpoint.
pub fn http_get(node: &str, path: &str) -> Result<String> {
    http_get_with(node, path, None)
}

/// Fetches `path` from the node's HTTP endpoint, with the node's API key
/// when it has one; an answer other than 2xx is an error carrying the
/// node's message.
pub fn http_get_with(node: &str, path: &str, api_key: Option<&str>) -> Result<String> {
    let base = if node.starts_with("http://") { node.to_string() } else { format!("http://{node}") };
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(&url);
    if let Some(k) = api_key {
        req = req.header("authorization", &format!("Bearer {k}"));
    }
    let mut resp = req.call().with_context(|| format!("no fogmesh node answered at {node} (is `fogmesh node` running? pass --node ADDR)"))?;
    let status = resp.status();
    let text = resp.body_mut().with_config().limit(64 << 20).read_to_string().with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        let msg = serde_json::from_str::<ErrorBody>(&text).map_or(text, |b| b.error.message);
        bail!("{node} answered {status} to GET {path}: {msg}");
    }
    Ok(text)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// What a finished generation on the mesh reported.
#[derive(Debug)]
pub struct MeshRun {
    /// The `done` event.
    pub done: Done,
    /// Failover and recovery events on the way.
    pub incidents: Vec<GenEvent>,
}

/// Runs `flags` through the node at `node`, calling `on_text` with each
/// piece of final text as it streams.
pub fn generate_on(node: &str, flags: &GenFlags, on_text: impl FnMut(&str)) -> Result<MeshRun> {
    generate_on_with(node, None, flags, on_text)
}

/// [`generate_on`] with the node's API key when it has one.
pub fn generate_on_with(node: &str, api_key: Option<&str>, flags: &GenFlags, mut on_text: impl FnMut(&str)) -> Result<MeshRun> {
    let base = if node.starts_with("http://") { node.to_string() } else { format!("http://{node}") };
    let url = format!("{}/v1/fogmesh/generate", base.trim_end_matches('/'));
    let body = serde_json::to_string(flags)?;
    let mut req = agent().post(&url).header("content-type", "application/json");
    if let Some(k) = api_key {
        req = req.header("authorization", &format!("Bearer {k}"));
    }
    let resp = req
        .send(body.as_bytes())
        .with_context(|| format!("no fogmesh node answered at {node} (is `fogmesh node --model PATH` running? pass --node ADDR)"))?;
    let status = resp.status();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    if !status.is_success() {
        let mut text = String::new();
        let _ = Read::take(&mut reader, 64 << 10).read_to_string(&mut text);
        let msg = serde_json::from_str::<ErrorBody>(&text).map_or(text, |b| b.error.message);
        bail!("{node} refused the generation ({status}): {msg}");
    }
    let mut incidents = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = Read::take(&mut reader, 16 << 20).read_line(&mut line).context("reading the node's stream")?;
        if n == 0 {
            bail!("{node} closed the stream before the generation finished");
        }
        let e: GenEvent = serde_json::from_str(line.trim()).with_context(|| format!("{node} sent a malformed event"))?;
        match e {
            GenEvent::Token { text, .. } => on_text(&text),
            GenEvent::Failover { .. } | GenEvent::Recovered { .. } => incidents.push(e),
            GenEvent::Done(done) => return Ok(MeshRun { done, incidents }),
            GenEvent::Error { message } => bail!("the generation failed: {message}"),
            GenEvent::Started { .. } => {}
        }
    }
}

