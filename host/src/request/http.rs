//! The request path: domain, server, generation, route, plugin call, response.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use std::time::Instant;

use abi_stable::std_types::RResult;
use async_ffi::ContextExt;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HOST, UPGRADE};
use hyper::http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Version};
use plugin_api::ffi::{
    FfiBytes, FfiHandleResult, FfiRequest, FfiResponse, FfiStream, FfiStreamPoll,
};
use tower_http::compression::CompressionBody;

use super::access_log::{Answered, Note};
use super::files::{self, FileBody, Otherwise, Site};
use super::headers::Finishing;
use super::jwt::JwtGate;
use super::proxy::{self, Forward, WorkerBody};
use super::websocket;
use crate::boundary::bulkhead::{Bounded, Turn};
use crate::boundary::call::{
    self, add_host_header, intern, ClientAddr, HostHeaders, Lending, LentBody, OutcomeSlot,
    ParamSink, PendingRequest, PluginCall,
};
use crate::boundary::plugin;
pub use crate::boundary::request_id::RequestId;
use crate::boundary::request_id::X_REQUEST_ID;
use crate::boundary::services::ServiceResponse;
use crate::boundary::worker::{Worker, WorkerInFlight};
use crate::control::servers::{Generation, Microservers, Routing, Server, ServerState};
use crate::operations::recording::{self, ServerMeter};
use crate::routing::domain::normalize_host;
use crate::routing::routes::{RouteMatch, RouteTable};
use crate::routing::tenants::TenantId;

/// The in-flight guard of a request on a serving generation.
type InFlight = plugin::InFlight<RouteTable>;

/// A response body: bytes (almost every response), a plugin's stream, or a static file.
pub enum Body {
    Bytes(Full<Bytes>),
    /// Boxed: rare, and larger.
    Stream(Box<StreamedBody>),
    /// Boxed: read from the file as it is sent.
    File(Box<FileBody>),
    /// Any of the above, compressed as it is sent (`servers[].compression`).
    Compressed(Pin<Box<CompressionBody<Body>>>),
    /// A worker process's response (`isolation: "process"`), as it arrives. Boxed.
    Worker(Box<WorkerBody>),
}

impl Body {
    pub fn bytes(bytes: Bytes) -> Self {
        Body::Bytes(Full::new(bytes))
    }

