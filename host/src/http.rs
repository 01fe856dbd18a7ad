//! The request path: domain, server, generation, route, plugin call, response.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use abi_stable::std_types::{RResult, RVec};
use async_ffi::FfiFuture;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderName, HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode, Version};
use plugin_api::ffi::{
    FfiBytes, FfiHandleResult, FfiHeader, FfiParam, FfiRequest, FfiResponse, FfiSpan,
};

use crate::domain::normalize_host;
use crate::plugin::{Generation, InFlight};
use crate::routes::RouteMatch;
use crate::servers::{Microservers, ServerState};

pub type Body = Full<Bytes>;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Answers one request. Never fails: every problem becomes a response.
pub async fn handle(
    servers: &Microservers,
    req: Request<Incoming>,
    client: &str,
) -> Result<Response<Body>, Infallible> {
    let request_id = RequestId::next();
    // What the debug line needs is gathered only when it will be written.
    let debug = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        (
            Instant::now(),
            req.method().clone(),
            req.uri().path().to_owned(),
        )
    });
    let (mut response, server) = route(servers, req, client, request_id.as_str()).await;
    if let Ok(id) = HeaderValue::from_bytes(&request_id.0) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), id);
    }
    if let Some((started, method, path)) = debug {
        tracing::debug!(
            %method,
            path,
            status = response.status().as_u16(),
            server = server.as_deref().unwrap_or("-"),
            request_id = request_id.as_str(),
            micros = started.elapsed().as_micros() as u64,
            "request"
        );
    }
    Ok(response)
}

async fn route(
    servers: &Microservers,
    req: Request<Incoming>,
    client: &str,
    request_id: &str,
) -> (Response<Body>, Option<std::sync::Arc<str>>) {
    let routing = servers.routing();
    let (parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        return (
            error(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported"),
            None,
        );
    }
    let domain = match request_domain(&parts) {
        Ok(d) => d,
        Err(message) => return (error(StatusCode::BAD_REQUEST, &message), None),
    };
    let Some(server) = routing.domains.lookup(&domain) else {
        if domain.is_empty() {
            let message = "the request has no Host header and no default server is configured";
            return (error(StatusCode::NOT_FOUND, message), None);
        }
        return (
            error(
                StatusCode::NOT_FOUND,
                &format!("no microserver serves the domain {:?}", &*domain),
            ),
            None,
        );
    };
    let name = Some(server.name.clone());
    let unavailable = |reason: &str| {
        let message = format!("microserver {:?} is not available: {reason}", &*server.name);
        error(StatusCode::SERVICE_UNAVAILABLE, &message)
    };
    if let ServerState::Waiting(reason) = &**server.state() {
        return (unavailable(reason), name);
    }
    let limits = &routing.limits;

    // The body is read before the request counts as in flight on a generation, and
    // under the request timeout: a client that trickles its body holds up no reload.
    let declared_len = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > limits.max_body_bytes) {
        return (too_large(limits.max_body_bytes), name);
    }
    // Most requests have no body: skip the reader and its timer.
    let read = async {
        if body.is_end_stream() {
            return Ok(Ok(Bytes::new()));
        }
        let read = Limited::new(body, limits.max_body_bytes as usize).collect();
        tokio::time::timeout(limits.request_timeout, read)
            .await
            .map(|r| r.map(|c| c.to_bytes()))
    };
    let body = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return (too_large(limits.max_body_bytes), name);
        }
        Ok(Err(e)) => {
            return (
                error(
                    StatusCode::BAD_REQUEST,
                    &format!("could not read the request body: {e}"),
                ),
                name,
            );
        }
        Err(_) => {
            let message = format!(
                "the request body did not arrive within {} ms",
                limits.request_timeout.as_millis()
            );
            return (error(StatusCode::REQUEST_TIMEOUT, &message), name);
        }
    };

    // Enter the server's current generation. A generation retired between the load and
    // the entry turns the request away; the next load sees its successor.
    let generation = loop {
        match &**server.state() {
            ServerState::Serving(g) => {
                if let Some(in_flight) = g.enter() {
                    break in_flight;
                }
            }
            ServerState::Waiting(reason) => return (unavailable(reason), name),
        }
        tokio::task::yield_now().await;
    };
    let g: &Generation = generation.generation();
    let (route, params) = match g.routes.find(parts.method.as_str(), parts.uri.path()) {
        RouteMatch::Found { route, params } => (route, params),
        RouteMatch::NotFound => {
            let message = format!("no route for {} {}", parts.method, parts.uri.path());
            return (error(StatusCode::NOT_FOUND, &message), name);
        }
        RouteMatch::MethodNotAllowed(allow) => {
            let message = format!("{} is not allowed for {}", parts.method, parts.uri.path());
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, &message);
            response.headers_mut().insert(ALLOW, allow.clone());
            return (response, name);
        }
    };

    let request = ffi_request(&parts, &domain, client, request_id, &params, route, body);
    // A handler that answers at once (most do) needs no timer: poll it once first.
    let mut call = CatchPanic(g.instance.handle(request));
    let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut call).poll(cx))).await;
    let outcome = match first {
        Poll::Ready(outcome) => Ok(outcome),
        Poll::Pending => tokio::time::timeout(limits.request_timeout, call).await,
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(_) => {
            tracing::warn!(
                server = %g.server,
                plugin = %g.plugin().name,
                request_id,
                timeout_ms = limits.request_timeout.as_millis() as u64,
                "handler timed out"
            );
            let message = format!(
                "the microserver did not answer within {} ms",
                limits.request_timeout.as_millis()
            );
            return (error(StatusCode::GATEWAY_TIMEOUT, &message), name);
        }
    };
    let response = match outcome {
        RResult::ROk(response) => {
            match into_http(response, generation, parts.method == Method::HEAD) {
                Ok(response) => response,
                Err((generation, problem)) => {
                    let g = generation.generation();
                    tracing::error!(server = %g.server, plugin = %g.plugin().name, request_id, "invalid response: {problem}");
                    internal_error(request_id)
                }
            }
        }
        RResult::RErr(panic) => {
            tracing::error!(
                server = %g.server,
                plugin = %g.plugin().name,
                generation = g.number,
                request_id,
                "handler panicked: {panic}"
            );
            internal_error(request_id)
        }
    };
    (response, name)
}

