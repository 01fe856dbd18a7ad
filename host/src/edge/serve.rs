//! Listening sockets, connections, and graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::control::config::Listen;
use crate::control::servers::Microservers;
use crate::edge::limits::{self, Activity, Gate, Reason, Refused, Tracked, Verdict};
use crate::edge::tls::Tls;

/// How often open connections are checked against their deadlines.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// How often connections closed or refused by a limit are logged, at most.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// An accepted connection, its client's address, and what its listener speaks.
pub type AcceptedConnection = (TcpStream, SocketAddr, Listen);

/// Accepted connections, from every listener.
pub type Accepted = mpsc::Receiver<AcceptedConnection>;

/// The set of listening sockets. Changing it binds new addresses before closing old
/// ones, and never closes a listener whose address did not change (a change of its TLS
/// or protocols applies to the connections it accepts next).
pub struct Listeners {
    tx: mpsc::Sender<AcceptedConnection>,
    active: Mutex<Vec<Acceptor>>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.bound()).finish()
    }
}

struct Acceptor {
    /// As configured (the address may have port 0).
    configured: Listen,
    local: SocketAddr,
    /// What the accept loop tags its connections with.
    spec: Arc<Mutex<Listen>>,
    task: JoinHandle<()>,
}

/// Whether listener `b` from a new config is listener `a` (the same socket). Port 0
/// asks for a new socket each time, so only an identical entry is the same one.
fn same_socket(a: &Listen, b: &Listen) -> bool {
    a.address == b.address && (a.address.port() != 0 || a == b)
}

impl Listeners {
    /// Binds every address, or names the one that failed.
    pub async fn bind(listen: &[Listen]) -> Result<(Arc<Listeners>, Accepted), String> {
        let (tx, rx) = mpsc::channel(64);
        let listeners = Arc::new(Listeners {
            tx,
            active: Mutex::new(Vec::new()),
        });
        listeners.change(listen, false).await?;
        Ok((listeners, rx))
    }

    /// Each listener as configured, and its bound address.
    pub fn bound(&self) -> Vec<(Listen, SocketAddr)> {
        self.lock()
            .iter()
            .map(|a| (a.configured, a.local))
            .collect()
    }

