//! `gateway`: answers `GET` requests by calling an upstream HTTP service and wrapping
//! its JSON. Run it with `cargo xtask build-plugins && cargo run -p host`, then
//! `curl http://gateway.localhost:7777/notes` (the shipped config points it at `notes`
//! through the host itself).
//!
//! `GET /{*path}?query` calls `GET <upstream>/{*path}?query` (the path and query as they
//! came, the request id as `x-request-id`) and answers
//! `{"upstream": "<the URL it called>", "status": <upstream status>, "data": <its JSON>}`,
//! with 200 for an upstream 2xx and the upstream's own status for a 4xx. Everything else
//! is an error answer `{"error": "...", "upstream": "<URL>", "request_id": "..."}`:
//! 504 when the upstream has not answered (body included) within `timeout_ms`; 502
//! when it cannot be reached, answers 3xx or 5xx, or sends a body that is not JSON
//! (or is over 1 MiB).
//!
//! Config:
//! - `upstream` (required): the base URL, `http://host[:port][/path]`; the request's
//!   path is appended to its path.
//! - `host`: the `Host` header sent upstream (default: the upstream URL's host and
//!   port), for an upstream that serves many domains, such as this host.
//! - `timeout_ms` (default 5000): how long one upstream call may take.
//!
//! The client is hyper's (hyper-util's pooled client), which needs tokio: the plugin is
//! declared with `export_plugin!(Gateway, tokio)`, so it has a runtime of its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HeaderValue, ACCEPT, HOST};
use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use plugin_api::tracing::warn;
use plugin_api::{export_plugin, Error, InitContext, Microserver, Request, Response, Routes};
use serde::Deserialize;
use serde_json::{json, Value};

/// The largest upstream body the gateway reads.
const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    upstream: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5000
}

pub struct Gateway {
    /// The upstream base URL without a trailing `/`, such as `http://127.0.0.1:7777/api`.
    base: String,
    /// The `Host` header to send, if not the URL's own.
    host: Option<HeaderValue>,
    timeout: Duration,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Microserver for Gateway {
    fn init(ctx: &InitContext<'_>) -> Result<Self, Error> {
        let config: Config = ctx.config()?;
        let base = upstream_base(&config.upstream)?;
        let host = match config.host {
            Some(host) => Some(HeaderValue::try_from(host.as_str()).map_err(|_| {
                Error::bad_request(format!(
                    "invalid config: host {host:?} is not a header value"
                ))
            })?),
            None => None,
        };
        if config.timeout_ms == 0 {
            return Err(Error::bad_request(
                "invalid config: timeout_ms must be above 0",
            ));
        }
        // Built here, with the plugin's runtime entered: the pool's idle-connection
        // timer and connection tasks run on it.
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build_http();
        Ok(Gateway {
            base,
            host,
            timeout: Duration::from_millis(config.timeout_ms),
            client,
        })
    }

    fn routes(routes: &mut Routes<Self>) {
        routes
            .get("/", Self::forward)
            .get("/{*path}", Self::forward);
    }
}

/// Checks the configured upstream and returns it without a trailing `/`.
fn upstream_base(upstream: &str) -> Result<String, Error> {
    let invalid = |why: &str| {
        Error::bad_request(format!(
            "invalid config: upstream {upstream:?} {why}; it must look like http://127.0.0.1:8080 or http://example.com/api"
        ))
    };
    let uri: Uri = upstream.parse().map_err(|_| invalid("is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid(
            "is not an http:// URL (this client speaks plain HTTP only)",
        ));
    }
    if uri.authority().is_none() {
        return Err(invalid("names no host"));
    }
    if uri.query().is_some() {
        return Err(invalid(
            "has a query, which the request's own would replace",
        ));
    }
    Ok(upstream.trim_end_matches('/').to_owned())
}

/// What went wrong with an upstream call: the gateway's status and message.
struct Failure {
    status: u16,
    message: String,
}

impl Failure {
    fn bad_gateway(message: String) -> Self {
        Failure {
            status: 502,
            message,
        }
    }
}

