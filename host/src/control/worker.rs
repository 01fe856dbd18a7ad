//! The worker process's side of `isolation: "process"` (`host --worker DIR`; the host's
//! side, and the protocol, are in `boundary::worker`).
//!
//! A worker is the host narrowed to one server: it loads the config its host handed
//! it (`DIR/worker.json`: the config as written, parsed here with the same
//! environment), keeps only that server (`Config::for_worker`: no listeners, limits,
//! headers or logs of its own; the host in front does those), loads the plugin copied
//! into `DIR`, and serves the host's requests over `DIR/http.sock` with the same
//! request path as the host. Its stdout belongs to the protocol: what a plugin prints
//! goes to stderr.

#![allow(unsafe_code)]

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::Either;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::boundary::call::ClientAddr;
use crate::boundary::services::{refused, ServiceResponse};
use crate::boundary::worker::{
    decode_event, decode_response, encode_request, hex, CLIENT_HEADER, EVENT_HEADER,
    MAX_HEADER_LIST, WINDOW,
};
use crate::control::config;
use crate::control::servers::{Microservers, ServerState};
use crate::request::http::Body;

/// Set once this process runs as a worker.
static WORKER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is a worker (`host --worker`). Its host reports what happens
/// to its server (a library loaded, the server serving or not, and why), so the
/// worker says those at DEBUG only: one line per event in the host's log.
pub fn running() -> bool {
    WORKER.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs a worker in folder `dir` until its host asks it to stop (or goes away).
pub fn main(dir: &Path) -> ExitCode {
    WORKER.store(true, std::sync::atomic::Ordering::Relaxed);
    // The protocol's channel is the original stdout; from here on, stdout (a plugin's
    // `println!`) goes to stderr.
    #[cfg(unix)]
    let out: Box<dyn Write + Send> = unsafe {
        use std::os::fd::FromRawFd;
        // Close-on-exec: a process the plugin starts must not hold the protocol open
        // (its host reads the end of it as this worker's end).
        let fd = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            eprintln!("error: worker: cannot set up its output");
            return ExitCode::FAILURE;
        }
        Box::new(std::fs::File::from_raw_fd(fd))
    };
    #[cfg(not(unix))]
    let out: Box<dyn Write + Send> = Box::new(std::io::stdout());
    // The commands' channel likewise: the original stdin, moved aside (close-on-exec,
    // so a process the plugin starts cannot read the host's commands); stdin itself is
    // /dev/null from here on.
    #[cfg(unix)]
    let input: Box<dyn std::io::Read + Send> = unsafe {
        use std::os::fd::{AsRawFd, FromRawFd};
        let fd = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        let null = std::fs::File::open("/dev/null");
        match null {
            Ok(null) if fd >= 0 && libc::dup2(null.as_raw_fd(), 0) >= 0 => {}
            _ => {
                eprintln!("error: worker: cannot set up its input");
                return ExitCode::FAILURE;
            }
        }
        Box::new(std::fs::File::from_raw_fd(fd))
    };
    #[cfg(not(unix))]
    let input: Box<dyn std::io::Read + Send> = Box::new(std::io::stdin());
    let out = Arc::new(Mutex::new(out));
    let say = {
        let out = out.clone();
        move |line: &str| {
            let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        }
    };
    let refuse = |reason: String| {
        say(&format!(
            "ready {}",
            serde_json::json!({ "serving": false, "reason": reason })
        ));
        ExitCode::from(2)
    };
    let description: Value = match std::fs::read(dir.join("worker.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => return refuse(format!("worker: cannot read its description: {e}")),
    };
    let name = description["server"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if let Some(mb) = description["max_memory_mb"].as_u64() {
        if let Err(e) = limit_memory(mb) {
            return refuse(format!("worker: cannot set its memory limit: {e}"));
        }
    }
    let folder = description["folder"].as_str().unwrap_or_default();
    let text = description["config"].to_string();
    let env = |key: &str| std::env::var(key).ok();
    let config = match config::parse_in(&text, &env, Path::new(folder)) {
        Ok(c) => c,
        Err(problems) => {
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return refuse(format!("its config: {}", problems.join("; ")));
        }
    };
    let Some(config) = config.for_worker(&name, dir.to_owned()) else {
        return refuse(format!("the config has no server {name:?}"));
    };
    let state = std::fs::read(dir.join("state.in")).ok();
    // What the plugin publishes goes to the host, which publishes it, and its service
    // calls to other servers too, which the host makes (init's too).
    let to_host = match lines_to_host(out.clone(), config.global.bus.queue) {
        Ok(lines) => lines,
        Err(e) => return refuse(format!("worker: cannot start its thread to the host: {e}")),
    };
    forward_published(to_host.clone(), config.global.bus.queue);
    let local = Arc::new(std::sync::OnceLock::new());
    make_service_calls(
        to_host,
        name.clone(),
        local.clone(),
        config.global.limits.request_timeout,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(crate::boundary::services::mark_host_thread)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return refuse(format!("worker: cannot start the runtime: {e}")),
    };
    crate::boundary::services::set_host_runtime(runtime.handle().clone());
    crate::boundary::bulkhead::set_workers(runtime.metrics().num_workers());
    crate::boundary::bulkhead::start_watchdog(runtime.handle().clone());
    // The CPU limit: a handler that holds its thread past the request timeout ends the
    // process (the host replaces it).
    crate::boundary::bulkhead::end_process_after(config.global.limits.request_timeout);
    let code = runtime.block_on(serve(
        config,
        dir.to_owned(),
        state,
        name,
        (out, input, say),
        local,
    ));
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

/// The protocol's channels: replies and lines to the host, commands from it.
type Out = Arc<Mutex<Box<dyn Write + Send>>>;
type In = Box<dyn std::io::Read + Send>;

async fn serve(
    config: config::Config,
    dir: std::path::PathBuf,
    state: Option<Vec<u8>>,
    name: String,
    (out, input, say): (Out, In, impl Fn(&str) + Send + Sync + Clone + 'static),
    local: Arc<std::sync::OnceLock<std::sync::Weak<Microservers>>>,
) -> ExitCode {
    let socket = dir.join("http.sock");
    let listener = match tokio::net::UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            say(&format!(
                "ready {}",
                serde_json::json!({ "serving": false, "reason": format!("worker: cannot listen on {}: {e}", socket.display()) })
            ));
            return ExitCode::from(2);
        }
    };
    // Commands (and the answers to service calls) are read from now on: the plugin's
    // init may call other servers, whose answers come on stdin.
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    commands(local.clone(), dir.clone(), input, say.clone(), stop_tx);
    let started = {
        let (config, dir) = (config.clone(), dir.clone());
        tokio::task::spawn_blocking(move || Microservers::start_handed(&config, dir, state)).await
    };
    let servers = match started {
        Ok((servers, _)) => Arc::new(servers),
        Err(e) => {
            say(&format!(
                "ready {}",
                serde_json::json!({ "serving": false, "reason": format!("worker: starting failed: {e}") })
            ));
            return ExitCode::from(2);
        }
    };
    // Service calls to this server are answered here; to others, by the host.
    let _ = local.set(Arc::downgrade(&servers));
    let ready = match servers.routing().servers.first().map(|s| s.state()) {
        Some(state) => match &**state {
            ServerState::Serving(g) => {
                let lib = g.plugin();
                serde_json::json!({
                    "serving": true,
                    "plugin": lib.name,
                    "version": lib.version,
                    "build": lib.build(),
                    // The host subscribes the server to these for it.
                    "topics": g.routes.topics(),
                })
            }
            ServerState::Waiting(reason) => {
                serde_json::json!({ "serving": false, "reason": reason })
            }
            _ => serde_json::json!({ "serving": false, "reason": "it has no plugin" }),
        },
        None => serde_json::json!({ "serving": false, "reason": format!("no server {name:?}") }),
    };
    let serving = ready["serving"] == Value::Bool(true);
    say(&format!("ready {ready}"));
    if !serving {
        let s = servers.clone();
        let _ = tokio::task::spawn_blocking(move || {
            s.shutdown_all(Instant::now(), Duration::from_secs(1))
        })
        .await;
        return ExitCode::from(2);
    }
    drop(out);
    // The host adds a few headers of its own to what it accepted.
    let max_headers = config.global.limits.max_headers + 8;
    let grace = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let servers = servers.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        if req.headers().contains_key(EVENT_HEADER) {
                            return Either::Right(Box::pin(bus_event(servers.clone(), req)));
                        }
                        let client = req
                            .headers_mut()
                            .remove(CLIENT_HEADER)
                            .and_then(|v| client_addr(v.to_str().ok()?))
                            .unwrap_or_else(ClientAddr::internal);
                        Either::Left(crate::request::http::handle(servers.clone(), req, client))
                    });
                    // HTTP/2 for requests (the host multiplexes them on one
                    // connection), HTTP/1.1 for WebSocket upgrades.
                    let mut http = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    http.http1().max_headers(max_headers);
                    http.http2()
                        .initial_stream_window_size(WINDOW)
                        .initial_connection_window_size(WINDOW * 16)
                        .max_frame_size(256 * 1024)
                        .max_concurrent_streams(u32::MAX)
                        .max_header_list_size(MAX_HEADER_LIST);
                    let _ = http
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
            grace = stop_rx.recv() => break grace.unwrap_or(Duration::from_secs(1)),
        }
    };
    drop(listener);
    let until = Instant::now() + grace;
    let hook = servers.config().global.shutdown_timeout;
    let _ = tokio::task::spawn_blocking(move || servers.shutdown_all(until, hook)).await;
    let _ = std::fs::remove_file(&socket);
    ExitCode::SUCCESS
}