    /// The port of the first HTTPS listener, where `redirect_https` sends clients.
    pub fn https_port(&self) -> Option<u16> {
        self.lock()
            .iter()
            .find(|a| a.configured.tls)
            .map(|a| a.local.port())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Acceptor>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Listens on exactly `listen`: binds the new ones first (if any fails, nothing
    /// changes), then closes the ones no longer wanted. Open connections stay open.
    pub async fn apply(&self, listen: &[Listen]) -> Result<(), String> {
        self.change(listen, true).await
    }

    async fn change(&self, listen: &[Listen], announce: bool) -> Result<(), String> {
        let current: Vec<Listen> = self.lock().iter().map(|a| a.configured).collect();
        let mut bound = Vec::new();
        for wanted in listen
            .iter()
            .filter(|l| !current.iter().any(|c| same_socket(c, l)))
        {
            let addr = wanted.address;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            bound.push((*wanted, listener));
        }
        let mut active = self.lock();
        active.retain(|a| {
            let keep = listen.iter().any(|l| same_socket(&a.configured, l));
            if !keep {
                a.task.abort();
                tracing::info!(
                    "stopped listening on {}://{}",
                    a.configured.scheme(),
                    a.local
                );
            }
            keep
        });
        for a in active.iter_mut() {
            if let Some(now) = listen.iter().find(|l| same_socket(&a.configured, l)) {
                if *now != a.configured {
                    a.configured = *now;
                    *a.spec.lock().unwrap_or_else(|p| p.into_inner()) = *now;
                    tracing::info!(
                        "listening on {}://{} (changed: {})",
                        now.scheme(),
                        a.local,
                        describe(now)
                    );
                }
            }
        }
        for (configured, listener) in bound {
            let local = listener.local_addr().unwrap_or(configured.address);
            if announce {
                tracing::info!("listening on {}://{local}", configured.scheme());
            }
            let tx = self.tx.clone();
            let spec = Arc::new(Mutex::new(configured));
            let task = tokio::spawn(accept_loop(listener, spec.clone(), tx));
            active.push(Acceptor {
                configured,
                local,
                spec,
                task,
            });
        }
        Ok(())
    }

    /// Closes every listening socket.
    pub fn stop(&self) {
        for a in self.lock().drain(..) {
            a.task.abort();
        }
    }
}

/// `TLS, HTTP/1.1 and HTTP/2` and the like.
fn describe(l: &Listen) -> String {
    let mut parts = vec![if l.tls { "TLS" } else { "plain" }];
    if l.http1 {
        parts.push("HTTP/1.1");
    }
    if l.http2 {
        parts.push("HTTP/2");
    }
    parts.join(", ")
}

async fn accept_loop(
    listener: TcpListener,
    spec: Arc<Mutex<Listen>>,
    tx: mpsc::Sender<AcceptedConnection>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let spec = *spec.lock().unwrap_or_else(|p| p.into_inner());
                if tx.send((stream, peer, spec)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Usually out of file descriptors; back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves accepted connections until `stop` completes, then closes the listeners and
/// lets open connections finish their requests for up to `grace`. Returns when the
/// grace period ends (or ended): the deadline for requests still running.
pub async fn serve(
    servers: Arc<Microservers>,
    listeners: Arc<Listeners>,
    tls: Arc<Tls>,
    mut accepted: Accepted,
    stop: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> std::time::Instant {
    // Announced here, not at bind time: "listening" means ready to serve.
    for (listen, addr) in listeners.bound() {
        tracing::info!("listening on {}://{addr}", listen.scheme());
    }
    let connections = Arc::new(Connections::default());
    let gate = Arc::new(Gate::default());
    gate.publish();
    let fds = limits::raise_fd_limit();
    let sweeper = tokio::spawn(sweep(servers.clone(), connections.clone(), gate.clone()));
    let mut refusals = Refusals::default();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            conn = accepted.recv() => {
                let Some((stream, peer, listen)) = conn else { break };
                let routing = servers.routing();
                let limits = &routing.limits.connections;
                let max = limits::effective_max(limits.max, fds);
                let ticket = match gate.admit(peer.ip(), max, limits.max_per_ip) {
                    Ok(ticket) => ticket,
                    Err(why) => {
                        // Closed at once: the client sees the connection end.
                        drop(stream);
                        refusals.count(why, peer, max, limits.max_per_ip);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let activity = Activity::new();
                let io = Tracked::new(stream, activity.clone(), ticket);
                // Requests on plain listeners may be sent to HTTPS: looked at per
                // request only while some server asks for it.
                let redirect_to = (!listen.tls && !routing.redirect_https.is_empty())
                    .then(|| listeners.https_port())
                    .flatten();
                let handshake_timeout = limits.first_request_timeout;
                drop(routing);
                let connection = Connection {
                    servers: servers.clone(),
                    connections: connections.clone(),
                    activity,
                    peer,
                    redirect_to,
                    tls: listen.tls,
                };
                if !listen.tls {
                    let protocol = match (listen.http1, listen.http2) {
                        (true, false) => Some(Protocol::Http1),
                        (false, true) => Some(Protocol::Http2),
                        _ => None,
                    };
                    tokio::spawn(connection.serve(io, protocol));
                    continue;
                }
                let acceptor = tls.acceptor(&listen).clone();
                tokio::spawn(async move {
                    // Under the first request's deadline: the sweeper sees a connection
                    // only once it speaks HTTP.
                    let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake did not finish within global.connections.first_request_timeout_ms");
                            return;
                        }
                    };
                    // ALPN's choice; a client that offered none speaks HTTP/1.1 where
                    // it may.
                    let protocol = match stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Protocol::Http2,
                        Some(_) => Protocol::Http1,
                        None if listen.http1 => Protocol::Http1,
                        None => Protocol::Http2,
                    };
                    connection.serve(stream, Some(protocol)).await;
                });
            }
            () = &mut stop => break,
        }
    }
    sweeper.abort();
    listeners.stop();
    tracing::info!(
        "stopped accepting; waiting up to {} ms for open requests",
        grace.as_millis()
    );
    let grace_ends = std::time::Instant::now() + grace;
    connections.stop();
    if tokio::time::timeout(grace, connections.closed())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open at the shutdown deadline");
    }
    grace_ends
}

/// The HTTP protocol of a connection, when its listener or ALPN decided it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// What serving one accepted connection needs.
struct Connection {
    servers: Arc<Microservers>,
    connections: Arc<Connections>,
    activity: Arc<Activity>,
    peer: SocketAddr,
    /// The HTTPS port to redirect to, for servers with `redirect_https` (plain listeners
    /// only).
    redirect_to: Option<u16>,
    /// A TLS listener's connection (HSTS is sent on these only).
    tls: bool,
}

impl Connection {
    /// Sets up HTTP on `io` (plain or TLS); the future serves it until the connection
    /// ends. `protocol`: the one to speak; `None` tells HTTP/2 from HTTP/1.1 by the
    /// client's first bytes. Set up here, not in the future: what the set-up needs is
    /// not kept in the connection's task for its whole life.
    ///
    /// The future must be the whole of a spawned task (after a TLS handshake at most):
    /// `Watched` relies on it (see there).
    fn serve<I>(self, io: I, protocol: Option<Protocol>) -> impl Future<Output = ()> + Send
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            servers,
            connections,
            activity,
            peer,
            redirect_to,
            tls,
        } = self;
        let routing = servers.routing();
        let limits = &routing.limits.connections;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder = match protocol {
            Some(Protocol::Http1) => builder.http1_only(),
            Some(Protocol::Http2) => builder.http2_only(),
            None => builder,
        };
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes)
            .max_headers(routing.limits.max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2_max_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            // WebSockets over HTTP/2 (RFC 8441: extended CONNECT).
            .enable_connect_protocol();
        // Formatted once per connection, not per request.
        let client = crate::boundary::call::ClientAddr::new(peer);
        let client = if tls { client.over_tls() } else { client };
        let (max_headers, max_uri) = (routing.limits.max_headers, limits.max_uri_bytes);
        drop(routing);
        let noted = activity.clone();
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            noted.requested();
            // HTTP/1's header count is hyper's (max_headers); HTTP/2's and the
            // target's length are checked here.
            if req.version() == hyper::Version::HTTP_2 && req.headers().len() > max_headers {
                return crate::request::http::refuse(
                    &servers,
                    &req,
                    &client,
                    hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "too many header fields",
                );
            }
            if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > max_uri {
                return crate::request::http::refuse(
                    &servers,
                    &req,
                    &client,
                    hyper::StatusCode::URI_TOO_LONG,
                    "the request target is too long",
                );
            }
            // An HTTP/1 target that names its authority (RFC 9112, 3.2).
            if req.uri().authority().is_some() && req.version() != hyper::Version::HTTP_2 {
                if let Err(why) = crate::request::http::target_form(&req) {
                    return crate::request::http::refuse(
                        &servers,
                        &req,
                        &client,
                        hyper::StatusCode::BAD_REQUEST,
                        why,
                    );
                }
            }
            if let Some(port) = redirect_to {
                if let Some(redirect) =
                    crate::request::http::redirect_https(&servers, &req, &client, port)
                {
                    return redirect;
                }
            }
            crate::request::http::handle(servers.clone(), req, client)
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        let conn = connections.watch(conn.into_owned(), activity);
        async move {
            if let Some(Err(e)) = conn.await {
                tracing::debug!(%peer, "connection ended with an error: {e}");
            }
        }
    }
}

