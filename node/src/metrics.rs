//! The process's Prometheus recorder (installed once) and the metrics the
//! HTTP layer records; `GET /metrics` renders them with the actors' ones
//! (`fogmesh_actors::metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: HTTP requests by `endpoint` and `status`.
pub const HTTP_REQUESTS: &str = "fogmesh_http_requests_total";
/// Counter: HTTP connections closed on accept because the cap was reached.
pub const HTTP_REFUSED: &str = "fogmesh_http_connections_refused_total";
/// Circuits this node relayed between two other peers.
pub const RELAY_CIRCUITS: &str = "fogmesh_relay_circuits_total";
/// Hole punches, by result (`direct`, `failed`).
pub const HOLE_PUNCHES: &str = "fogmesh_hole_punches_total";
/// Counter: generations ended by the wall-clock cap (`endpoint`).
pub const GENERATION_CAPPED: &str = "fogmesh_generations_capped_total";
/// Gauge: bytes of stage traffic this node has sent to each `peer`.
pub const LINK_SENT_BYTES: &str = "fogmesh_link_sent_bytes";
/// Gauge: the measured rate (bytes/s) of the link to each `peer` while it
/// is the bottleneck of the hop; 0 while it keeps up.
pub const LINK_BOTTLENECK: &str = "fogmesh_link_bottleneck_bytes_per_second";
/// Histogram: seconds from an API request to its first streamed token.
pub const TTFT_SECONDS: &str = "fogmesh_time_to_first_token_seconds";
/// Counter: tokens streamed to API clients (`endpoint`).
pub const API_TOKENS: &str = "fogmesh_api_completion_tokens_total";
/// Gauge: connected peers in the view.
pub const PEERS: &str = "fogmesh_peers_connected";
/// Gauge: peers in the view, connected or not.
pub const PEERS_KNOWN: &str = "fogmesh_peers_known";
/// Gauge: layer ranges loaded on this peer.
pub const SHARDS: &str = "fogmesh_shards_loaded";

/// Histogram buckets (seconds), from a sub-millisecond hop to a slow prompt.
const BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Histogram buckets of counts (sessions or tokens per forward pass).
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The process's recorder handle; `None` when another recorder was
/// installed first (then `/metrics` says so).
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(fogmesh_actors::metrics::BATCH_SESSIONS.into()), COUNT_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(fogmesh_actors::metrics::BATCH_TOKENS.into()), COUNT_BUCKETS)
                .ok()?;
            let h = builder.install_recorder().ok()?;
            fogmesh_actors::metrics::describe();
            metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests by endpoint and status");
            metrics::describe_gauge!(LINK_SENT_BYTES, metrics::Unit::Bytes, "Stage traffic sent to each peer");
            metrics::describe_gauge!(LINK_BOTTLENECK, "Measured rate (bytes/s) of the link to a peer while it is a hop's bottleneck; 0 while it keeps up");
            metrics::describe_counter!(RELAY_CIRCUITS, "Circuits this node relayed between two peers behind NAT");
            metrics::describe_counter!(HOLE_PUNCHES, "Hole punches to peers met through a relay, by result");
            metrics::describe_counter!(HTTP_REFUSED, "HTTP connections closed at once because the connection cap was reached");
            metrics::describe_counter!(GENERATION_CAPPED, "Generations ended by the wall-clock cap per generation");
            metrics::describe_histogram!(TTFT_SECONDS, metrics::Unit::Seconds, "API request to first streamed token");
            metrics::describe_counter!(API_TOKENS, "Completion tokens returned to API clients");
            metrics::describe_gauge!(PEERS, "Connected peers in this node's view");
            metrics::describe_gauge!(PEERS_KNOWN, "Peers in this node's view");
            metrics::describe_gauge!(SHARDS, "Layer ranges loaded on this peer");
            Some(h)
        })
        .as_ref()
}
