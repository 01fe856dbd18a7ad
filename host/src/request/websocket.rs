//! WebSocket connections on the request path: the upgrade (a WebSocket route's handler
//! accepts or refuses it), then one task per connection that owns the socket (framing,
//! pings, limits) and hands each event to the server's current generation.
//!
//! Invariants:
//! - A connection belongs to its server, not to a generation: each event (a message,
//!   the close) enters whichever generation is current when it is handed over, and
//!   holds it (in flight) until its handler is done. Events of one connection are handed
//!   over one at a time, in order, so a reload sends each to exactly one generation.
//! - Nothing of a connection lives in plugin memory: its rooms and attachment are the
//!   host's (`boundary::sockets`), so they survive the generation that set them.
//! - Every wait has a bound: a handler's (`request_timeout`), a write's
//!   (`WRITE_TIMEOUT`), the close handshake's (`CLOSE_WAIT`), a silent client's (two
//!   ping intervals); a send queue is bounded in bytes.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use abi_stable::std_types::RResult;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use plugin_api::ffi::{FfiHandleResult, FfiRequest, FfiSocketEvent, FfiSocketEventKind};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::http::{self, error, respond, unavailable, Body, RequestId, Resolved, Routed, Served};
use super::proxy::{self, Forward};
use crate::boundary::call::{intern, HostHeaders, Lending, LentBody, OutcomeSlot, PendingRequest};
use crate::boundary::plugin;
use crate::boundary::sockets::{close_frame, Conn, Outgoing, Outgoings, Refusal};
use crate::control::config::WebSocketLimits;
use crate::control::deliver::{self, lend, Delivery, Failure, PluginEvent, Started};
use crate::control::servers::{Generation, Microservers, Server, ServerState};
use crate::routing::routes::{RouteMatch, RouteTable};

type InFlight = plugin::InFlight<RouteTable>;

/// How long a write to a client may take (a client that reads nothing is cut after it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the closing side waits for the other's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The read buffer each connection reserves (see `serve`).
const READ_BUFFER: usize = 4 * 1024;

/// Whether a request asks for a WebSocket: HTTP/1.1's `Upgrade: websocket` on a `GET`,
/// or HTTP/2's extended CONNECT with `:protocol websocket` (RFC 8441).
fn asks_for_websocket(parts: &Parts) -> bool {
    if parts.version == Version::HTTP_2 {
        return parts.method == Method::CONNECT
            && parts
                .extensions
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    }
    parts.method == Method::GET
        && has_token(parts, UPGRADE, "websocket")
        && has_token(parts, CONNECTION, "upgrade")
}

fn has_token(parts: &Parts, name: hyper::header::HeaderName, token: &str) -> bool {
    parts.headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The handshake's own checks (RFC 6455 4.2.1): version 13, and a key over HTTP/1.1.
/// Returns the key.
fn check_handshake(parts: &Parts) -> Result<Option<HeaderValue>, Box<Response<Body>>> {
    let version = parts.headers.get("sec-websocket-version");
    if version.map(HeaderValue::as_bytes) != Some(b"13") {
        let mut refused = error(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is supported (Sec-WebSocket-Version: 13)",
        );
        refused
            .headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return Err(Box::new(refused));
    }
    if parts.version == Version::HTTP_2 {
        return Ok(None);
    }
    match parts.headers.get(SEC_WEBSOCKET_KEY) {
        Some(key) if !key.is_empty() => Ok(Some(key.clone())),
        _ => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade needs a Sec-WebSocket-Key header",
        ))),
    }
}

/// Why a request that asked for a WebSocket was not lent to a plugin.
enum Refused {
    Done(Box<Routed>),
    /// The generation retired between its load and the entry: try again.
    Retry,
    /// Its route is not a WebSocket route: it is an ordinary request.
    Ordinary,
    /// Its server's plugin runs in a worker process, which gets the upgrade (with the
    /// headers the host decides). Boxed.
    Worker(Box<http::ToWorker>),
}

/// What the upgrade's handler call needs after the request is lent.
struct Opened {
    in_flight: InFlight,
    route: u32,
    server: Arc<Server>,
    conn: Arc<Conn>,
    rx: Outgoings,
    name: Served,
    limits: WebSocketLimits,
    timeout: Duration,
}