/// Open connections, and the signal that asks them to finish their requests and close.
///
/// hyper-util's `GracefulShutdown` does the same by polling a watch channel every time a
/// connection is polled, which cost about 200 instructions per request (a quarter of a
/// microsecond here). Here a poll costs one atomic load: the stop signal is sent by
/// waking each connection's task once.
#[derive(Default)]
struct Connections {
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Each open connection by id: what moved on it, and its task's waker once it has
    /// been polled.
    open: Mutex<HashMap<u64, Open>>,
    all_closed: Notify,
}

struct Open {
    activity: Arc<Activity>,
    waker: Option<Waker>,
}

impl Connections {
    fn watch<C: GracefulConnection>(
        self: &Arc<Self>,
        conn: C,
        activity: Arc<Activity>,
    ) -> Watched<C> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Open {
                activity: activity.clone(),
                waker: None,
            },
        );
        Watched {
            conn: Box::pin(conn),
            id,
            registered: false,
            shutting_down: false,
            activity,
            connections: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every open connection, and every one accepted later, to finish.
    fn stop(&self) {
        // Set before taking the lock: a connection that registers after this wakes
        // reads `stopping` after the lock, so it sees it.
        self.stopping.store(true, Ordering::SeqCst);
        for open in self.lock().values() {
            if let Some(waker) = &open.waker {
                waker.wake_by_ref();
            }
        }
    }

    /// Completes once no connection is open.
    async fn closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if self.lock().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// A connection that finishes gracefully once `Connections::stop` is called.
///
/// It registers its task's waker on its first poll and keeps it: it must be the whole of
/// a spawned task (a task's waker stays valid for the task's life).
///
/// It also obeys the sweeper's order (`Activity::order`): finish (as at shutdown), or
/// close now (the connection is dropped; its output is `None`).
struct Watched<C> {
    conn: Pin<Box<C>>,
    id: u64,
    registered: bool,
    shutting_down: bool,
    activity: Arc<Activity>,
    connections: Arc<Connections>,
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = Option<C::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<C::Output>> {
        let this = &mut *self;
        if !this.registered {
            if let Some(open) = this.connections.lock().get_mut(&this.id) {
                open.waker = Some(cx.waker().clone());
            }
            this.registered = true;
        }
        let order = this.activity.order.load(Ordering::Relaxed);
        if order == limits::ORDER_CLOSE {
            return Poll::Ready(None);
        }
        if !this.shutting_down
            && (order == limits::ORDER_FINISH || this.connections.stopping.load(Ordering::SeqCst))
        {
            this.conn.as_mut().graceful_shutdown();
            this.shutting_down = true;
        }
        this.conn.as_mut().poll(cx).map(Some)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        let mut open = self.connections.lock();
        open.remove(&self.id);
        if open.is_empty() {
            self.connections.all_closed.notify_waiters();
        }
    }
}

/// Checks every open HTTP connection against its deadlines, a few times a second, and
/// logs what it closed (at most once per `LIMIT_LOG_EVERY`, with counts). Gives memory
/// back to the system after a storm of connections.
async fn sweep(servers: Arc<Microservers>, connections: Arc<Connections>, gate: Arc<Gate>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed: HashMap<Reason, u64> = HashMap::new();
    let mut logged: Option<std::time::Instant> = None;
    let mut trim = limits::Trim::default();
    loop {
        every.tick().await;
        if trim.after(gate.open()) {
            // Off the runtime's threads: it can take a few milliseconds.
            let _ = tokio::task::spawn_blocking(limits::trim_memory).await;
        }
        let now = limits::tick();
        let limits = servers.routing().limits.connections.clone();
        for open in connections.lock().values() {
            let order = match limits::judge(&open.activity, now, &limits) {
                Verdict::Keep => continue,
                Verdict::Finish => limits::ORDER_FINISH,
                Verdict::Close(reason) => {
                    *closed.entry(reason).or_default() += 1;
                    limits::ORDER_CLOSE
                }
            };
            open.activity.order.store(order, Ordering::Relaxed);
            if let Some(waker) = &open.waker {
                waker.wake_by_ref();
            }
        }
        if !closed.is_empty() && logged.is_none_or(|at| at.elapsed() >= LIMIT_LOG_EVERY) {
            for (reason, n) in closed.drain() {
                let level_warn = reason != Reason::Idle;
                if level_warn {
                    tracing::warn!(closed = n, "closed connections: {}", reason.describe());
                } else {
                    tracing::debug!(closed = n, "closed connections: {}", reason.describe());
                }
            }
            logged = Some(std::time::Instant::now());
        }
    }
}

/// Connections refused at the gate, logged at most once per `LIMIT_LOG_EVERY`.
#[derive(Default)]
struct Refusals {
    full: u64,
    per_ip: u64,
    logged: Option<std::time::Instant>,
}

impl Refusals {
    fn count(&mut self, why: Refused, peer: SocketAddr, max: usize, max_per_ip: usize) {
        match why {
            Refused::Full => self.full += 1,
            Refused::PerIp => self.per_ip += 1,
        }
        if self.logged.is_some_and(|at| at.elapsed() < LIMIT_LOG_EVERY) {
            return;
        }
        self.logged = Some(std::time::Instant::now());
        if self.full > 0 {
            tracing::warn!(
                refused = self.full,
                max,
                "connections refused: global.connections.max are open"
            );
        }
        if self.per_ip > 0 {
            tracing::warn!(refused = self.per_ip, max_per_ip, last = %peer.ip(), "connections refused: global.connections.max_per_ip are open from one address");
        }
        self.full = 0;
        self.per_ip = 0;
    }
}

/// Installs the SIGHUP handler now (SIGHUP's default action ends a process: from here
/// on it asks for a reload instead, see `control::reload::forward_hangups`), and
/// returns its stream. Install it before slow start-up work, like [`shutdown_signal`].
#[cfg(unix)]
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(e) => {
            tracing::error!("cannot install the SIGHUP handler: {e}");
            None
        }
    }
}

/// Installs the SIGINT and SIGTERM handlers now, and returns a future that completes on
/// the first of them. Install it before slow start-up work, so that a signal during
/// start-up still leads to a clean stop.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                },
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!("cannot install signal handlers: {e}");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