    pub fn empty() -> Self {
        Body::bytes(Bytes::new())
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = StreamFailed;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailed>>> {
        match self.get_mut() {
            Body::Bytes(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Body::Stream(streamed) => streamed.poll_frame(cx),
            Body::File(file) => file.poll_frame(cx),
            Body::Compressed(compressed) => poll_compressed(compressed.as_mut(), cx),
            Body::Worker(proxied) => proxied.poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            Body::Bytes(full) => full.is_end_stream(),
            Body::Stream(streamed) => streamed.ended,
            Body::File(file) => file.is_end_stream(),
            Body::Compressed(compressed) => compressed.is_end_stream(),
            Body::Worker(proxied) => proxied.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Bytes(full) => full.size_hint(),
            Body::Stream(_) => SizeHint::default(),
            Body::File(file) => file.size_hint(),
            Body::Compressed(compressed) => compressed.size_hint(),
            Body::Worker(proxied) => proxied.size_hint(),
        }
    }
}

// Kept out of the request path's code, like a plugin's stream: only servers that
// compress come here, and the encoder costs far more than the call.
#[cold]
#[inline(never)]
fn poll_compressed(
    body: Pin<&mut CompressionBody<Body>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, StreamFailed>>> {
    body.poll_frame(cx)
        .map_err(|e| StreamFailed(format!("compressing the response failed: {e}")))
}

/// A plugin's response stream, sent as it is produced. Until it ends, it keeps its
/// generation in flight, so the plugin's stream is dropped on its own generation.
///
/// When that generation's drain deadline passes (`Generation::cut_off`), a task
/// watching for it drops the stream and lets go of the generation at once, whether or
/// not hyper polls the body again (it does not while the client reads nothing), and
/// wakes the connection: the response then ends cleanly when hyper next polls it.
pub struct StreamedBody {
    shared: Arc<std::sync::Mutex<Streaming>>,
    /// Dropped with the body: ends the watching task.
    _done: tokio::sync::oneshot::Sender<()>,
    request_id: RequestId,
    ended: bool,
}

/// What the body and its watcher share.
struct Streaming {
    /// `None` once the stream has ended, failed or been cut off.
    live: Option<LiveStream>,
    /// The connection's waker while the stream is pending, to wake it when cut off.
    waker: Option<std::task::Waker>,
}

/// The plugin's stream and the in-flight guard of its generation (dropped in this
/// order).
struct LiveStream {
    stream: FfiStream,
    in_flight: InFlight,
}

impl StreamedBody {
    fn new(stream: FfiStream, in_flight: InFlight, request_id: RequestId) -> Self {
        let cut = in_flight.generation().cut_signal();
        let shared = Arc::new(std::sync::Mutex::new(Streaming {
            live: Some(LiveStream { stream, in_flight }),
            waker: None,
        }));
        let (done, body_dropped) = tokio::sync::oneshot::channel::<()>();
        let watched = shared.clone();
        let watched_id = request_id.clone();
        tokio::spawn(async move {
            let request_id = watched_id;
            tokio::select! {
                () = cut => {
                    let (live, waker) = {
                        let mut shared = watched.lock().unwrap_or_else(|p| p.into_inner());
                        (shared.live.take(), shared.waker.take())
                    };
                    if let Some(live) = &live {
                        let g = live.in_flight.generation();
                        tracing::debug!(server = %g.server, generation = g.number, request_id = request_id.as_str(), "ended a streamed response at the drain deadline");
                    }
                    drop(live);
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                }
                _ = body_dropped => {}
            }
        });
        StreamedBody {
            shared,
            _done: done,
            request_id,
            ended: false,
        }
    }
}

/// Why a streamed response was aborted: the plugin's stream failed or panicked, or a
/// file could not be read.
#[derive(Debug)]
pub struct StreamFailed(String);

impl StreamFailed {
    pub(super) fn new(message: String) -> Self {
        StreamFailed(message)
    }
}

impl std::fmt::Display for StreamFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the response stream failed: {}", self.0)
    }
}

impl std::error::Error for StreamFailed {}

impl StreamedBody {
    // Kept out of the request path's code: few responses are streamed.
    #[cold]
    #[inline(never)]
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailed>>> {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let Some(live) = shared.live.as_mut() else {
            self.ended = true;
            return Poll::Ready(None);
        };
        let polled = cx.with_ffi_context(|cx| live.stream.poll_next(cx));
        match polled {
            FfiStreamPoll::Pending => {
                if !shared
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    shared.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            FfiStreamPoll::Chunk(bytes) => {
                // A plugin's chunk is freed by the plugin's code, which stays mapped for
                // the life of the process: it may outlive this body in hyper's buffers.
                let data = match bytes.as_static() {
                    Some(bytes) => Bytes::from_static(bytes),
                    None => Bytes::from_owner(bytes),
                };
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            FfiStreamPoll::End => {
                drop(shared);
                self.end();
                Poll::Ready(None)
            }
            FfiStreamPoll::Failed(message) => {
                {
                    let g = live.in_flight.generation();
                    tracing::error!(server = %g.server, plugin = %g.plugin().name, request_id = self.request_id.as_str(), "response stream failed: {message}");
                }
                drop(shared);
                self.end();
                Poll::Ready(Some(Err(StreamFailed(message.into_string()))))
            }
            FfiStreamPoll::TooLarge(_) => {
                drop(shared);
                self.end();
                Poll::Ready(Some(Err(StreamFailed("too large".to_owned()))))
            }
        }
    }

    /// The stream is over: it and the in-flight guard are dropped now (outside the lock,
    /// as dropping the stream runs plugin code).
    fn end(&mut self) {
        let live = self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .take();
        drop(live);
        self.ended = true;
    }
}

/// Whether `global.health_path` is set: with none, this is all a request pays for it.
static HEALTH_PATH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says whether the routing snapshot has a `health_path` (control calls it when it
/// publishes one).
pub fn set_health_path_on(on: bool) {
    HEALTH_PATH.store(on, Ordering::Relaxed);
}

/// `global.health_path` on any domain: 200 if every server that should serve does, else
/// 503 with the ones that do not. `None`: not that path.
#[cold]
#[inline(never)]
fn health_path(servers: &Microservers, req: &Request<Incoming>) -> Option<Response<Body>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return None;
    }
    if servers.routing().health_path.as_deref() != Some(req.uri().path()) {
        return None;
    }
    let not_ready = servers.not_ready();
    let (status, body) = if not_ready.is_empty() {
        (StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        let names: Vec<&str> = not_ready.iter().map(|(n, _)| &**n).collect();
        let body = serde_json::json!({"status": "not ready", "not_ready": names});
        (StatusCode::SERVICE_UNAVAILABLE, body)
    };
    let mut response = Response::new(Body::bytes(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    Some(response)
}

/// Answers one request. Never fails: every problem becomes a response.
///
/// The request is taken apart and boxed here, and the returned future is small: it lives
/// in the connection's memory while the request runs, and the less of it there is, the
/// less of it is out of the CPU's cache when a request comes. A request without a body
/// whose handler answers at once (most) is served in one synchronous step on the first
/// poll; anything else continues in a boxed async path.
pub fn handle(servers: Arc<Microservers>, req: Request<Incoming>, client: ClientAddr) -> Handle {
    if HEALTH_PATH.load(Ordering::Relaxed) {
        if let Some(response) = health_path(&servers, &req) {
            return answered(&servers, &req, &client, response, None);
        }
    }
    // The client's own id if it sent a well-formed one (one header lookup), else a new one.
    let request_id = RequestId::of(req.headers());
    // What the access log and the debug line need, gathered only when one is written.
    let debug = Note::of(&req, &client);
    // 0 when requests are not counted (`global.metrics: false`).
    let started = recording::start();
    let (mut parts, body) = req.into_parts();
    // hyper marks a request that asks to upgrade its connection (a WebSocket): it takes
    // a path of its own. (Nothing to remove for any other request: a null check.)
    let upgrade = parts.extensions.remove::<OnUpgrade>();
    // Boxed once, and lent to the plugin as it is: nothing is copied for the boundary.
    let pending = PendingRequest::new(parts, &client, request_id.clone());
    if let Some(upgrade) = upgrade {
        return upgrading(servers, pending, body, request_id, debug, started, upgrade);
    }
    Handle {
        servers,
        start: Some((pending, body)),
        request_id,
        debug,
        started,
        rest: None,
    }
}

/// A response made before the request reached the request path's steps (the health
/// path, a refusal at the edge, a redirect to HTTPS), for `server` if it has one.
#[cold]
#[inline(never)]
fn answered(
    servers: &Arc<Microservers>,
    req: &Request<Incoming>,
    client: &ClientAddr,
    response: Response<Body>,
    server: Served,
) -> Handle {
    Handle {
        servers: servers.clone(),
        start: None,
        request_id: RequestId::of(req.headers()),
        debug: Note::of(req, client),
        started: recording::start(),
        rest: Some(Box::pin(async move { (response, server) })),
    }
}

/// Answers a request refused before it is routed (a limit of its connection), with a
/// JSON error and a request id.
#[cold]
#[inline(never)]
pub fn refuse(
    servers: &Arc<Microservers>,
    req: &Request<Incoming>,
    client: &ClientAddr,
    status: StatusCode,
    message: impl Into<String>,
) -> Handle {
    answered(servers, req, client, error(status, &message.into()), None)
}

/// 308 to `https://` for a request on a plain listener whose server has
/// `redirect_https`; `port` is the HTTPS listener's. `None`: serve it as it is.
#[cold]
#[inline(never)]
pub fn redirect_https(
    servers: &Arc<Microservers>,
    req: &Request<Incoming>,
    client: &ClientAddr,
    port: u16,
) -> Option<Handle> {
    let routing = servers.routing();
    if routing.redirect_https.is_empty() {
        return None;
    }
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))?;
    let domain = normalize_host(raw)?;
    let server = routing.domains.lookup(&domain)?;
    if !routing.redirect_https.contains(&server.name) {
        return None;
    }
    let host = if domain.contains(':') {
        format!("[{domain}]")
    } else {
        domain.into_owned()
    };
    let port = if port == 443 {
        String::new()
    } else {
        format!(":{port}")
    };
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{host}{port}{target}");
    let response = Response::builder()
        .status(StatusCode::PERMANENT_REDIRECT)
        .header(hyper::header::LOCATION, &location)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::bytes(Bytes::from(
            serde_json::json!({ "redirect": location }).to_string(),
        )))
        .ok()?;
    Some(answered(servers, req, client, response, Some(server.meter)))
}

#[cold]
#[inline(never)]
fn upgrading(
    servers: Arc<Microservers>,
    pending: PendingRequest,
    body: Incoming,
    request_id: RequestId,
    debug: Option<Box<Note>>,
    started: u64,
    upgrade: OnUpgrade,
) -> Handle {
    let want_server = debug.is_some() || started != 0;
    let rest = websocket::upgrade(
        servers.clone(),
        pending,
        body,
        request_id.clone(),
        want_server,
        upgrade,
    );
    Handle {
        servers,
        start: None,
        request_id,
        debug,
        started,
        rest: Some(Box::pin(rest)),
    }
}

/// The future of one request (see [`handle`]).
pub struct Handle {
    servers: Arc<Microservers>,
    start: Option<(PendingRequest, Incoming)>,
    request_id: RequestId,
    debug: Option<Box<Note>>,
    /// When it started ([`recording::start`]); 0: it is not counted.
    started: u64,
    rest: Option<Pin<Box<dyn Future<Output = Routed> + Send>>>,
}

/// The server that answered, when the request is counted or the debug line wants its
/// name: its meter, which also holds its name (a pointer: nothing to count or free).
pub(super) type Served = Option<&'static ServerMeter>;

/// A response, and the server that answered (see [`Served`]).
pub(super) type Routed = (Response<Body>, Served);

impl Future for Handle {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.rest.is_none() {
            let (pending, body) = this.start.take().expect("polled after it answered");
            let want_server = this.debug.is_some() || this.started != 0;
            match first_step(
                &this.servers,
                pending,
                body,
                &this.request_id,
                want_server,
                cx,
            ) {
                Ok((mut response, name)) => {
                    this.finish(&mut response, name);
                    return Poll::Ready(Ok(response));
                }
                Err(rest) => this.rest = Some(rest),
            }
        }
        let rest = this.rest.as_mut().expect("set above");
        let (mut response, name) = std::task::ready!(rest.as_mut().poll(cx));
        this.rest = None;
        this.finish(&mut response, name);
        Poll::Ready(Ok(response))
    }
}

impl Handle {
    /// Adds the request id, and writes the access log and debug lines if they are
    /// wanted. Takes the
    /// response by reference: it is large, and moving it costs a copy.
    fn finish(&mut self, response: &mut Response<Body>, server: Served) {
        if let Some(id) = self.request_id.header_value() {
            response.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        if self.started != 0 {
            let bytes = response.body().size_hint().exact();
            let status = response.status().as_u16();
            server
                .unwrap_or_else(recording::unrouted)
                .record(status, self.started, bytes);
        }
        if let Some(note) = self.debug.take() {
            let bytes = response.body().size_hint().exact();
            let status = response.status().as_u16();
            let name = server.map(|m| &*m.name);
            let tenant = name.and_then(|s| self.tenant(s, &note));
            let answered = Answered {
                server: name,
                tenant: tenant.as_ref().map(TenantId::as_str),
                request_id: self.request_id.as_str(),
            };
            (*note).write(status, bytes, answered);
        }
    }

    /// The tenant of a request `server` answered, for its log lines: found again from
    /// the name it was for, so that the request path carries nothing for the log.
    #[cold]
    #[inline(never)]
    fn tenant(&self, server: &str, note: &Note) -> Option<TenantId> {
        let routing = self.servers.routing();
        let admission = routing.admission.as_deref()?;
        let domain = normalize_host(note.host()?)?;
        admission.tenant_of(server, domain.as_bytes())
    }
}

/// The first poll: a request without a body goes straight to its handler; one with a
/// body, or one that cannot finish now, continues in the returned future.
fn first_step(
    servers: &Arc<Microservers>,
    pending: PendingRequest,
    body: Incoming,
    id: &RequestId,
    want_server: bool,
    cx: &mut Context<'_>,
) -> Result<Routed, Pin<Box<dyn Future<Output = Routed> + Send>>> {
    if !body.is_end_stream() {
        return Err(Box::pin(with_body(
            servers.clone(),
            pending,
            body,
            id.clone(),
            want_server,
            false,
        )));
    }
    let body = LentBody::Bytes(Bytes::new());
    let to = To::Domain { admitted: false };
    match dispatch(servers, pending, body, id, want_server, to, cx) {
        Step::Done(routed) => Ok(routed),
        Step::Retry(pending, body) => Err(Box::pin(dispatch_later(
            servers.clone(),
            pending,
            body,
            id.clone(),
            want_server,
        ))),
        Step::Running(running, name) => Err(Box::pin(async move { (running.await, name) })),
        Step::ReadBody(..) => unreachable!("a request without a body was not lent as a stream"),
    }
}

/// Which server a request is for, and whether it was admitted already.
#[derive(Clone, Copy)]
enum To<'a> {
    /// The server its domain names. `admitted`: an earlier step counted it against its
    /// rate limits (it is retried, or its body was read first).
    Domain { admitted: bool },
    /// A service call's server, named by the caller: no rate limit, and the headers as
    /// the calling plugin set them.
    Server(&'a Arc<Server>),
}

/// Where one synchronous step left a request.
enum Step {
    Done(Routed),
    /// The generation retired between its load and the entry: try again after a yield
    /// (the next load sees its successor).
    Retry(PendingRequest, LentBody),
    /// The body is still arriving, and the route (of a generation that replaced the one
    /// that took a stream) wants it whole: read it, then dispatch again.
    ReadBody(PendingRequest, Box<Incoming>),
    /// The handler did not answer at once.
    Running(Pin<Box<dyn Future<Output = Response<Body>> + Send>>, Served),
}

/// The server a request is for.
pub(super) struct Resolved<'r, 'p> {
    pub server: &'r Arc<Server>,
    /// A view of the request (`'p`), or normalised.
    pub domain: Cow<'p, [u8]>,
    /// The server's meter, if the request is counted or the debug line wants its name.
    pub name: Served,
}

/// The server a request is for; or the response that turns it away (boxed: it is the
/// rare case).
pub(super) fn resolve<'r, 'p>(
    routing: &'r Routing,
    parts: &'p Parts,
    want_server: bool,
) -> Result<Resolved<'r, 'p>, Box<Routed>> {
    let refuse = |status, message: &str| Box::new((error(status, message), None));
    // A proxy's CONNECT names no route; HTTP/2's extended CONNECT (RFC 8441: a
    // WebSocket, with its `:protocol`) is an ordinary request for a path.
    if parts.method == Method::CONNECT && parts.extensions.get::<hyper::ext::Protocol>().is_none() {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported",
        ));
    }
    let raw = request_domain(parts).map_err(|m| refuse(StatusCode::BAD_REQUEST, &m))?;
    // A configured name is already normalised: a client that sends one exactly (most
    // do) needs no normalising.
    if let Some(server) = routing.domains.lookup_exact(raw) {
        let name = want_server.then_some(server.meter);
        return Ok(Resolved {
            server,
            domain: Cow::Borrowed(raw),
            name,
        });
    }
    let Ok(raw) = std::str::from_utf8(raw) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the Host header is not text",
        ));
    };
    let domain = if raw.is_empty() {
        Cow::Borrowed("")
    } else {
        normalize_host(raw).ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                &format!("invalid Host header {raw:?}"),
            )
        })?
    };
    let Some(server) = routing.domains.lookup(&domain) else {
        if domain.is_empty() {
            let message = "the request has no Host header and no default server is configured";
            return Err(refuse(StatusCode::NOT_FOUND, message));
        }
        let message = format!("no microserver serves the domain {:?}", &*domain);
        return Err(refuse(StatusCode::NOT_FOUND, &message));
    };
    let name = want_server.then_some(server.meter);
    let domain = match domain {
        Cow::Borrowed(d) => Cow::Borrowed(d.as_bytes()),
        Cow::Owned(d) => Cow::Owned(d.into_bytes()),
    };
    Ok(Resolved {
        server,
        domain,
        name,
    })
}

