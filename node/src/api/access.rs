//! Who may use the HTTP API: an optional bearer key, the Host names a
//! request may carry (against DNS rebinding), and JSON-only POST bodies
//! (a cross-site form can only send `text/plain`, urlencoded or multipart).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::api_error;

/// The API's access rules.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The bearer key every request needs, but `/health` and the dashboard
    /// page itself (which asks for the key).
    pub api_key: Option<String>,
    /// Host names accepted besides IP literals and `localhost`; with an API
    /// key set, any Host is accepted.
    pub hosts: Vec<String>,
}

/// Paths open without the key.
const OPEN_PATHS: [&str; 2] = ["/", "/health"];

/// Whether `a` equals `b`, in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a request's Host (`name[:port]`, or `[v6]:port`) is one this
/// node answers: an IP literal, `localhost` (and its subdomains), or a
/// configured name. Without a Host header (HTTP/1.0) it is.
pub fn host_allowed(host: Option<&str>, access: &Access) -> bool {
    let Some(host) = host else { return true };
    if access.api_key.is_some() {
        return true;
    }
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, port)| if port.chars().all(|c| c.is_ascii_digit()) { n } else { host }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || access.hosts.iter().any(|h| h.eq_ignore_ascii_case(&name))
}

/// Whether a POST's Content-Type is acceptable: absent, or JSON.
fn json_or_absent(content_type: Option<&str>) -> bool {
    content_type.is_none_or(|ct| {
        let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    })
}

/// The middleware applying [`Access`] to every request.
pub(super) async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    match refusal(&access, &req) {
        Some(r) => r,
        None => next.run(req).await,
    }
}

/// The answer refusing `req` under `access`, if it is refused.
fn refusal(access: &Access, req: &Request) -> Option<Response> {
    let text = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST);
    if !host_allowed(host, access) {
        let m = format!(
            "Host {:?} is not served here: use an IP address or localhost, or start the node with --allow-host NAME",
            host.unwrap_or("")
        );
        return Some(api_error(StatusCode::FORBIDDEN, "invalid_request_error", None, Some("host_not_allowed"), m));
    }
    if req.method() == Method::POST && !json_or_absent(text(header::CONTENT_TYPE)) {
        let m = "POST bodies must be JSON (Content-Type: application/json)";
        return Some(api_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", None, Some("unsupported_media_type"), m));
    }
    if let Some(key) = &access.api_key
        && !OPEN_PATHS.contains(&req.uri().path())
    {
        let given = text(header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        if !same(given.trim().as_bytes(), key.as_bytes()) {
            let m = "this node needs an API key: send Authorization: Bearer KEY";
            let mut r = api_error(StatusCode::UNAUTHORIZED, "invalid_request_error", None, Some("invalid_api_key"), m);
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return Some(r);
        }
    }
    if req.uri().path() == INVITE_PATH && access.api_key.is_none() && !from_loopback(req) {
        let m = "invites carry the cluster secret: ask from this host (`fogmesh invite`), or start the node with an API key";
        return Some(api_error(StatusCode::FORBIDDEN, "invalid_request_error", None, Some("local_only"), m));
    }
    None
}

/// The endpoint that hands out the cluster secret.
pub(super) const INVITE_PATH: &str = "/v1/fogmesh/invite";

/// Whether the client connected from this host (unknown counts as not).
fn from_loopback(req: &Request) -> bool {
    req.extensions().get::<ConnectInfo<SocketAddr>>().is_some_and(|c| c.0.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_ip_literals_localhost_or_configured_names() {
        let open = Access::default();
        for ok in [None, Some("127.0.0.1:8469"), Some("10.0.0.5"), Some("[::1]:8469"), Some("localhost:8469"), Some("a.localhost")] {
            assert!(host_allowed(ok, &open), "{ok:?}");
        }
        for bad in [Some("evil.example:8469"), Some("attacker.test"), Some("127.0.0.1.nip.io:80")] {
            assert!(!host_allowed(bad, &open), "{bad:?}");
        }
        let named = Access { hosts: vec!["fog.lan".into()], ..Access::default() };
        assert!(host_allowed(Some("FOG.lan:8469"), &named));
        let keyed = Access { api_key: Some("k".into()), ..Access::default() };
        assert!(host_allowed(Some("anything.example"), &keyed));
    }

    #[test]
    fn only_json_posts_pass() {
        assert!(json_or_absent(None));
        assert!(json_or_absent(Some("application/json; charset=utf-8")));
        assert!(json_or_absent(Some("application/vnd.api+json")));
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
            assert!(!json_or_absent(Some(bad)), "{bad}");
        }
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }
}