/// A request that asks to upgrade its connection (rare, so it takes its own path): a
/// WebSocket for a WebSocket route goes to the route's handler, which accepts or
/// refuses it; anything else is served as an ordinary request.
pub(super) async fn upgrade(
    servers: Arc<Microservers>,
    pending: PendingRequest,
    body: Incoming,
    id: RequestId,
    want_server: bool,
    on_upgrade: OnUpgrade,
) -> Routed {
    if !asks_for_websocket(pending.parts()) {
        return http::with_body(servers, pending, body, id, want_server, false).await;
    }
    let key = match check_handshake(pending.parts()) {
        Ok(key) => key,
        Err(refused) => return (*refused, None),
    };
    let h2 = pending.parts().version == Version::HTTP_2;
    let mut pending = Some(pending);
    let mut slot = OutcomeSlot::new();
    // Counted against its rate limits by its first step: a step that comes back
    // (Retry, Ordinary) passed them.
    let mut admitted = false;
    // Lent in one synchronous step, like an ordinary request.
    let (opened, request) = loop {
        let step = std::future::poll_fn(|_| {
            let pending = pending.take().expect("set before each step");
            Poll::Ready(open(&servers, pending, &id, want_server, admitted))
        })
        .await;
        admitted = true;
        match step {
            Ok(started) => break started,
            Err((back, Refused::Retry)) => {
                pending = Some(back);
                tokio::task::yield_now().await;
            }
            Err((back, Refused::Ordinary)) => {
                return http::with_body(servers, back, body, id, want_server, true).await;
            }
            Err((_, Refused::Done(routed))) => return *routed,
            Err((back, Refused::Worker(to))) => {
                let (worker, name, header) = *to;
                let client = *back.client();
                let forward = Forward {
                    parts: back.into_parts(),
                    body: LentBody::Bytes(Bytes::new()),
                    header,
                    client,
                    id: id.clone(),
                    timeout: servers.routing().limits.request_timeout,
                    upgrade: Some(on_upgrade),
                };
                return (proxy::forward(worker, forward, None).await, name);
            }
        }
    };
    let Opened {
        in_flight,
        route,
        server,
        conn,
        rx,
        name,
        limits,
        timeout,
    } = opened;
    // The handler's polls run under permits of the server's bulkhead, like a request's
    // (one is free at once unless the server's plugin code holds all it may).
    let since = Instant::now();
    let started = http::start_bounded(request, &in_flight, route, &mut slot, timeout).await;
    let mut outcome_of_call = None;
    // Timed out before it started (no plugin code ran), or after.
    let mut timed_out = started.is_err();
    if let Ok(Some(mut call)) = started {
        let left = timeout.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, &mut call).await {
            Ok(outcome) => outcome_of_call = Some((outcome, call)),
            Err(_) => {
                drop(call);
                timed_out = true;
            }
        }
    }
    if timed_out {
        server.sockets.remove(&conn);
        let g = in_flight.generation();
        tracing::warn!(server = %g.server, plugin = %g.plugin().name, request_id = id.as_str(), timeout_ms = timeout.as_millis() as u64, "WebSocket upgrade handler timed out");
        let message = format!(
            "the microserver did not answer within {} ms",
            timeout.as_millis()
        );
        return (error(StatusCode::GATEWAY_TIMEOUT, &message), name);
    }
    let outcome: &mut FfiHandleResult = match &mut outcome_of_call {
        Some((outcome, _)) => outcome,
        None => slot.get_mut().expect("the call answered"),
    };
    let accepted = matches!(outcome, RResult::ROk(r) if r.status == 101);
    if !accepted {
        server.sockets.remove(&conn);
        let (response, in_flight) = respond(outcome, in_flight, route, false, &id);
        drop(outcome_of_call);
        drop(slot);
        drop(in_flight);
        return (response, name);
    }
    drop(outcome_of_call);
    drop(slot);
    drop(in_flight);
    tracing::debug!(server = %server.name, connection = conn.id(), request_id = id.as_str(), "WebSocket accepted");
    tokio::spawn(run(server, conn, rx, on_upgrade, limits, timeout));
    (switching(key, h2), name)
}