/// Builds the request a plugin sees: every text field is a span into one buffer, and the
/// body is handed over without a copy.
pub fn ffi_request(
    parts: &hyper::http::request::Parts,
    domain: &str,
    client: &str,
    request_id: &str,
    params: &matchit::Params<'_, '_>,
    route: u32,
    body: Bytes,
) -> FfiRequest {
    let uri = &parts.uri;
    let query = uri.query().unwrap_or("");
    // A guess, not a second pass over the headers: typical names and values are short,
    // and the buffer grows if it is wrong.
    let headers_len = parts.headers.len() * 48;
    let params_len: usize = params.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut buf = Vec::with_capacity(
        16 + uri.path().len()
            + query.len()
            + domain.len()
            + 48
            + request_id.len()
            + headers_len
            + params_len,
    );
    let method = FfiSpan::push(&mut buf, parts.method.as_str().as_bytes());
    let path = FfiSpan::push(&mut buf, uri.path().as_bytes());
    let query = FfiSpan::push(&mut buf, query.as_bytes());
    let domain = FfiSpan::push(&mut buf, domain.as_bytes());
    let client_addr = FfiSpan::push(&mut buf, client.as_bytes());
    let request_id = FfiSpan::push(&mut buf, request_id.as_bytes());
    let mut headers = RVec::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        let name = FfiSpan::push(&mut buf, name.as_str().as_bytes());
        let value = FfiSpan::push(&mut buf, value.as_bytes());
        headers.push(FfiHeader { name, value });
    }
    let mut ffi_params = RVec::with_capacity(params.len());
    for (k, v) in params.iter() {
        let name = FfiSpan::push(&mut buf, k.as_bytes());
        let value = FfiSpan::push(&mut buf, v.as_bytes());
        ffi_params.push(FfiParam { name, value });
    }
    FfiRequest {
        buf: buf.into(),
        method,
        path,
        query,
        domain,
        client_addr,
        request_id,
        headers,
        params: ffi_params,
        route,
        body: if body.is_empty() {
            FfiBytes::empty()
        } else {
            FfiBytes::from_owner(body)
        },
    }
}

/// A response body made by a plugin, kept with the in-flight guard of its generation so
/// that the generation stays alive (and counted as busy) until the body is sent.
struct PluginBody {
    bytes: FfiBytes,
    _in_flight: InFlight,
}

impl AsRef<[u8]> for PluginBody {
    fn as_ref(&self) -> &[u8] {
        self.bytes.as_slice()
    }
}

/// The domain a request is for: `:authority` (HTTP/2, or an absolute-form HTTP/1.1
/// target, which takes precedence over `Host`), else the `Host` header; normalised. An
/// empty string for an HTTP/1.0 request without either (it goes to the default server).
fn request_domain(parts: &hyper::http::request::Parts) -> Result<Cow<'_, str>, String> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header".to_owned());
    }
    let host = match host.map(|h| h.to_str()) {
        Some(Ok(h)) => Some(h),
        Some(Err(_)) => return Err("the Host header is not text".to_owned()),
        None => None,
    };
    let authority = parts.uri.authority().map(|a| a.as_str());
    if parts.version == Version::HTTP_2 {
        if let (Some(a), Some(h)) = (authority, host) {
            if normalize_host(a) != normalize_host(h) {
                return Err(format!(
                    "the Host header {h:?} differs from :authority {a:?}"
                ));
            }
        }
    }
    match authority.or(host) {
        Some(raw) => normalize_host(raw).ok_or_else(|| format!("invalid Host header {raw:?}")),
        // HTTP/1.0 may omit Host: it goes to the default server, if any.
        None if parts.version <= Version::HTTP_10 => Ok("".into()),
        None => Err("missing Host header".to_owned()),
    }
}