/// Hands a bus event from the host (a `POST` with [`EVENT_HEADER`]: the topic's length
/// in four bytes, big-endian, the topic, the payload) to this worker's server, and
/// answers when its handler is done: 204, or 500 (it panicked), 503 (not delivered,
/// the reason in the body), 504 (it timed out).
fn bus_event(
    servers: Arc<Microservers>,
    req: hyper::Request<hyper::body::Incoming>,
) -> impl std::future::Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send {
    use crate::control::deliver::Failure;
    use http_body_util::BodyExt;
    async move {
        let answer = |status: StatusCode, reason: &str| {
            let mut response = Response::new(Body::bytes(Bytes::from(reason.to_owned())));
            *response.status_mut() = status;
            Ok(response)
        };
        let body = match req.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return answer(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let Some((topic, payload)) = decode_event(&body) else {
            return answer(StatusCode::BAD_REQUEST, "a malformed bus event");
        };
        let Some(server) = servers.routing().servers.first().cloned() else {
            return answer(StatusCode::SERVICE_UNAVAILABLE, "the worker has no server");
        };
        let timeout = servers.config().global.limits.request_timeout;
        match crate::control::deliver::bus_event(&server, &topic, &payload, timeout).await {
            Ok(()) => {
                let mut response = Response::new(Body::empty());
                *response.status_mut() = StatusCode::NO_CONTENT;
                Ok(response)
            }
            Err(Failure::Panicked) => answer(StatusCode::INTERNAL_SERVER_ERROR, "it panicked"),
            Err(Failure::TimedOut(_)) => answer(StatusCode::GATEWAY_TIMEOUT, "it timed out"),
            Err(Failure::Unavailable(reason)) => answer(StatusCode::SERVICE_UNAVAILABLE, &reason),
        }
    }
}

/// Lines for the host (bus events, service calls), written on the protocol's channel by
/// a thread of their own, so that the plugin never waits on the pipe: at most
/// `capacity` wait.
type ToHost = std::sync::mpsc::SyncSender<String>;

fn lines_to_host(
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    capacity: usize,
) -> std::io::Result<ToHost> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(capacity.clamp(1, 1 << 24));
    std::thread::Builder::new()
        .name("worker-to-host".to_owned())
        .spawn(move || {
            for line in rx {
                let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                if out
                    .write_all(line.as_bytes())
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    // The host is gone.
                    return;
                }
            }
        })?;
    Ok(tx)
}