/// One synchronous step of the upgrade: domain, server, tenant and rate limits (unless
/// `admitted`), generation, route, a new connection in the server's set, and the
/// request lent for the route's handler (which the caller starts).
fn open(
    servers: &Microservers,
    pending: PendingRequest,
    id: &RequestId,
    want_server: bool,
    admitted: bool,
) -> Result<(Opened, FfiRequest), (PendingRequest, Refused)> {
    let routing = servers.routing();
    let client = (routing.admission.is_some() && !admitted).then(|| *pending.client());
    let lent = pending.lend(LentBody::Bytes(Bytes::new()), |parts, params| {
        let Resolved {
            server,
            domain,
            name,
        } = http::resolve(&routing, parts, want_server).map_err(Refused::Done)?;
        let mut header = match routing.admission.as_deref() {
            None => None,
            Some(admission) => admission
                .admit(&server.name, &domain, client.as_ref())
                .map_err(|refused| Refused::Done(Box::new((*refused, name))))?
                .map(|tenant| Box::new(HostHeaders::from_iter([tenant]))),
        };
        if let Some(gate) = routing.jwt.as_deref() {
            http::check_token(gate, server, parts, id, &mut header)
                .map_err(|refused| Refused::Done(Box::new((*refused, name))))?;
        }
        let in_flight = match &**server.state() {
            ServerState::Serving(g) => g.enter().ok_or(Refused::Retry)?,
            ServerState::Waiting(reason) => {
                return Err(Refused::Done(Box::new((unavailable(server, reason), name))));
            }
            // No plugin to take it: its static files answer it as they would any GET.
            ServerState::Static => return Err(Refused::Ordinary),
            ServerState::Worker(w) => {
                // A worker retired between the load and the entry: try its successor.
                let in_flight = w.enter().ok_or(Refused::Retry)?;
                return Err(Refused::Worker(Box::new((in_flight, name, header))));
            }
        };
        let g = in_flight.generation();
        let (route, found, names) = match g.routes.find("GET", parts.uri.path()) {
            RouteMatch::Found {
                route,
                params,
                names,
            } if g.routes.is_websocket(route) => (route, params, names),
            _ => return Err(Refused::Ordinary),
        };
        for (i, (key, value)) in found.iter().enumerate() {
            let known = names.get(i).copied().filter(|n| *n == key);
            params.push(known.unwrap_or_else(|| intern(key)), value);
        }
        let limits = routing.limits.websocket.clone();
        let (conn, rx) = match server
            .sockets
            .admit(limits.max_connections, limits.send_queue_bytes)
        {
            Ok(admitted) => admitted,
            Err(Refusal::Full { max }) => {
                tracing::warn!(server = %server.name, max_connections = max, "refused a WebSocket connection: the server has as many as it may");
                let message = format!(
                    "the microserver has {max} WebSocket connections open, the most it may"
                );
                let refused = error(StatusCode::SERVICE_UNAVAILABLE, &message);
                return Err(Refused::Done(Box::new((refused, name))));
            }
            Err(Refusal::Closed) => {
                let refused = unavailable(server, "it takes no new WebSocket connections");
                return Err(Refused::Done(Box::new((refused, name))));
            }
        };
        let lending = Lending {
            domain,
            route,
            stream_body_limit: None,
            socket: Some(conn.ffi()),
            header,
        };
        let opened = Opened {
            in_flight,
            route,
            server: server.clone(),
            conn,
            rx,
            name,
            limits,
            timeout: routing.limits.request_timeout,
        };
        Ok((lending, opened))
    });
    let (request, opened) = match lent {
        Ok(lent) => lent,
        Err((pending, _, refused)) => return Err((pending, refused)),
    };
    Ok((opened, request))
}

