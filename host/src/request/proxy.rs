//! A request for a server whose plugin runs in a worker process (`isolation:
//! "process"`): forwarded to the worker over its Unix socket (`boundary::worker`), after
//! everything the host does in front of a plugin (rate limits, tenants, tokens) and
//! before what it adds to the response (headers, compression, the access log), which
//! the caller does as for any response. A WebSocket's upgrade is forwarded too, and its
//! bytes are copied both ways until either side closes.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST, UPGRADE};
use hyper::http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;

use super::headers::Finishing;
use super::http::{error, Body, RequestId, StreamFailed};
use crate::boundary::call::{ClientAddr, HostHeaders, LentBody};
use crate::boundary::request_id::X_REQUEST_ID;
use crate::boundary::worker::{
    Outgoing, SendError, Worker, WorkerInFlight, CLIENT_HEADER, EVENT_HEADER,
};

/// Headers of one hop, never forwarded (RFC 9110, 7.6.1), but for an upgrade's.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A response body read from a worker as the client takes it; the request counts as in
/// flight on the worker until it ends.
pub struct WorkerBody {
    body: Incoming,
    _in_flight: WorkerInFlight,
}

impl WorkerBody {
    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailed>>> {
        Pin::new(&mut self.body)
            .poll_frame(cx)
            .map_err(|e| StreamFailed::new(format!("its worker process stopped sending it: {e}")))
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The request as the worker gets it: what the client sent (without its hop-by-hop
/// headers), for its domain, with the request id, the client's address and the
/// headers the host decides.
pub(super) struct Forward {
    pub parts: Parts,
    pub body: LentBody,
    pub header: Option<Box<HostHeaders>>,
    pub client: ClientAddr,
    pub id: RequestId,
    pub timeout: Duration,
    /// A WebSocket upgrade: the client's side of it.
    pub upgrade: Option<OnUpgrade>,
}

/// Forwards one request to `worker` and answers with its response: 502 if the worker
/// ended before it answered (it crashed, or was killed), 504 past the request timeout.
///
/// `finishing`: what the server adds to its responses, applied to this one (here, not
/// by a wrapping future, which would hold this one twice: its argument and its await).
pub(super) async fn forward(
    in_flight: WorkerInFlight,
    forward: Forward,
    finishing: Option<Finishing>,
) -> Response<Body> {
    let mut response = answer(in_flight, forward).await;
    if let Some(finishing) = &finishing {
        finishing.apply(&mut response);
    }
    response
}

async fn answer(in_flight: WorkerInFlight, forward: Forward) -> Response<Body> {
    let worker = in_flight.worker().clone();
    let Forward {
        parts,
        body,
        header,
        client,
        id,
        timeout,
        upgrade,
    } = forward;
    // HTTP/2's extended CONNECT (RFC 8441) reaches the worker as HTTP/1.1's upgrade.
    let h2_websocket = upgrade.is_some() && parts.method == Method::CONNECT;
    let request = match request(
        parts,
        body,
        header,
        &client,
        &id,
        upgrade.is_some(),
        &worker.server,
    ) {
        Ok(request) => request,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let sent = tokio::time::timeout(timeout, worker.send(request, upgrade.is_some())).await;
    let mut response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(SendError::Lost(why))) => return failed(&worker, &why, &id),
        // Never sent: the worker has ended, and its host is about to restart it.
        Ok(Err(SendError::Unreachable(why))) => {
            let message = format!(
                "microserver {:?} is not available: {why}; it is being restarted",
                &*worker.server
            );
            let mut response = error_with_id(StatusCode::SERVICE_UNAVAILABLE, &message, &id);
            response
                .headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Err(_) => {
            let message = format!(
                "the microserver did not answer within {} ms",
                timeout.as_millis()
            );
            return error_with_id(StatusCode::GATEWAY_TIMEOUT, &message, &id);
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_side) = upgrade else {
            return failed(&worker, "it switched protocols unasked", &id);
        };
        let worker_side = hyper::upgrade::on(&mut response);
        let socket = in_flight.into_socket();
        tokio::spawn(async move {
            let (Ok(client_side), Ok(worker_side)) = (client_side.await, worker_side.await) else {
                return;
            };
            let (mut a, mut b) = (TokioIo::new(client_side), TokioIo::new(worker_side));
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            // Counted (and so drained on a reload) while it is open.
            drop(socket);
        });
        let (mut head, _) = response.into_parts();
        if h2_websocket {
            // HTTP/2 accepts with 200 and no upgrade headers.
            head.status = StatusCode::OK;
            for name in ["connection", "upgrade", "sec-websocket-accept"] {
                head.headers.remove(name);
            }
        }
        return Response::from_parts(head, Body::empty());
    }
    let (mut head, body) = response.into_parts();
    for name in HOP_BY_HOP {
        head.headers.remove(name);
    }
    let body = WorkerBody {
        body,
        _in_flight: in_flight,
    };
    Response::from_parts(head, Body::Worker(Box::new(body)))
}

fn request(
    parts: Parts,
    body: LentBody,
    header: Option<Box<HostHeaders>>,
    client: &ClientAddr,
    id: &RequestId,
    upgrade: bool,
    server: &str,
) -> Result<Request<Outgoing>, String> {
    let Parts {
        method,
        uri,
        mut headers,
        ..
    } = parts;
    let authority = uri.authority().map(|a| a.as_str().to_owned());
    let connect = method == Method::CONNECT;
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // Only the host hands a worker bus events.
    headers.remove(EVENT_HEADER);
    if !headers.contains_key(HOST) {
        // HTTP/2's `:authority`, or for a service call (which names no domain) the
        // server's name, which its plugin sees as the domain in process too.
        let authority = authority.unwrap_or_else(|| server.to_owned());
        let host =
            HeaderValue::try_from(authority).map_err(|e| format!("invalid authority: {e}"))?;
        headers.insert(HOST, host);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        if connect {
            // An HTTP/2 WebSocket has no key; the worker's HTTP/1.1 handshake needs one.
            let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
            let key = HeaderValue::try_from(key).map_err(|e| e.to_string())?;
            headers.insert("sec-websocket-key", key);
            headers
                .entry("sec-websocket-version")
                .or_insert(HeaderValue::from_static("13"));
        }
    }
    if let Some(id) = id.header_value() {
        headers.insert(X_REQUEST_ID.clone(), id);
    }
    let mut address = String::from_utf8_lossy(client.as_bytes()).into_owned();
    if client.is_tls() {
        address.push_str(";tls");
    }
    headers.insert(
        HeaderName::from_static(CLIENT_HEADER),
        HeaderValue::try_from(address).map_err(|e| e.to_string())?,
    );
    for h in header.iter().flat_map(|h| h.iter()) {
        headers.remove(h.name);
        if let Some(value) = &h.value {
            headers.insert(HeaderName::from_static(h.name), value.clone());
        }
    }
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    // HTTP/2 (every request but an upgrade) names its authority in the target.
    let target = match headers.get(HOST).and_then(|h| h.to_str().ok()) {
        Some(host) if !upgrade => format!("http://{host}{target}"),
        _ => target.to_owned(),
    };
    let body: Outgoing = match body {
        LentBody::Bytes(bytes) => Either::Left(Full::new(bytes)),
        LentBody::Stream(incoming) => Either::Right(*incoming),
    };
    let mut request = Request::new(body);
    *request.method_mut() = if connect { Method::GET } else { method };
    *request.uri_mut() = target.parse().map_err(|e| format!("invalid target: {e}"))?;
    *request.version_mut() = if upgrade {
        Version::HTTP_11
    } else {
        Version::HTTP_2
    };
    *request.headers_mut() = headers;
    Ok(request)
}

/// 502: the worker ended before it answered (with the request id, for the log lines).
fn failed(worker: &Worker, why: &str, id: &RequestId) -> Response<Body> {
    tracing::warn!(server = %worker.server, pid = worker.pid, request_id = id.as_str(), "request lost with its worker process: {why}");
    let message = format!("microserver {:?} failed: {why}", &*worker.server);
    error_with_id(StatusCode::BAD_GATEWAY, &message, id)
}

/// A JSON error that names the request id (the worker's log lines carry it too).
fn error_with_id(status: StatusCode, message: &str, id: &RequestId) -> Response<Body> {
    let body = serde_json::json!({ "error": message, "request_id": id.as_str() });
    let mut response = error(status, "");
    *response.body_mut() = Body::bytes(Bytes::from(body.to_string()));
    response
}