/// 503 for a server that has `max` requests in flight already (logged at most once per
/// 10 s in all).
#[cold]
#[inline(never)]
fn busy(server: &Server, max: usize, name: Served) -> Refused {
    static LOGGED: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    static SHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let shed = SHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let mut logged = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
    if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
        *logged = Some(Instant::now());
        tracing::warn!(
            server = %server.name,
            max_in_flight = max,
            shed_total = shed,
            "requests refused with 503: the server has global.limits.max_in_flight requests in flight"
        );
    }
    let message = format!(
        "{} has {max} requests in flight, its most (global.limits.max_in_flight); try again shortly",
        server.name
    );
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, &message);
    response
        .headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    Refused::Done(Box::new((response, name)))
}

pub(super) fn unavailable(server: &Server, reason: &str) -> Response<Body> {
    let message = format!("microserver {:?} is not available: {reason}", &*server.name);
    error(StatusCode::SERVICE_UNAVAILABLE, &message)
}

/// A request with a body: turned away early if it cannot be served (its rate limits
/// too, unless `admitted` says they were checked), else its body is read (before the
/// request counts as in flight on a generation, and under the request timeout: a
/// client that trickles its body holds up no reload), then dispatched. A route that
/// takes its body as a stream gets it as it arrives instead: such a request is in
/// flight while the body comes, and its handler (upload included) runs under the
/// request timeout.
pub(super) async fn with_body(
    servers: Arc<Microservers>,
    pending: PendingRequest,
    body: Incoming,
    id: RequestId,
    want_server: bool,
    admitted: bool,
) -> Routed {
    read_body(servers, pending, body, id, want_server, true, admitted).await
}