/// Sends what the plugin publishes to the host, one `bus <topic> <payload>` line (hex)
/// each: publishing never blocks the plugin; past `capacity` lines waiting, an event is
/// dropped, counted and logged (at most once per 5 s).
fn forward_published(to_host: ToHost, capacity: usize) {
    let dropped = Mutex::new((None::<Instant>, 0u64));
    crate::boundary::services::publish_to_host(Box::new(move |topic, payload| {
        let line = format!("bus {} {}\n", hex(&topic), hex(&payload));
        match to_host.try_send(line) {
            Ok(()) => true,
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                let mut log = dropped.lock().unwrap_or_else(|p| p.into_inner());
                log.1 += 1;
                if log
                    .0
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(5))
                {
                    tracing::warn!(
                        topic = %String::from_utf8_lossy(&topic),
                        dropped = log.1,
                        capacity,
                        "bus events dropped: the worker's queue to its host is full"
                    );
                    *log = (Some(Instant::now()), 0);
                }
                false
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => false,
        }
    }));
}

/// Service calls waiting for the host's answer, by number.
type Pending = Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<ServiceResponse>>>;

fn pending() -> &'static Pending {
    static PENDING: std::sync::OnceLock<Pending> = std::sync::OnceLock::new();
    PENDING.get_or_init(Default::default)
}