/// A header value from a plugin. Common values are static (no allocation, no copy).
fn header_value(value: &[u8]) -> Result<HeaderValue, hyper::header::InvalidHeaderValue> {
    const COMMON: [&str; 5] = [
        "text/plain; charset=utf-8",
        "application/json",
        "application/octet-stream",
        "text/html; charset=utf-8",
        "no-cache",
    ];
    match COMMON.iter().find(|c| c.as_bytes() == value) {
        Some(c) => Ok(HeaderValue::from_static(c)),
        None => HeaderValue::from_bytes(value),
    }
}

/// Headers a plugin may not set: the host frames the message itself, and these would
/// contradict it or the connection's state.
fn is_framing_header(name: &HeaderName) -> bool {
    use hyper::header::{CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    [
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        CONNECTION,
        TE,
        TRAILER,
        UPGRADE,
    ]
    .contains(name)
        || name == "keep-alive"
        || name == "proxy-connection"
}

fn into_http(
    response: FfiResponse,
    in_flight: InFlight,
    head: bool,
) -> Result<Response<Body>, (InFlight, String)> {
    let status = match StatusCode::from_u16(response.status) {
        Ok(s) if (200..=599).contains(&s.as_u16()) => s,
        _ => {
            let message = format!(
                "status {} is not a valid final HTTP status (200-599)",
                response.status
            );
            return Err((in_flight, message));
        }
    };
    let mut builder = Response::builder().status(status);
    let headers = builder.headers_mut().expect("fresh builder");
    headers.reserve(response.headers.entries().len() + 1);
    for (name, value) in response.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(name) else {
            let name = String::from_utf8_lossy(name);
            return Err((in_flight, format!("header name {name:?} is not valid")));
        };
        let Ok(value) = header_value(value) else {
            return Err((
                in_flight,
                format!("the value of header {name} is not valid"),
            ));
        };
        if is_framing_header(&name) {
            tracing::debug!(header = %name, "dropped a framing header set by the plugin");
            continue;
        }
        headers.append(name, value);
    }
    if head {
        // No body in a HEAD response (HTTP/2 would send it as DATA frames), but the
        // length the GET would have had.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(response.body.len()));
        return Ok(builder.body(Full::new(Bytes::new())).expect("valid parts"));
    }
    let body = if let Some(bytes) = response.body.as_static() {
        // A plugin's static data stays mapped for the life of the process.
        Bytes::from_static(bytes)
    } else if response.body.is_empty() {
        Bytes::new()
    } else {
        Bytes::from_owner(PluginBody {
            bytes: response.body,
            _in_flight: in_flight,
        })
    };
    Ok(builder.body(Full::new(body)).expect("valid parts"))
}

/// Turns a panic that escaped the plugin's own catching (an `FfiPoll::Panicked` from a
/// library not built with plugin-api's wrappers) into an error value.
struct CatchPanic(FfiFuture<FfiHandleResult>);

impl Future for CatchPanic {
    type Output = FfiHandleResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<FfiHandleResult> {
        let inner = Pin::new(&mut self.0);
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll,
            Err(_) => Poll::Ready(RResult::RErr("the handler's future panicked".into())),
        }
    }
}

/// A JSON error response: `{"error": "..."}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid parts")
}

fn internal_error(request_id: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": "the microserver failed while handling this request",
        "request_id": request_id,
    })
    .to_string();
    Response::builder()
        .status(StatusCode::INTERNAL_SERVER_ERROR)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid parts")
}

fn too_large(max: u64) -> Response<Body> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body is larger than the limit of {max} bytes"),
    )
}

/// A request id: 16 hex digits, unique within the process and unlikely to repeat across
/// restarts.
struct RequestId([u8; 16]);

impl RequestId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let seed = *SEED.get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos.rotate_left(32) ^ u64::from(std::process::id())
        });
        // A multiplicative step spreads consecutive ids apart; the counter keeps them unique.
        let n = seed.wrapping_add(
            NEXT.fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            let nibble = (n >> (60 - 4 * i)) & 0xf;
            *byte = b"0123456789abcdef"[nibble as usize];
        }
        RequestId(out)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}