/// [`with_body`], where `may_stream` false reads the body whole whatever the route (the
/// route changed under a reload since a stream was offered: reading it settles the
/// request, whatever the next reload does).
async fn read_body(
    servers: Arc<Microservers>,
    pending: PendingRequest,
    body: Incoming,
    id: RequestId,
    want_server: bool,
    may_stream: bool,
    admitted: bool,
) -> Routed {
    let reading = 'reading: {
        let routing = servers.routing();
        let parts = pending.parts();
        let Resolved {
            server,
            name,
            domain,
        } = match resolve(&routing, parts, want_server) {
            Ok(resolved) => resolved,
            Err(routed) => return *routed,
        };
        // Counted before the body is read: a refused request's body is not.
        if let (Some(admission), false) = (routing.admission.as_deref(), admitted) {
            if let Err(refused) = admission.admit(&server.name, &domain, Some(pending.client())) {
                return (*refused, name);
            }
        }
        let refused = |response| refused_by(server, parts, &domain, pending.is_tls(), response);
        // Tokens too: a client without a valid one gets its 401 before the host reads
        // (or the client sends) a body. (Checked again when it is dispatched, where the
        // claims header is made: only requests with a body to a server with `jwt` pay
        // for the second check.)
        if let (Some(gate), false) = (routing.jwt.as_deref(), admitted) {
            if let Err(unauthorized) = check_token(gate, server, parts, &id, &mut None) {
                return (refused(*unauthorized), name);
            }
        }
        let stream_limit = match &**server.state() {
            // No plugin sees the body: static files (or the 405 of a server that has
            // only files) answer without it.
            ServerState::Static => break 'reading None,
            ServerState::Waiting(_) if files_for(server, &parts.method).is_some() => {
                break 'reading None
            }
            ServerState::Waiting(reason) => return (refused(unavailable(server, reason)), name),
            // Its worker reads the body, under its own limits.
            ServerState::Worker(_) => break 'reading Some((0, Duration::ZERO, true, server.meter)),
            ServerState::Serving(_) if !may_stream => None,
            ServerState::Serving(g) => match g.routes.find(parts.method.as_str(), parts.uri.path())
            {
                RouteMatch::Found { route, .. } => g.routes.stream_body_limit(route),
                _ => None,
            },
        };
        let max = stream_limit.unwrap_or(routing.limits.max_body_bytes);
        let declared_len = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_len.is_some_and(|n| n > max) {
            return (refused(too_large(max)), name);
        }
        let meter = server.meter;
        Some((
            max,
            routing.limits.request_timeout,
            stream_limit.is_some(),
            meter,
        ))
    };
    let Some((max, timeout, streamed, meter)) = reading else {
        let body = LentBody::Bytes(Bytes::new());
        return dispatch_later(servers, pending, body, id, want_server).await;
    };
    if streamed {
        // The route reads the body itself, as it arrives.
        let body = LentBody::Stream(Box::new(body));
        return dispatch_later(servers, pending, body, id, want_server).await;
    }
    let read = Limited::new(body, max as usize).collect();
    let problem = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(collected)) => {
            let body = collected.to_bytes();
            if recording::enabled() {
                meter.received(body.len() as u64);
            }
            let body = LentBody::Bytes(body);
            return dispatch_later(servers, pending, body, id, want_server).await;
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => too_large(max),
        Ok(Err(e)) => error(
            StatusCode::BAD_REQUEST,
            &format!("could not read the request body: {e}"),
        ),
        Err(_) => {
            let message = format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            );
            error(StatusCode::REQUEST_TIMEOUT, &message)
        }
    };
    let routing = servers.routing();
    match resolve(&routing, pending.parts(), want_server) {
        Ok(Resolved {
            server,
            domain,
            name,
        }) => {
            let problem = refused_by(server, pending.parts(), &domain, pending.is_tls(), problem);
            (problem, name)
        }
        Err(_) => (problem, None),
    }
}

/// `response`, which turns away a request for `server` before any plugin saw it, with
/// what the server adds to its responses (a browser needs its CORS headers to read it).
#[cold]
#[inline(never)]
fn refused_by(
    server: &Server,
    parts: &Parts,
    domain: &[u8],
    tls: bool,
    mut response: Response<Body>,
) -> Response<Body> {
    Finishing::of(server.headers(), parts, domain, tls).apply(&mut response);
    response
}

/// Dispatches a request from an async context, yielding while a reload retires the
/// generation it tried to enter. It was admitted already (by its first step, or before
/// its body was read).
async fn dispatch_later(
    servers: Arc<Microservers>,
    pending: PendingRequest,
    body: LentBody,
    id: RequestId,
    want_server: bool,
) -> Routed {
    dispatch_later_to(servers, pending, body, id, want_server, None).await
}