/// Answers the plugin's service calls: this server's here (once `local` is set), any
/// other's by the host (a `call` line; the answer comes on stdin, see `commands`),
/// within the call's timeout (else the request timeout) and a second more.
fn make_service_calls(
    to_host: ToHost,
    own: String,
    local: Arc<std::sync::OnceLock<std::sync::Weak<Microservers>>>,
    request_timeout: Duration,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    crate::boundary::services::set_service_caller(Arc::new(move |name, request, timeout| {
        if name == own {
            let servers = local.get().and_then(std::sync::Weak::upgrade);
            return Box::pin(async move {
                match servers {
                    Some(servers) => {
                        crate::request::http::call_server(servers, name, request, timeout).await
                    }
                    None => refused(503, "the worker's server is not serving yet"),
                }
            });
        }
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        pending()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let ms = timeout.map_or(0, |t| t.as_millis().max(1) as u64);
        let line = format!(
            "call {id} {} {ms} {}\n",
            hex(name.as_bytes()),
            hex(&encode_request(&request))
        );
        let sent = to_host.try_send(line).is_ok();
        let limit = timeout.unwrap_or(request_timeout) + Duration::from_secs(1);
        Box::pin(async move {
            let forget = || {
                pending()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id)
            };
            if !sent {
                forget();
                return refused(503, "the worker's queue to its host is full");
            }
            match tokio::time::timeout(limit, rx).await {
                Ok(Ok(response)) => response,
                Ok(Err(_)) => refused(503, "the host did not answer the call"),
                Err(_) => {
                    forget();
                    refused(
                        504,
                        &format!("the host did not answer within {} ms", limit.as_millis()),
                    )
                }
            }
        })
    }));
}

/// The host's answer to a service call (`<id> <response hex>`).
fn answered(answer: &str) {
    let Some((id, response)) = answer.split_once(' ') else {
        return;
    };
    let waiting = id.parse::<u64>().ok().and_then(|id| {
        pending()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    });
    let Some(waiting) = waiting else { return };
    let response = decode_response(response)
        .unwrap_or_else(|| refused(502, "the host's answer to the call cannot be read"));
    let _ = waiting.send(response);
}

/// The client's address as the host sent it: `ADDR` or `ADDR;tls`.
fn client_addr(value: &str) -> Option<ClientAddr> {
    let (addr, tls) = match value.strip_suffix(";tls") {
        Some(addr) => (addr, true),
        None => (value, false),
    };
    let client = ClientAddr::new(addr.parse().ok()?);
    Some(if tls { client.over_tls() } else { client })
}