impl Gateway {
    async fn forward(self: Arc<Self>, req: Request) -> Response {
        let url = match req.query() {
            "" => format!("{}{}", self.base, req.path()),
            query => format!("{}{}?{query}", self.base, req.path()),
        };
        let request_id = req.request_id();
        let outcome = match tokio::time::timeout(self.timeout, self.call(&url, request_id)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure {
                status: 504,
                message: format!(
                    "upstream {url} did not answer within {} ms",
                    self.timeout.as_millis()
                ),
            }),
        };
        match outcome {
            Ok((status, data)) => {
                let answer = if status < 300 { 200 } else { status };
                Response::json(&json!({ "upstream": url, "status": status, "data": data }))
                    .with_status(answer)
            }
            Err(failure) => {
                warn!(request_id, status = failure.status, "{}", failure.message);
                // `Error` answers `{"error": ...}` only, so this answer is built here.
                Response::json(&json!({
                    "error": failure.message,
                    "upstream": url,
                    "request_id": request_id,
                }))
                .with_status(failure.status)
            }
        }
    }

    /// Calls `GET url` and returns the upstream's status and JSON body.
    async fn call(&self, url: &str, request_id: &str) -> Result<(u16, Value), Failure> {
        let uri: Uri = url
            .parse()
            .map_err(|e| Failure::bad_gateway(format!("cannot call upstream {url}: {e}")))?;
        let mut request = hyper::Request::get(uri)
            .body(Empty::new())
            .map_err(|e| Failure::bad_gateway(format!("cannot call upstream {url}: {e}")))?;
        let headers = request.headers_mut();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Ok(id) = HeaderValue::try_from(request_id) {
            headers.insert("x-request-id", id);
        }
        if let Some(host) = &self.host {
            headers.insert(HOST, host.clone());
        }
        let response = self.client.request(request).await.map_err(|e| {
            Failure::bad_gateway(format!("cannot reach upstream {url}: {}", causes(&e)))
        })?;
        let status = response.status();
        if !(status.is_success() || status.is_client_error()) {
            return Err(Failure::bad_gateway(format!(
                "upstream {url} answered {status}"
            )));
        }
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| {
                Failure::bad_gateway(format!(
                    "upstream {url} answered {status}, but its body could not be read: {e}"
                ))
            })?
            .to_bytes();
        let data = serde_json::from_slice(&body).map_err(|e| {
            Failure::bad_gateway(format!(
                "upstream {url} answered {status} with a body that is not JSON ({e})"
            ))
        })?;
        Ok((status.as_u16(), data))
    }
}

/// An error and its causes, `: `-separated: the client's own message says little
/// ("client error (Connect)"); its causes say what happened ("Connection refused").
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

export_plugin!(Gateway, tokio);

#[cfg(test)]
mod tests {
    use plugin_api::testing::TestServer;
    use serde_json::json;

    use super::Gateway;

    fn init_error(config: serde_json::Value) -> String {
        match TestServer::<Gateway>::start_tokio(config) {
            Ok(_) => panic!("init accepted the config"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_bad_upstream_fails_init_saying_why() {
        for (upstream, why) in [
            ("https://example.com", "is not an http:// URL"),
            ("example.com", "is not an http:// URL"),
            ("http://", "is not a URL"),
            ("http://example.com/?a=1", "has a query"),
        ] {
            let error = init_error(json!({ "upstream": upstream }));
            assert!(
                error.starts_with(&format!("invalid config: upstream {upstream:?} {why}")),
                "{upstream}: {error}"
            );
        }
        assert!(init_error(json!(null)).contains("missing field `upstream`"));
        let error = init_error(json!({"upstream": "http://a", "timeout_ms": 0}));
        assert_eq!(error, "invalid config: timeout_ms must be above 0");
    }

    #[test]
    fn a_closed_port_is_502_naming_the_upstream() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = TestServer::<Gateway>::start_tokio(
            json!({ "upstream": format!("http://127.0.0.1:{port}/") }),
        )
        .unwrap();
        let r = server.get("/a/b?c=d");
        assert_eq!(r.status(), 502);
        let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        let url = format!("http://127.0.0.1:{port}/a/b?c=d");
        assert_eq!(body["upstream"], url);
        let error = body["error"].as_str().unwrap();
        assert!(
            error.starts_with(&format!("cannot reach upstream {url}: "))
                && error.contains("refused"),
            "{error}"
        );
    }
}
