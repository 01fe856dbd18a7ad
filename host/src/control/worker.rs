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

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::boundary::call::ClientAddr;
use crate::boundary::worker::{CLIENT_HEADER, MAX_HEADER_LIST, WINDOW};
use crate::control::config;
use crate::control::servers::{Microservers, ServerState};

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
    let code = runtime.block_on(serve(config, dir.to_owned(), state, name, out, input, say));
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn serve(
    config: config::Config,
    dir: std::path::PathBuf,
    state: Option<Vec<u8>>,
    name: String,
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    input: Box<dyn std::io::Read + Send>,
    say: impl Fn(&str) + Send + Sync + Clone + 'static,
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
    // Service calls reach only this server (the only one this process has).
    crate::request::http::serve_service_calls(&servers, "the worker is shutting down");
    let ready = match servers.routing().servers.first().map(|s| s.state()) {
        Some(state) => match &**state {
            ServerState::Serving(g) => {
                let lib = g.plugin();
                serde_json::json!({
                    "serving": true,
                    "plugin": lib.name,
                    "version": lib.version,
                    "build": lib.build(),
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
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    drop(out);
    commands(servers.clone(), dir.clone(), input, say.clone(), stop_tx);
    // The host adds a few headers of its own to what it accepted.
    let max_headers = config.global.limits.max_headers + 8;
    let grace = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let servers = servers.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        let client = req
                            .headers_mut()
                            .remove(CLIENT_HEADER)
                            .and_then(|v| client_addr(v.to_str().ok()?))
                            .unwrap_or_else(ClientAddr::internal);
                        crate::request::http::handle(servers.clone(), req, client)
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
    servers: Arc<Microservers>,
    dir: std::path::PathBuf,
    input: Box<dyn std::io::Read + Send>,
    say: impl Fn(&str) + Send + 'static,
    stop: tokio::sync::mpsc::UnboundedSender<Duration>,
) {
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("worker-commands".to_owned())
        .spawn(move || {
            crate::boundary::services::mark_host_thread();
            for line in std::io::BufReader::new(input).lines() {
                let Ok(line) = line else { break };
                let mut words = line.split_whitespace();
                // Each command is numbered; its reply carries the number.
                let n = words.next().unwrap_or_default().to_owned();
                let say = |reply: &str| say(&format!("{n} {reply}"));
                match words.next() {
                    Some("export-state") => {
                        let state = match &**servers.routing().servers[0].state() {
                            ServerState::Serving(g) => g.instance.export_state(),
                            _ => None,
                        };
                        match state {
                            Some(bytes) => match std::fs::write(dir.join("state.out"), &bytes) {
                                Ok(()) => say(&format!("state {}", bytes.len())),
                                Err(e) => {
                                    tracing::warn!("cannot write the state for the host: {e}");
                                    say("state none");
                                }
                            },
                            None => say("state none"),
                        }
                    }
                    Some("health") => {
                        let generation = match &**servers.routing().servers[0].state() {
                            ServerState::Serving(g) => Some(g.clone()),
                            _ => None,
                        };
                        let answer = match generation {
                            Some(g) => runtime.block_on(g.health()),
                            None => Err("it is not serving".to_owned()),
                        };
                        match answer {
                            Ok(()) => say("health ok"),
                            Err(reason) => say(&format!("health {}", reason.replace('\n', " "))),
                        }
                    }
                    Some("shutdown") => {
                        let ms = words.next().and_then(|w| w.parse().ok()).unwrap_or(1000);
                        let _ = stop.send(Duration::from_millis(ms));
                        return;
                    }
                    _ => say(&format!("error unknown command {line:?}")),
                }
            }
            // The host closed the pipe: it is gone, or wants this worker gone.
            let _ = stop.send(Duration::from_millis(1000));
        });
    if let Err(e) = spawned {
        tracing::error!("worker: cannot start its command thread: {e}");
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