/// The answer that accepts a WebSocket: 101 over HTTP/1.1, 200 over HTTP/2.
fn switching(key: Option<HeaderValue>, h2: bool) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    if h2 {
        return response;
    }
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    let accept = key.map(|k| derive_accept_key(k.as_bytes()));
    if let Some(accept) = accept.and_then(|a| HeaderValue::try_from(a).ok()) {
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// How a connection ended, for the close event.
struct Closed {
    code: u16,
    reason: String,
}

impl Closed {
    fn of(frame: &CloseFrame) -> Self {
        Closed {
            code: frame.code.into(),
            reason: frame.reason.to_string(),
        }
    }

    fn cut() -> Self {
        Closed {
            code: 1006,
            reason: String::new(),
        }
    }
}

/// A connection's task, from the upgrade to the close event.
async fn run(
    server: Arc<Server>,
    conn: Arc<Conn>,
    mut rx: Outgoings,
    on_upgrade: OnUpgrade,
    limits: WebSocketLimits,
    timeout: Duration,
) {
    let closed = match on_upgrade.await {
        Ok(upgraded) => serve(&server, &conn, &mut rx, upgraded, &limits, timeout).await,
        Err(e) => {
            tracing::debug!(server = %server.name, connection = conn.id(), "the WebSocket upgrade failed: {e}");
            Closed::cut()
        }
    };
    // Out of the server's set and its rooms first: the close handler sees the rest.
    server.sockets.remove(&conn);
    tracing::debug!(server = %server.name, connection = conn.id(), code = closed.code, "WebSocket closed");
    let data = Bytes::from(closed.reason.into_bytes());
    let event = Event {
        kind: FfiSocketEventKind::Close,
        code: closed.code,
        data,
    };
    if let Err(failure) = hand_over(&server, &conn, event, timeout).await {
        log_failure(&failure, &server, &conn, "close");
    }
}

/// Serves one open connection until it closes; returns how it closed.
async fn serve(
    server: &Server,
    conn: &Arc<Conn>,
    rx: &mut Outgoings,
    upgraded: hyper::upgrade::Upgraded,
    limits: &WebSocketLimits,
    timeout: Duration,
) -> Closed {
    // A small read buffer (tungstenite's default is 128 KiB, reserved per connection):
    // it grows for a larger message and keeps idle connections cheap.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_message_bytes));
    let ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    // One stream for both directions (not split: writes happen between polls of the
    // read side, never during one, so no lock is needed).
    let mut ws = ws;
    let interval = limits.ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut delivery: Option<Delivery> = None;
    let close = loop {
        tokio::select! {
            biased;
            out = rx.recv() => match out {
                // An urgent close goes before whatever is still queued.
                _ if conn.urgent_close().is_some() => {
                    break conn.urgent_close().expect("just seen");
                }
                Outgoing::Wake => {}
                Outgoing::Message(message) => {
                    match write(&mut ws, conn, rx, message).await {
                        Ok(None) => {}
                        Ok(Some(frame)) => break frame,
                        Err(()) => return Closed::cut(),
                    }
                }
                Outgoing::Close(frame) => break frame,
            },
            done = async { delivery.as_mut().expect("polled only when set").await }, if delivery.is_some() => {
                delivery = None;
                heard = Instant::now();
                if let Err(failure) = done {
                    log_failure(&failure, server, conn, "message");
                    break failure_close(&failure);
                }
            }
            frame = ws.next(), if delivery.is_none() => {
                heard = Instant::now();
                if let Some(Ok(Message::Text(_) | Message::Binary(_))) = &frame {
                    conn.hub().messages_in.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let (kind, data) = match frame {
                    Some(Ok(Message::Text(text))) => (FfiSocketEventKind::Text, Bytes::from(text)),
                    Some(Ok(Message::Binary(bytes))) => (FfiSocketEventKind::Binary, bytes),
                    // tungstenite answers pings itself; a pong only shows the client is there.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(frame))) => {
                        // tungstenite queued the reply; send it, and let the client close.
                        let _ = tokio::time::timeout(CLOSE_WAIT, ws.flush()).await;
                        let _ = tokio::time::timeout(CLOSE_WAIT, async {
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        return match frame {
                            Some(frame) => Closed::of(&frame),
                            None => Closed { code: 1005, reason: String::new() },
                        };
                    }
                    Some(Err(WsError::Capacity(e))) => {
                        tracing::debug!(server = %server.name, connection = conn.id(), "closing a WebSocket connection: {e}");
                        break close_frame(CloseCode::Size, "message too big");
                    }
                    Some(Err(e)) => {
                        tracing::debug!(server = %server.name, connection = conn.id(), "WebSocket connection failed: {e}");
                        return Closed::cut();
                    }
                    None => return Closed::cut(),
                };
                let event = Event { kind, code: 0, data };
                // Whatever the handler sends is taken from the queue right after.
                match rx.quietly(begin_event(server, conn, event, timeout)).await {
                    Started::Done(Ok(())) => {}
                    Started::Done(Err(failure)) => {
                        log_failure(&failure, server, conn, "message");
                        break failure_close(&failure);
                    }
                    Started::Running(running) => delivery = Some(running),
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() >= 2 * interval {
                    tracing::debug!(server = %server.name, connection = conn.id(), "closing a silent WebSocket connection: no pong within two ping intervals");
                    break close_frame(CloseCode::Away, "no pong");
                }
                if sink_send(&mut ws, Message::Ping(Bytes::new())).await.is_err() {
                    return Closed::cut();
                }
            }
        }
    };
    // A handler still running for this connection is dropped: the connection is going.
    drop(delivery);
    let closed = Closed::of(&close);
    if sink_send(&mut ws, Message::Close(Some(close)))
        .await
        .is_ok()
    {
        // The client's close frame (or the end of the stream), messages in between dropped.
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(message)) = ws.next().await {
                if message.is_close() {
                    break;
                }
            }
        })
        .await;
    }
    closed
}

type Sink = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Sends one message under the write timeout.
async fn sink_send(sink: &mut Sink, message: Message) -> Result<(), ()> {
    match tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Writes a message and whatever else is queued behind it, then flushes, under the
/// write timeout. A close found in the queue comes back (to be sent after).
async fn write(
    sink: &mut Sink,
    conn: &Conn,
    rx: &mut Outgoings,
    first: Message,
) -> Result<Option<CloseFrame>, ()> {
    let work = async {
        let mut next = Some(first);
        let mut close = None;
        while let Some(message) = next.take() {
            let len = message.len();
            sink.feed(message).await?;
            conn.sent(len);
            if let Some(urgent) = conn.urgent_close() {
                close = Some(urgent);
                break;
            }
            match rx.try_recv() {
                Some(Outgoing::Message(more)) => next = Some(more),
                Some(Outgoing::Close(frame)) => close = Some(frame),
                Some(Outgoing::Wake) => close = conn.urgent_close(),
                None => {}
            }
        }
        sink.flush().await?;
        Ok::<_, WsError>(close)
    };
    match tokio::time::timeout(WRITE_TIMEOUT, work).await {
        Ok(Ok(close)) => Ok(close),
        _ => Err(()),
    }
}

/// One event of a connection, before it is handed over.
struct Event {
    kind: FfiSocketEventKind,
    code: u16,
    data: Bytes,
}

/// Hands a connection's event to the server's current generation and polls its handler
/// once.
async fn begin_event(
    server: &Server,
    conn: &Arc<Conn>,
    event: Event,
    timeout: Duration,
) -> Started {
    let label = conn.label();
    let mut make = |_: &Generation| {
        Some(PluginEvent::Socket(FfiSocketEvent {
            socket: conn.ffi(),
            kind: event.kind,
            code: event.code,
            data: lend(&event.data),
        }))
    };
    deliver::begin(server, &mut make, label, timeout).await
}

/// Hands a connection's event over and waits for its handler.
async fn hand_over(
    server: &Server,
    conn: &Arc<Conn>,
    event: Event,
    timeout: Duration,
) -> Result<(), Failure> {
    match begin_event(server, conn, event, timeout).await {
        Started::Done(done) => done,
        Started::Running(running) => running.await,
    }
}

fn log_failure(failure: &Failure, server: &Server, conn: &Conn, what: &str) {
    match failure {
        // Reported (and rate-limited) where the panic was caught.
        Failure::Panicked => {}
        Failure::TimedOut(timeout) => tracing::warn!(
            server = %server.name,
            connection = conn.id(),
            timeout_ms = timeout.as_millis() as u64,
            "a WebSocket {what} handler timed out"
        ),
        Failure::Unavailable(reason) => tracing::debug!(
            server = %server.name,
            connection = conn.id(),
            "a WebSocket {what} was not handed over: {reason}"
        ),
    }
}

/// The close a connection gets when its handler failed.
fn failure_close(failure: &Failure) -> CloseFrame {
    match failure {
        Failure::Panicked => close_frame(CloseCode::Error, "the microserver failed"),
        Failure::TimedOut(_) => close_frame(CloseCode::Error, "the microserver timed out"),
        Failure::Unavailable(_) => close_frame(CloseCode::Away, "the microserver is not available"),
    }
}