/// [`dispatch_later`], to `target` rather than the server the request's domain names
/// when it is given (a service call).
async fn dispatch_later_to(
    servers: Arc<Microservers>,
    pending: PendingRequest,
    body: LentBody,
    id: RequestId,
    want_server: bool,
    target: Option<Arc<Server>>,
) -> Routed {
    let mut next = Some((pending, body));
    let to = match &target {
        Some(server) => To::Server(server),
        None => To::Domain { admitted: true },
    };
    loop {
        let step = std::future::poll_fn(|cx| {
            let (pending, body) = next.take().expect("set before each poll");
            Poll::Ready(dispatch(&servers, pending, body, &id, want_server, to, cx))
        })
        .await;
        match step {
            Step::Done(routed) => return routed,
            Step::Retry(pending, body) => {
                next = Some((pending, body));
                tokio::task::yield_now().await;
            }
            Step::Running(running, name) => return (running.await, name),
            Step::ReadBody(pending, incoming) => {
                // Boxed: `read_body` comes back here (once: it reads the body whole).
                let read = Box::pin(read_body(
                    servers,
                    pending,
                    *incoming,
                    id,
                    want_server,
                    false,
                    true,
                ));
                return read.await;
            }
        }
    }
}

/// Why a request was not lent to a plugin.
enum Refused {
    /// Boxed: it is the rare case.
    Done(Box<Routed>),
    /// The generation retired between its load and the entry.
    Retry,
    /// The body is still arriving and the route wants it whole.
    ReadBody,
    /// No plugin route takes it: the server's static files answer, else `Otherwise`.
    /// Boxed: it is larger.
    Files(Box<(Arc<Site>, Otherwise, Served)>),
    /// Its server's plugin runs in a worker process, which gets the request, with the
    /// headers the host decides. Boxed.
    Worker(Box<ToWorker>),
}

/// A request on its way to a worker process: in flight on the worker, the server's
/// meter, and the headers the host decides (tenant, token claims).
pub(super) type ToWorker = (WorkerInFlight, Served, Option<Box<HostHeaders>>);

impl Refused {
    fn files(site: Arc<Site>, otherwise: Otherwise, name: Served) -> Self {
        Refused::Files(Box::new((site, otherwise, name)))
    }
}

/// The server's static files, for a request they may answer (GET and HEAD).
fn files_for(server: &Server, method: &Method) -> Option<Arc<Site>> {
    if method == Method::GET || method == Method::HEAD {
        server.files()
    } else {
        None
    }
}

/// A server with static files only: GET and HEAD go to its files; other methods get 405.
/// Out of line: a plugin's request never comes here, and a file request reads a file.
#[cold]
#[inline(never)]
fn static_only(server: &Server, method: &Method, name: Served) -> Refused {
    if let Some(site) = files_for(server, method) {
        return Refused::files(site, Otherwise::NotFound, name);
    }
    let (status, message) = if method == Method::GET || method == Method::HEAD {
        (StatusCode::NOT_FOUND, "this server has no files".to_owned())
    } else {
        let message = format!("{method} is not allowed: this server has static files only");
        (StatusCode::METHOD_NOT_ALLOWED, message)
    };
    let mut response = error(status, &message);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    Refused::Done(Box::new((response, name)))
}

/// One synchronous step: domain, server, tenant and rate limits, generation, route,
/// and the handler's first poll (with this task's context).
#[inline]
fn dispatch(
    servers: &Microservers,
    pending: PendingRequest,
    body: LentBody,
    id: &RequestId,
    want_server: bool,
    to: To<'_>,
    cx: &mut Context<'_>,
) -> Step {
    let routing = servers.routing();
    let arriving = matches!(body, LentBody::Stream(_));
    // Tenants and rate limits: with neither configured, this one check is their cost.
    let admission = match to {
        To::Domain { admitted } => routing
            .admission
            .as_deref()
            .map(|a| (a, (!admitted).then(|| *pending.client()))),
        To::Server(_) => None,
    };
    let tls = pending.is_tls();
    // Everything borrowed from the request ends with this closure, before it is lent.
    let lent = pending.lend(body, |parts, params| {
        let Resolved {
            server,
            domain,
            name,
        } = match to {
            To::Domain { .. } => {
                resolve(&routing, parts, want_server).map_err(|r| (Refused::Done(r), None))?
            }
            To::Server(server) => Resolved {
                server,
                domain: Cow::Owned(server.name.as_bytes().to_vec()),
                name: want_server.then_some(server.meter),
            },
        };
        // Over a rate limit: 429, whatever the server's state. Else the tenant header
        // its plugin reads, if the config has tenants.
        let mut header = match &admission {
            None => None,
            Some((admission, client)) => admission
                .admit(&server.name, &domain, client.as_ref())
                .map_err(|refused| (Refused::Done(Box::new((*refused, name))), None))?
                .map(|tenant| Box::new(HostHeaders::from_iter([tenant]))),
        };
        // A client's request gets what its server adds to its responses; a service
        // call's does not (its caller reads the body whole, and is no browser).
        let mut finishing = match to {
            To::Domain { .. } => Some(Finishing::of(server.headers(), parts, &domain, tls)),
            To::Server(_) => None,
        };
        if let Some(preflight) = finishing.as_mut().and_then(|f| f.preflight(parts)) {
            return Err((Refused::Done(Box::new((preflight, name))), finishing));
        }
        // Tokens: with no server that has `jwt`, this one check is their cost. A
        // service call's headers are its caller's.
        if let (Some(gate), To::Domain { .. }) = (routing.jwt.as_deref(), to) {
            if let Err(refused) = check_token(gate, server, parts, id, &mut header) {
                return Err((Refused::Done(Box::new((*refused, name))), finishing));
            }
        }
        match enter(&routing, server, parts, params, domain, name, arriving) {
            Ok((mut lending, entered)) => {
                // The tenant the plugin reads, if the config has tenants.
                lending.header = header;
                Ok((lending, (entered, finishing)))
            }
            Err(Refused::Worker(mut to)) => {
                to.2 = header;
                Err((Refused::Worker(to), finishing))
            }
            Err(refused) => Err((refused, finishing)),
        }
    });
    let (request, ((generation, route, head, name), finishing)) = match lent {
        Ok(lent) => lent,
        Err((pending, body, (Refused::Retry, _))) => return Step::Retry(pending, body),
        Err((_, _, (Refused::Done(routed), finishing))) => {
            let (mut response, name) = *routed;
            if let Some(finishing) = &finishing {
                finishing.apply(&mut response);
            }
            return Step::Done((response, name));
        }
        Err((pending, LentBody::Stream(incoming), (Refused::ReadBody, _))) => {
            return Step::ReadBody(pending, incoming)
        }
        Err((_, LentBody::Bytes(_), (Refused::ReadBody, _))) => {
            unreachable!("only a body still arriving is refused for being one")
        }
        Err((pending, body, (Refused::Worker(to), finishing))) => {
            let (worker, name, header) = *to;
            let client = *pending.client();
            let forward = Forward {
                parts: pending.into_parts(),
                body,
                header,
                client,
                id: id.clone(),
                timeout: routing.limits.request_timeout,
                upgrade: None,
            };
            let finishing = finishing.map(Finishing::owned);
            let forwarded = proxy::forward(worker, forward, finishing);
            return Step::Running(Box::pin(forwarded), name);
        }
        Err((pending, _, (Refused::Files(to_files), finishing))) => {
            let (site, otherwise, name) = *to_files;
            // A file kept in memory is answered here, as a plugin's first poll is.
            if let Some(mut response) = site.cached(pending.parts()) {
                if let Some(finishing) = &finishing {
                    finishing.apply(&mut response);
                }
                return Step::Done((response, name));
            }
            let timeout = routing.limits.request_timeout;
            let served = files::serve(site, pending.into_parts(), otherwise, timeout);
            let finishing = finishing.map(Finishing::owned);
            return Step::Running(Box::pin(finished(served, finishing)), name);
        }
    };
    // The poll runs under a permit of its server's bulkhead; with none free, the request
    // waits for its turn.
    let g = generation.generation();
    let label = g.routes.label(route);
    let Some(polling) = g.bulkhead.try_poll(label) else {
        let timeout = routing.limits.request_timeout;
        let later = start_later(request, generation, route, head, id.clone(), timeout);
        let finishing = finishing.map(Finishing::owned);
        return Step::Running(Box::pin(finished(later, finishing)), name);
    };
    // Most handlers answer on their first poll and need no timer; their response is read
    // from a slot on the stack, where the plugin wrote it.
    let mut slot = OutcomeSlot::new();
    let started = call::start(&g.instance, request, cx, &mut slot);
    drop(polling);
    match started {
        None => {
            let outcome = slot.get_mut().expect("the call answered");
            let (mut response, in_flight) = respond(outcome, generation, route, head, id);
            // What the plugin made (its headers, a panic message, a HEAD request's body)
            // is freed while the request still counts as in flight on its generation.
            drop(slot);
            drop(in_flight);
            if let Some(finishing) = &finishing {
                finishing.apply(&mut response);
            }
            Step::Done((response, name))
        }
        Some(call) => {
            let timeout = routing.limits.request_timeout;
            let bulkhead = generation.generation().bulkhead.clone();
            let running = Running {
                call: Bounded::new(call, bulkhead, label),
                in_flight: generation,
                route,
            };
            let waiting = wait_for(running, timeout, timeout, head, id.clone());
            let finishing = finishing.map(Finishing::owned);
            Step::Running(Box::pin(finished(waiting, finishing)), name)
        }
    }
}

