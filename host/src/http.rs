//! The request path: domain, server, generation, route, plugin call, response.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use abi_stable::std_types::RResult;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderName, HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode, Version};
use plugin_api::ffi::{FfiBytes, FfiHandleResult, FfiParam, FfiResponse, FfiStr};

use crate::call::{self, intern, ClientAddr, Domain, OutcomeSlot, PendingRequest};
use crate::domain::normalize_host;
use crate::plugin::{Generation, InFlight};
use crate::routes::RouteMatch;
use crate::servers::{Microservers, ServerState};

pub type Body = Full<Bytes>;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Answers one request. Never fails: every problem becomes a response.
///
/// The request is taken apart and boxed here, before the future is made, so the future
/// (which lives in the connection's memory while the request runs) holds only a pointer
/// to it: the smaller that future, the less of it is out of the CPU's cache when a
/// request comes. It is returned as it is to hyper, since every layer of async wrapping
/// would move it once more.
pub fn handle(
    servers: Arc<Microservers>,
    req: Request<Incoming>,
    client: ClientAddr,
) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send {
    let request_id = RequestId::next();
    // What the debug line needs is gathered only when it will be written.
    let debug = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        Box::new((
            Instant::now(),
            req.method().clone(),
            req.uri().path().to_owned(),
        ))
    });
    let (parts, body) = req.into_parts();
    // Boxed once, and lent to the plugin as it is: nothing is copied for the boundary.
    let pending = PendingRequest::new(parts, &client, request_id.0);
    async move {
        let (mut response, server) =
            route(&servers, pending, body, &request_id, debug.is_some()).await;
        if let Ok(id) = HeaderValue::from_bytes(&request_id.0) {
            response.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        if let Some(debug) = debug {
            let (started, method, path) = *debug;
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
}

/// Routes and answers a request; also returns the server's name if `want_name`.
async fn route(
    servers: &Microservers,
    pending: PendingRequest,
    body: Incoming,
    id: &RequestId,
    want_name: bool,
) -> (Response<Body>, Option<Arc<str>>) {
    let routing = servers.routing();
    let parts = pending.parts();
    if parts.method == Method::CONNECT {
        return (
            error(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported"),
            None,
        );
    }
    let domain = match request_domain(parts) {
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
    let name = want_name.then(|| server.name.clone());
    let unavailable = |reason: &str| {
        let message = format!("microserver {:?} is not available: {reason}", &*server.name);
        error(StatusCode::SERVICE_UNAVAILABLE, &message)
    };
    // A server that cannot answer turns a request away before its body is read. (A
    // request without a body is checked once, below, when it enters a generation.)
    let has_body = !body.is_end_stream();
    if has_body {
        if let ServerState::Waiting(reason) = &**server.state() {
            return (unavailable(reason), name);
        }
    }
    let limits = &routing.limits;

    // The body is read before the request counts as in flight on a generation, and
    // under the request timeout: a client that trickles its body holds up no reload.
    // (A request without a body has no length worth checking.)
    let declared_len = has_body
        .then(|| parts.headers.get(CONTENT_LENGTH))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > limits.max_body_bytes) {
        return (too_large(limits.max_body_bytes), name);
    }
    // Most requests have no body: skip the reader and its timer. (Boxed, as is every
    // rarely taken await below: this future lives in each connection's memory, and the
    // less of it there is, the less of it is out of the CPU's cache when a request
    // comes.)
    let read = if has_body {
        let read = Limited::new(body, limits.max_body_bytes as usize).collect();
        Box::pin(tokio::time::timeout(limits.request_timeout, read))
            .await
            .map(|r| r.map(|c| c.to_bytes()))
    } else {
        Ok(Ok(Bytes::new()))
    };
    let body = match read {
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
    let mut state = server.state();
    let generation = loop {
        match &**state {
            ServerState::Serving(g) => {
                if let Some(in_flight) = g.enter() {
                    break in_flight;
                }
            }
            ServerState::Waiting(reason) => return (unavailable(reason), name),
        }
        drop(state);
        tokio::task::yield_now().await;
        state = server.state();
    };
    drop(state);
    let g: &Generation = generation.generation();
    let (route, params, names) = match g.routes.find(parts.method.as_str(), parts.uri.path()) {
        RouteMatch::Found {
            route,
            params,
            names,
        } => (route, params, names),
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
    let head = parts.method == Method::HEAD;
    // Parameter values are views of the path in the record; names are `'static`.
    let params: Vec<FfiParam> = params
        .iter()
        .enumerate()
        .map(|(i, (key, value))| FfiParam {
            name: FfiStr::new(
                names
                    .get(i)
                    .copied()
                    .filter(|n| *n == key)
                    .unwrap_or_else(|| intern(key))
                    .as_bytes(),
            ),
            value: FfiStr::new(value.as_bytes()),
        })
        .collect();
    let domain = Domain::new(domain);

    // Most handlers answer on their first poll and need no timer; their response is
    // read from a slot on the stack, where the plugin wrote it.
    let mut call = Some((pending, domain, params, body, generation));
    let started = std::future::poll_fn(|cx| {
        let (pending, domain, params, body, generation) = call.take().expect("polled once");
        let request = pending.into_ffi(domain, params, route, body);
        let mut slot = OutcomeSlot::new();
        let instance = &generation.generation().instance;
        Poll::Ready(match call::start(instance, request, cx, &mut slot) {
            None => {
                let outcome = slot.get_mut().expect("the call answered");
                Ok(respond(outcome, generation, head, id))
            }
            Some(running) => Err((running, generation)),
        })
    })
    .await;
    let response = match started {
        Ok(response) => response,
        Err((running, generation)) => {
            match Box::pin(tokio::time::timeout(limits.request_timeout, running)).await {
                Ok(mut outcome) => respond(&mut outcome, generation, head, id),
                Err(_) => {
                    let g = generation.generation();
                    tracing::warn!(
                        server = %g.server,
                        plugin = %g.plugin().name,
                        request_id = id.as_str(),
                        timeout_ms = limits.request_timeout.as_millis() as u64,
                        "handler timed out"
                    );
                    let message = format!(
                        "the microserver did not answer within {} ms",
                        limits.request_timeout.as_millis()
                    );
                    error(StatusCode::GATEWAY_TIMEOUT, &message)
                }
            }
        }
    };
    (response, name)
}

/// The HTTP response for a handler's outcome (a 500 for a panic or an invalid response).
fn respond(
    outcome: &mut FfiHandleResult,
    generation: InFlight,
    head: bool,
    id: &RequestId,
) -> Response<Body> {
    match outcome {
        RResult::ROk(response) => match into_http(response, generation, head) {
            Ok(response) => response,
            Err((generation, problem)) => {
                let g = generation.generation();
                tracing::error!(server = %g.server, plugin = %g.plugin().name, request_id = id.as_str(), "invalid response: {problem}");
                internal_error(id.as_str())
            }
        },
        RResult::RErr(panic) => {
            let g = generation.generation();
            tracing::error!(
                server = %g.server,
                plugin = %g.plugin().name,
                generation = g.number,
                request_id = id.as_str(),
                "handler panicked: {panic}"
            );
            internal_error(id.as_str())
        }
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
    let headers = &parts.headers;
    // A scan, not a hashed lookup: clients send Host first or nearly so.
    let host = headers
        .iter()
        .find_map(|(name, value)| (*name == HOST).then_some(value));
    // Only a request that repeats some header name can repeat Host.
    if host.is_some()
        && headers.len() != headers.keys_len()
        && headers.get_all(HOST).iter().nth(1).is_some()
    {
        return Err("more than one Host header".to_owned());
    }
    // Any text will do here: normalize_host admits only host name characters.
    let host = match host.map(|h| std::str::from_utf8(h.as_bytes())) {
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

/// A header name from a plugin. The usual names of a response are compared first, which
/// is cheaper than parsing them.
fn header_name(name: &[u8]) -> Result<HeaderName, hyper::header::InvalidHeaderName> {
    use hyper::header::{CACHE_CONTROL, ETAG, LAST_MODIFIED, LOCATION, SET_COOKIE};
    static COMMON: [(&[u8], HeaderName); 7] = [
        (b"content-type", CONTENT_TYPE),
        (b"cache-control", CACHE_CONTROL),
        (b"location", LOCATION),
        (b"set-cookie", SET_COOKIE),
        (b"etag", ETAG),
        (b"last-modified", LAST_MODIFIED),
        (b"allow", ALLOW),
    ];
    match COMMON.iter().find(|(bytes, _)| *bytes == name) {
        Some((_, header)) => Ok(header.clone()),
        None => HeaderName::from_bytes(name),
    }
}

/// A header value from a plugin. Common values are made at compile time (no allocation,
/// no copy, no validation per request).
fn header_value(value: &[u8]) -> Result<HeaderValue, hyper::header::InvalidHeaderValue> {
    static COMMON: [(&[u8], HeaderValue); 5] = [
        common_value("text/plain; charset=utf-8"),
        common_value("application/json"),
        common_value("application/octet-stream"),
        common_value("text/html; charset=utf-8"),
        common_value("no-cache"),
    ];
    match COMMON.iter().find(|(bytes, _)| *bytes == value) {
        Some((_, header)) => Ok(header.clone()),
        None => HeaderValue::from_bytes(value),
    }
}

const fn common_value(value: &'static str) -> (&'static [u8], HeaderValue) {
    (value.as_bytes(), HeaderValue::from_static(value))
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
    response: &mut FfiResponse,
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
    let mut out = Response::new(Full::new(Bytes::new()));
    *out.status_mut() = status;
    let headers = out.headers_mut();
    // One more for the x-request-id the host adds.
    headers.reserve(response.headers.entries().len() + 1);
    for (name, value) in response.headers.iter() {
        let Ok(name) = header_name(name) else {
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
        return Ok(out);
    }
    let body = if let Some(bytes) = response.body.as_static() {
        // A plugin's static data stays mapped for the life of the process.
        Bytes::from_static(bytes)
    } else if response.body.is_empty() {
        Bytes::new()
    } else {
        Bytes::from_owner(PluginBody {
            bytes: std::mem::replace(&mut response.body, FfiBytes::empty()),
            _in_flight: in_flight,
        })
    };
    *out.body_mut() = Full::new(body);
    Ok(out)
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
pub struct RequestId([u8; 16]);

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
