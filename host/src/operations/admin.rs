//! The admin listener (`global.admin`): plain HTTP/1.1 on a socket of its own, never
//! reached through a tenant's domain. It answers the health endpoints, `/metrics`, the
//! admin API (`/api/...`, in `api`) and the dashboard (`/`, in `dashboard`).
//!
//! Every request goes through [`Admin::answer`]: the bearer token is checked there, once,
//! for every path; then [`Admin::route`] matches the method and the path's segments.
//! A new endpoint is one more arm there and a function returning a [`Reply`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use super::api::{Api, Asked};
use super::metrics::Metrics;
use super::{dashboard, health};
use crate::control::config::AdminConfig;
use crate::control::servers::Microservers;

/// What an endpoint answers.
pub type Reply = Response<Full<Bytes>>;

/// A JSON reply.
pub fn json_reply(status: StatusCode, body: &Value) -> Reply {
    reply(status, "application/json", body.to_string())
}

/// A JSON error: `{"error": message}`.
pub fn json_error(status: StatusCode, message: &str) -> Reply {
    json_reply(status, &json!({ "error": message }))
}

/// A reply of `content_type`, never cached.
pub fn reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The admin endpoints, shared by every admin connection.
#[derive(Debug)]
pub struct Admin {
    servers: Weak<Microservers>,
    token: Option<String>,
    metrics: Metrics,
    api: Api,
}

impl Admin {
    pub fn new(servers: &Arc<Microservers>, token: Option<String>, config_file: PathBuf) -> Self {
        Admin {
            servers: Arc::downgrade(servers),
            token,
            metrics: Metrics::new(Arc::downgrade(servers)),
            api: Api::new(config_file),
        }
    }

    /// Answers one request from `client`: 401 without the token (when one is
    /// configured), else the endpoint's reply. The dashboard's files are the exception:
    /// they hold no data, and the page asks for the token itself (a browser cannot send
    /// it when it opens the page).
    pub async fn answer(&self, req: &Request<Incoming>, client: SocketAddr) -> Reply {
        let path = req.uri().path();
        if req.method() == Method::GET || req.method() == Method::HEAD {
            if let Some(file) = dashboard::asset(path) {
                return file;
            }
        }
        if !self.authorized(req) {
            let mut r = json_error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <global.admin.token_env>)",
            );
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            if req.method() == Method::POST {
                // A change refused for its token is audited too.
                tracing::info!(target: "host::audit", path, result = "unauthorized", status = 401, client = %client, "admin API change");
            }
            return r;
        }
        let Some(servers) = self.servers.upgrade() else {
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "the host is stopping");
        };
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let ["api", rest @ ..] = &segments[..] {
            let asked = Asked {
                method: req.method(),
                segments: rest,
                query: req.uri().query(),
                client,
            };
            return self.api.answer(servers, asked).await;
        }
        self.route(&servers, req.method(), &segments).await
    }

    /// The endpoints, by method and path segments.
    async fn route(&self, servers: &Microservers, method: &Method, segments: &[&str]) -> Reply {
        let read = method == Method::GET || method == Method::HEAD;
        match (read, segments) {
            (true, ["health", "live"]) => json_reply(StatusCode::OK, &health::live()),
            (true, ["health", "ready"]) => {
                let (ready, body) = health::ready(servers).await;
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_reply(status, &body)
            }
            (true, ["health", "servers"]) => {
                json_reply(StatusCode::OK, &health::servers(servers).await)
            }
            (true, ["health", "servers", name]) => match health::server_named(servers, name).await {
                Some(body) => json_reply(StatusCode::OK, &body),
                None => json_error(
                    StatusCode::NOT_FOUND,
                    &format!("no server is called {name:?}"),
                ),
            },
            (true, ["health", "system"]) => json_reply(StatusCode::OK, &health::system(servers)),
            (true, ["metrics"]) => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(servers).await,
            ),
            (false, _) if known(segments) => {
                let mut r = json_error(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
                r.headers_mut()
                    .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                r
            }
            _ => json_error(
                StatusCode::NOT_FOUND,
                "no such admin endpoint: /, /health/live, /health/ready, /health/servers[/NAME], /health/system, /metrics, /api/...",
            ),
        }
    }

    /// The bearer token matches (or none is configured). Compared in constant time.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let (a, b) = (given.as_bytes(), token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
    }
}

/// Whether `segments` name an endpoint (for 405 rather than 404).
fn known(segments: &[&str]) -> bool {
    matches!(
        segments,
        ["health", "live" | "ready" | "servers" | "system"]
            | ["health", "servers", _]
            | ["metrics"]
    )
}

/// Binds the admin listener and serves it until the process ends. An address in use is
/// an error for an explicit `global.admin`, and a warning for the default (so that two
/// hosts still start on one machine).
pub async fn start(
    config: &AdminConfig,
    servers: &Arc<Microservers>,
    config_file: PathBuf,
) -> Result<Option<SocketAddr>, String> {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) if !config.explicit => {
            tracing::warn!(
                "the admin listener is off: cannot listen on {} ({e}); set global.admin to another address, or to null",
                config.listen
            );
            return Ok(None);
        }
        Err(e) => {
            return Err(format!(
                "global.admin.listen: cannot listen on {}: {e}",
                config.listen
            ))
        }
    };
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    if !addr.ip().is_loopback() && config.token.is_none() {
        tracing::warn!(%addr, "the admin listener is reachable from other machines and has no token (global.admin.token_env)");
    }
    let token = config.token.as_ref().map(|t| t.0.clone());
    let admin = Arc::new(Admin::new(servers, token, config_file));
    tracing::info!("admin listening on http://{addr}");
    tokio::spawn(async move {
        loop {
            let (stream, client) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("admin listener: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.answer(&req, client).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Some(addr))
}