/// A request for `server` past its token check (`jwt`): the claims header its plugin
/// reads added to `header`; or the 401 that refuses it.
#[inline(never)]
pub(super) fn check_token(
    gate: &JwtGate,
    server: &Server,
    parts: &Parts,
    id: &RequestId,
    header: &mut Option<Box<HostHeaders>>,
) -> Result<(), Box<Response<Body>>> {
    add_host_header(header, gate.check(&server.name, parts, id)?);
    Ok(())
}

/// `response`, with what its server adds to its responses once it is ready.
async fn finished(
    response: impl Future<Output = Response<Body>>,
    finishing: Option<Finishing>,
) -> Response<Body> {
    let mut response = response.await;
    if let Some(finishing) = &finishing {
        finishing.apply(&mut response);
    }
    response
}

/// [`dispatch`] once the server is known: enter its current generation and find the
/// route (filling in the path parameters), or say why the request goes elsewhere.
#[inline]
fn enter<'p>(
    routing: &Routing,
    server: &Arc<Server>,
    parts: &'p Parts,
    params: &mut ParamSink<'_, 'p>,
    domain: Cow<'p, [u8]>,
    name: Served,
    arriving: bool,
) -> Result<(Lending<'p>, Entered), Refused> {
    // Enter the server's current generation. A generation retired between the load
    // and the entry turns the request away; the caller tries again.
    let generation = match &**server.state() {
        ServerState::Serving(g) => g.enter().ok_or(Refused::Retry)?,
        ServerState::Waiting(reason) => {
            let unavailable = unavailable(server, reason);
            return Err(match files_for(server, &parts.method) {
                Some(site) => Refused::files(site, Otherwise::Unavailable(unavailable), name),
                None => Refused::Done(Box::new((unavailable, name))),
            });
        }
        ServerState::Static => return Err(static_only(server, &parts.method, name)),
        ServerState::Worker(w) => return Err(to_worker(routing, server, w, name)),
    };
    let g: &Generation = generation.generation();
    // Load shedding: the count includes this request.
    if g.in_flight() > routing.limits.max_in_flight {
        return Err(busy(server, routing.limits.max_in_flight, name));
    }
    let (route, found_params, names) = match g.routes.find(parts.method.as_str(), parts.uri.path())
    {
        RouteMatch::Found {
            route,
            params,
            names,
        } => (route, params, names),
        RouteMatch::NotFound => {
            if let Some(site) = files_for(server, &parts.method) {
                return Err(Refused::files(site, Otherwise::NotFound, name));
            }
            let message = format!("no route for {} {}", parts.method, parts.uri.path());
            return Err(Refused::Done(Box::new((
                error(StatusCode::NOT_FOUND, &message),
                name,
            ))));
        }
        RouteMatch::MethodNotAllowed(allow) => {
            let message = format!("{} is not allowed for {}", parts.method, parts.uri.path());
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, &message);
            response.headers_mut().insert(ALLOW, allow.clone());
            return Err(Refused::Done(Box::new((response, name))));
        }
    };
    // Parameter values are views of the path; names are `'static`.
    for (i, (key, value)) in found_params.iter().enumerate() {
        let known = names.get(i).copied().filter(|n| *n == key);
        params.push(known.unwrap_or_else(|| intern(key)), value);
    }
    let stream_body_limit = g.routes.stream_body_limit(route);
    if arriving && stream_body_limit.is_none() {
        return Err(Refused::ReadBody);
    }
    let head = parts.method == Method::HEAD;
    let lending = Lending {
        domain,
        route,
        stream_body_limit,
        socket: None,
        header: None,
    };
    Ok((lending, (generation, route, head, name)))
}

/// A request for a server whose plugin runs in a worker process (out of line: the
/// in-process path never comes here): to the worker, unless it has
/// `global.limits.max_in_flight` requests in flight already (503).
#[cold]
#[inline(never)]
fn to_worker(routing: &Routing, server: &Server, worker: &Arc<Worker>, name: Served) -> Refused {
    if worker.in_flight() >= routing.limits.max_in_flight {
        return busy(server, routing.limits.max_in_flight, name);
    }
    // A worker retired between the load and the entry: its successor takes it.
    match worker.enter() {
        Some(in_flight) => Refused::Worker(Box::new((in_flight, name, None))),
        None => Refused::Retry,
    }
}