/// Answers the host's commands on stdin, one at a time, on a thread of its own (plugin
/// code runs here: `export_state`, `health`). Stdin closing means the host is gone.
fn commands(
    servers: Arc<std::sync::OnceLock<std::sync::Weak<Microservers>>>,
    dir: std::path::PathBuf,
    input: Box<dyn std::io::Read + Send>,
    say: impl Fn(&str) + Send + Sync + 'static,
    stop: tokio::sync::mpsc::UnboundedSender<Duration>,
) {
    let runtime = tokio::runtime::Handle::current();
    let say = Arc::new(say);
    let spawned = std::thread::Builder::new()
        .name("worker-commands".to_owned())
        .spawn(move || {
            crate::boundary::services::mark_host_thread();
            for line in std::io::BufReader::new(input).lines() {
                let Ok(line) = line else { break };
                let mut words = line.splitn(3, ' ');
                // Each command is numbered; its reply carries the number.
                let n = words.next().unwrap_or_default().to_owned();
                match words.next() {
                    // The answer to a service call (not numbered: `- answer ...`).
                    Some("answer") => answered(words.next().unwrap_or_default()),
                    Some("shutdown") => {
                        let ms = words
                            .next()
                            .and_then(|w| w.trim().parse().ok())
                            .unwrap_or(1000);
                        let _ = stop.send(Duration::from_millis(ms));
                        // Reading on: calls in flight still get their answers.
                    }
                    // Plugin code, which may make service calls: on a thread of its own,
                    // so that their answers are read meanwhile.
                    Some(command @ ("export-state" | "health")) => {
                        let command = command.to_owned();
                        let (servers, dir, runtime, say) =
                            (servers.clone(), dir.clone(), runtime.clone(), say.clone());
                        let spawned = std::thread::Builder::new()
                            .name("worker-command".to_owned())
                            .spawn(move || {
                                crate::boundary::services::mark_host_thread();
                                let servers = servers.get().and_then(std::sync::Weak::upgrade);
                                let reply =
                                    run_command(servers.as_deref(), &dir, &runtime, &command);
                                say(&format!("{n} {reply}"));
                            });
                        if let Err(e) = spawned {
                            tracing::warn!("worker: cannot start a thread for a command: {e}");
                        }
                    }
                    _ => say(&format!("{n} error unknown command {line:?}")),
                }
            }
            // The host closed the pipe: it is gone, or wants this worker gone.
            let _ = stop.send(Duration::from_millis(1000));
        });
    if let Err(e) = spawned {
        tracing::error!("worker: cannot start its command thread: {e}");
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let aside = path.with_extension(format!("part{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&aside, bytes)?;
    std::fs::rename(&aside, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&aside);
    })
}

/// Runs one of the host's commands that call the plugin; its reply.
fn run_command(
    servers: Option<&Microservers>,
    dir: &Path,
    runtime: &tokio::runtime::Handle,
    command: &str,
) -> String {
    let generation = servers.and_then(|servers| match &**servers.routing().servers[0].state() {
        ServerState::Serving(g) => Some(g.clone()),
        _ => None,
    });
    if command == "export-state" {
        return match generation.and_then(|g| g.instance.export_state()) {
            // Written aside and renamed into place: an earlier export still running
            // (its host gave up on it) cannot leave half a state there.
            Some(bytes) => match write_atomically(&dir.join("state.out"), &bytes) {
                Ok(()) => format!("state {}", bytes.len()),
                Err(e) => {
                    tracing::warn!("cannot write the state for the host: {e}");
                    "state none".to_owned()
                }
            },
            None => "state none".to_owned(),
        };
    }
    let answer = match generation {
        Some(g) => runtime.block_on(g.health()),
        None => Err("it is not serving".to_owned()),
    };
    match answer {
        Ok(()) => "health ok".to_owned(),
        Err(reason) => format!("health {}", reason.replace('\n', " ")),
    }
}

/// Limits the process's data memory (heap and anonymous mappings) to `mb` MiB: past
/// it, an allocation fails, and Rust ends the process.
fn limit_memory(mb: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let bytes = mb.saturating_mul(1024 * 1024);
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mb;
    Ok(())
}