/// A request that entered a generation: its in-flight guard, its route, whether it is a
/// HEAD, and the server's meter (see [`Served`]).
type Entered = (InFlight, u32, bool, Served);

/// A handler still running, and the in-flight guard of its generation. The fields drop
/// in this order: the handler's future (plugin code) while the request still counts as
/// in flight, however the request ends.
struct Running {
    /// Each of its polls under a permit of its server's bulkhead.
    call: Bounded<PluginCall>,
    in_flight: InFlight,
    route: u32,
}

/// A handler whose server's plugin polls hold every thread its bulkhead allows: waits
/// for a permit, starts it, then waits for it like any other. The request timeout
/// counts from the start of the wait.
#[cold]
#[inline(never)]
async fn start_later(
    request: FfiRequest,
    in_flight: InFlight,
    route: u32,
    head: bool,
    id: RequestId,
    timeout: Duration,
) -> Response<Body> {
    let since = tokio::time::Instant::now();
    let mut slot = OutcomeSlot::new();
    match start_bounded(request, &in_flight, route, &mut slot, timeout).await {
        Err(_) => timed_out(&in_flight, timeout, &id),
        Ok(None) => {
            let outcome = slot.get_mut().expect("the call answered");
            let (response, in_flight) = respond(outcome, in_flight, route, head, &id);
            drop(slot);
            drop(in_flight);
            response
        }
        Ok(Some(call)) => {
            let running = Running {
                call,
                in_flight,
                route,
            };
            let left = timeout.saturating_sub(since.elapsed());
            wait_for(running, left, timeout, head, id).await
        }
    }
}

/// Starts a route's handler (polls it once) under a permit of its server's bulkhead,
/// waiting up to `timeout` for one: `None` if it answered at once, into `slot`, else
/// the running call, each later poll under a permit too. `Err`: no permit came in time
/// (no plugin code ran; the request is freed).
pub(super) async fn start_bounded(
    request: FfiRequest,
    in_flight: &InFlight,
    route: u32,
    slot: &mut OutcomeSlot,
    timeout: Duration,
) -> Result<Option<Bounded<PluginCall>>, tokio::time::error::Elapsed> {
    let g = in_flight.generation();
    let (bulkhead, label) = (&g.bulkhead, g.routes.label(route));
    let mut turn = Turn::default();
    let mut request = Some(request);
    let first = std::future::poll_fn(|cx| {
        let polling = std::task::ready!(bulkhead.poll_enter(&mut turn, label, cx));
        let request = request.take().expect("started once");
        let started = call::start(&g.instance, request, cx, slot);
        drop(polling);
        Poll::Ready(started)
    });
    let started = tokio::time::timeout(timeout, first).await?;
    Ok(started.map(|call| Bounded::new(call, bulkhead.clone(), label)))
}

/// Waits for a handler that did not answer at once, for what is `left` of the request
/// timeout (`timeout`).
async fn wait_for(
    mut running: Running,
    left: Duration,
    timeout: Duration,
    head: bool,
    id: RequestId,
) -> Response<Body> {
    let outcome = tokio::time::timeout(left, &mut running.call).await;
    let Running {
        call,
        in_flight,
        route,
    } = running;
    match outcome {
        Ok(mut outcome) => {
            let (response, in_flight) = respond(&mut outcome, in_flight, route, head, &id);
            drop(outcome);
            drop(call);
            drop(in_flight);
            response
        }
        Err(_) => {
            drop(call);
            timed_out(&in_flight, timeout, &id)
        }
    }
}

/// A handler that did not answer within the request timeout: logged, and 504.
fn timed_out(in_flight: &InFlight, timeout: Duration, id: &RequestId) -> Response<Body> {
    let g = in_flight.generation();
    let timeouts = &recording::meter(&g.server).timeouts;
    timeouts.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        server = %g.server,
        plugin = %g.plugin().name,
        request_id = id.as_str(),
        timeout_ms = timeout.as_millis() as u64,
        "handler timed out"
    );
    let message = format!(
        "the microserver did not answer within {} ms",
        timeout.as_millis()
    );
    error(StatusCode::GATEWAY_TIMEOUT, &message)
}

/// The HTTP response for a handler's outcome (a 500 for a panic or an invalid response).
/// The in-flight guard comes back unless the response body (made by the plugin) keeps
/// it: the caller drops it after the outcome, so that everything the plugin made is freed
/// while its generation still counts the request.
pub(super) fn respond(
    outcome: &mut FfiHandleResult,
    generation: InFlight,
    route: u32,
    head: bool,
    id: &RequestId,
) -> (Response<Body>, Option<InFlight>) {
    match outcome {
        RResult::ROk(response) => match into_http(response, generation, head, id) {
            Ok(answered) => answered,
            Err((generation, problem)) => {
                let g = generation.generation();
                tracing::error!(server = %g.server, plugin = %g.plugin().name, request_id = id.as_str(), "invalid response: {problem}");
                (internal_error(id.as_str()), Some(generation))
            }
        },
        RResult::RErr(panic) => {
            let g = generation.generation();
            g.panics
                .report(route, g.routes.describe(route), id.as_str(), panic.as_str());
            let panics = &recording::meter(&g.server).panics;
            panics.fetch_add(1, Ordering::Relaxed);
            (internal_error(id.as_str()), Some(generation))
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

/// The domain a request is for, as sent: `:authority` (HTTP/2, or an absolute-form
/// HTTP/1.1 target, which takes precedence over `Host`), else the `Host` header. An empty
/// string for an HTTP/1.0 request without either (it goes to the default server). Not
/// yet checked to be text: a configured name is found without that.
fn request_domain(parts: &hyper::http::request::Parts) -> Result<&[u8], String> {
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
    let authority = parts.uri.authority().map(|a| a.as_str());
    if parts.version == Version::HTTP_2 {
        if let (Some(a), Some(h)) = (authority, host) {
            // Any text will do here: normalize_host admits only host name characters.
            let Ok(h) = std::str::from_utf8(h.as_bytes()) else {
                return Err("the Host header is not text".to_owned());
            };
            if normalize_host(a) != normalize_host(h) {
                return Err(format!(
                    "the Host header {h:?} differs from :authority {a:?}"
                ));
            }
        }
    }
    match authority
        .map(str::as_bytes)
        .or(host.map(HeaderValue::as_bytes))
    {
        Some(raw) => Ok(raw),
        // HTTP/1.0 may omit Host: it goes to the default server, if any.
        None if parts.version <= Version::HTTP_10 => Ok(b""),
        None => Err("missing Host header".to_owned()),
    }
}

/// Checks an HTTP/1 request whose target names an authority (RFC 9112, 3.2): an
/// absolute-form target (`GET http://name/path`) must be `http` or `https` and still
/// comes with one valid `Host` header (HTTP/1.1), though the target's authority routes
/// it; the authority form (`name:port`) is only for CONNECT.
#[cold]
#[inline(never)]
pub fn target_form(parts: &Request<Incoming>) -> Result<(), String> {
    let host = parts.headers().get(HOST);
    let Some(scheme) = parts.uri().scheme_str() else {
        if parts.method() == Method::CONNECT {
            return Ok(());
        }
        return Err(format!(
            "a target of the authority form ({}) is only for CONNECT",
            parts.uri()
        ));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "unsupported scheme {scheme:?} in the request target"
        ));
    }
    if parts
        .uri()
        .authority()
        .is_some_and(|a| normalize_host(a.as_str()).is_none())
    {
        return Err(format!(
            "invalid host in the request target {}",
            parts.uri()
        ));
    }
    match host {
        None if parts.version() >= Version::HTTP_11 => Err("missing Host header".to_owned()),
        Some(h)
            if std::str::from_utf8(h.as_bytes())
                .ok()
                .and_then(normalize_host)
                .is_none() =>
        {
            Err(format!(
                "invalid Host header {:?}",
                String::from_utf8_lossy(h.as_bytes())
            ))
        }
        _ => Ok(()),
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
    id: &RequestId,
) -> Result<(Response<Body>, Option<InFlight>), (InFlight, String)> {
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
    let mut out = Response::new(Body::bytes(Bytes::new()));
    *out.status_mut() = status;
    let headers = out.headers_mut();
    let content_type = response.content_type();
    if !content_type.is_empty() {
        let Ok(value) = header_value(content_type) else {
            return Err((in_flight, "the content-type is not valid".to_owned()));
        };
        headers.append(CONTENT_TYPE, value);
    }
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
        // (A 426 names the protocol to upgrade to: RFC 9110, 15.5.22.)
        if is_framing_header(&name) && !(status == StatusCode::UPGRADE_REQUIRED && name == UPGRADE)
        {
            tracing::debug!(header = %name, "dropped a framing header set by the plugin");
            continue;
        }
        headers.append(name, value);
    }
    if let Some(stream) = response.stream.take() {
        if head {
            // No body, and no length to tell: the stream is dropped unread.
            drop(stream);
            return Ok((out, Some(in_flight)));
        }
        *out.body_mut() = Body::Stream(Box::new(StreamedBody::new(stream, in_flight, id.clone())));
        return Ok((out, None));
    }
    if head {
        // No body in a HEAD response (HTTP/2 would send it as DATA frames), but the
        // length the GET would have had.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(response.body.len()));
        return Ok((out, Some(in_flight)));
    }
    let (body, in_flight) = if let Some(bytes) = response.body.as_static() {
        // A plugin's static data stays mapped for the life of the process.
        (Bytes::from_static(bytes), Some(in_flight))
    } else if response.body.is_empty() {
        (Bytes::new(), Some(in_flight))
    } else {
        let body = Bytes::from_owner(PluginBody {
            bytes: std::mem::replace(&mut response.body, FfiBytes::empty()),
            _in_flight: in_flight,
        });
        (body, None)
    };
    *out.body_mut() = Body::bytes(body);
    Ok((out, in_flight))
}

/// Answers a service call: `request` goes to the server named `name`, as a request
/// from a client would (its current generation, its routes, the host's limits), and the
/// response comes back with its body read whole (up to `max_body_bytes`, within the
/// request timeout). The target sees the server's name as the domain and `internal` as
/// the client address. `timeout`: the caller's own, shorter than the request timeout
/// (504 past it).
pub async fn call_server(
    servers: Arc<Microservers>,
    name: String,
    request: Request<Bytes>,
    timeout: Option<Duration>,
) -> ServiceResponse {
    // A caller that passes its own request's id on (`x-request-id`) keeps it.
    let id = RequestId::of(request.headers());
    let (server, limits) = {
        let routing = servers.routing();
        let server = routing.servers.iter().find(|s| *s.name == *name).cloned();
        (server, routing.limits.clone())
    };
    let response = match server {
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no microserver is named {name:?}"),
        ),
        Some(_) if request.body().len() as u64 > limits.max_body_bytes => {
            too_large(limits.max_body_bytes)
        }
        Some(server) => {
            let (parts, body) = request.into_parts();
            let pending = PendingRequest::new(parts, &ClientAddr::internal(), id.clone());
            let body = LentBody::Bytes(body);
            let call = dispatch_later_to(servers, pending, body, id.clone(), false, Some(server));
            match timeout.filter(|t| *t < limits.request_timeout) {
                None => call.await.0,
                Some(t) => match tokio::time::timeout(t, call).await {
                    Ok((response, _)) => response,
                    Err(_) => {
                        let message = format!(
                            "microserver {name:?} did not answer within {} ms",
                            t.as_millis()
                        );
                        return service_error(StatusCode::GATEWAY_TIMEOUT, &message, id);
                    }
                },
            }
        }
    };
    let (mut parts, body) = response.into_parts();
    let read = Limited::new(body, limits.max_body_bytes as usize).collect();
    let body = match tokio::time::timeout(limits.request_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            let message = format!("the response could not be read whole: {e}");
            return service_error(StatusCode::BAD_GATEWAY, &message, id);
        }
        Err(_) => {
            let message = "the response did not end within the request timeout";
            return service_error(StatusCode::GATEWAY_TIMEOUT, message, id);
        }
    };
    if let Some(value) = id.header_value() {
        parts.headers.insert(X_REQUEST_ID.clone(), value);
    }
    ServiceResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// The answer to a service call that cannot be made at all.
/// Makes plugins' service calls go through the request path to `servers` (held
/// weakly: calls after they are gone get `gone`).
pub fn serve_service_calls(servers: &Arc<Microservers>, gone: &'static str) {
    let weak = Arc::downgrade(servers);
    crate::boundary::services::set_service_caller(Arc::new(move |name, request, timeout| {
        let servers = weak.upgrade();
        Box::pin(async move {
            match servers {
                Some(servers) => call_server(servers, name, request, timeout).await,
                None => call_refused(gone),
            }
        })
    }));
}

pub fn call_refused(message: &str) -> ServiceResponse {
    service_error(StatusCode::SERVICE_UNAVAILABLE, message, RequestId::next())
}

fn service_error(status: StatusCode, message: &str, id: RequestId) -> ServiceResponse {
    let mut headers = hyper::HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(value) = id.header_value() {
        headers.insert(X_REQUEST_ID.clone(), value);
    }
    let body = serde_json::json!({ "error": message, "request_id": id.as_str() });
    ServiceResponse {
        status: status.as_u16(),
        headers,
        body: Bytes::from(body.to_string()),
    }
}

/// A JSON error response: `{"error": "..."}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::bytes(Bytes::from(body)))
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
        .body(Body::bytes(Bytes::from(body)))
        .expect("valid parts")
}

fn too_large(max: u64) -> Response<Body> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body is larger than the limit of {max} bytes"),
    )
}
