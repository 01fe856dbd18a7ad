//! A server's plugin in a worker process of its own (`servers[].isolation: "process"`),
//! seen from the host: starting the process, its control pipe, the connections that
//! carry requests to it, and how it ended.
//!
//! The worker is this same binary, run as `host --worker DIR` (see
//! `control::worker` for its side). The host speaks to it over two channels:
//!
//! - **Requests**: HTTP/2 over the Unix socket `DIR/http.sock`, all on one connection
//!   (made again if it closes), so that requests that arrive together travel in one
//!   write; a WebSocket upgrade takes an HTTP/1.1 connection of its own. The host
//!   adds `x-plugin-host-client` (the client's address, `;tls` on TLS) and the headers it
//!   lends to plugins (`x-tenant`, `x-jwt-claims`); the worker trusts them, since only
//!   this user can reach the socket (the folder is 0700).
//! - **Control**: command lines on the worker's stdin, one reply line each on its
//!   stdout, numbered (`<n> <command>`, answered `<n> <reply>`: several may be in
//!   flight, and a late reply is never taken for another command's): `export-state` (the state is written
//!   to `DIR/state.out`: `state N`, or `state none`), `health` (`health ok` / `health
//!   <reason>`), `shutdown <ms>` (no reply: the worker finishes its requests within
//!   `ms`, runs the plugin's shutdown hook and exits 0). The first line the worker writes is `ready {json}`. The worker's stdin
//!   closing (the host gone) ends it too, and the kernel ends it if the host dies
//!   (`PR_SET_PDEATHSIG`).
//!
//! - **Bus events**, both ways. An event the worker's plugin publishes is one line on
//!   its stdout, `bus <topic> <payload>` (each in hex), which the host publishes on
//!   its own bus (and over Redis when the bus runs there). An event for the worker's
//!   server (it subscribed to the topics its `ready` line names) is a `POST` on the
//!   HTTP/2 connection carrying [`EVENT_HEADER`] and the event (its topic's length in
//!   four bytes, big-endian, the topic, the payload); the worker answers once its
//!   handler is done (204; 500 it panicked, 503 not delivered, 504 timed out), so a
//!   server's events stay one at a time and in order, as in process.
//!
//! - **Service calls** its plugin makes to other servers: a line `call <id> <server>
//!   <timeout ms, 0 for none> <request>` on its stdout (server and request in hex, the
//!   request as [`encode_request`] writes it); the host makes the call and writes
//!   `- answer <id> <response>` (hex, [`encode_response`]) on the worker's stdin.
//!
//! The worker's stderr is copied to the host's line by line (its log lines are already
//! formatted like the host's), which is also how an allocation failure past the memory
//! limit is recognised.

#![allow(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The body of a request sent to a worker: read already, or still arriving.
pub type Outgoing = Either<Full<Bytes>, Incoming>;

/// The header that carries the client's address to the worker.
pub const CLIENT_HEADER: &str = "x-plugin-host-client";

/// The header that marks a request to a worker as a bus event for its plugin (the
/// host removes it from what clients send).
pub const EVENT_HEADER: &str = "x-plugin-host-event";

/// The exit code of a worker that ended itself because a handler held its thread past
/// the request timeout.
pub const EXIT_HELD_TOO_LONG: i32 = 75;

/// Ends this process at once with `code`: not `exit`, since the plugin's threads may
/// hold locks its destructors need.
pub fn end_now(code: i32) -> ! {
    #[cfg(unix)]
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

/// The HTTP/2 flow-control window of each stream to a worker (the connection's is 16
/// times this): large, since both ends are this host.
pub const WINDOW: u32 = 1024 * 1024;

/// The largest header list either side of a worker's connection takes: larger than the
/// host's own limits, which apply first.
pub const MAX_HEADER_LIST: u32 = 1024 * 1024;

static JSON_LOGS: AtomicBool = AtomicBool::new(false);

/// Workers write their log lines as JSON (`--log-format json`) from now on.
pub fn set_json_logs(on: bool) {
    JSON_LOGS.store(on, Ordering::Relaxed);
}

pub fn json_logs() -> bool {
    JSON_LOGS.load(Ordering::Relaxed)
}

/// What the host needs to start a worker.
pub struct WorkerSpec {
    pub server: Arc<str>,
    /// Its generation number (a worker per generation).
    pub number: u64,
    /// The plugin library file, copied into the worker's folder.
    pub plugin_file: PathBuf,
    /// The config as written (before `${VAR}`), and the folder it is relative to.
    pub source: Arc<Value>,
    pub folder: PathBuf,
    pub max_memory_mb: Option<u64>,
    /// State handed over from the generation it replaces.
    pub state: Option<Vec<u8>>,
    /// How long it may take to be ready (its init included).
    pub init_timeout: Duration,
    pub json_logs: bool,
    /// Where its folder is made.
    pub parent_dir: PathBuf,
}

/// What a worker said when it was ready.
#[derive(Debug, Clone, Default)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub build: String,
    /// The bus topics its plugin subscribed to at init.
    pub topics: Vec<Box<str>>,
}

/// How a worker ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// For people: "killed by signal 9 (SIGKILL)", "it ran out of memory ...".
    pub reason: String,
    /// It was asked to stop (a reload, a removal, the host stopping): not a crash.
    pub asked: bool,
    pub after: Duration,
}

/// A worker process serving one generation of a server.
pub struct Worker {
    pub server: Arc<str>,
    pub number: u64,
    pub pid: u32,
    pub plugin: PluginInfo,
    pub max_memory_mb: Option<u64>,
    dir: PathBuf,
    socket: PathBuf,
    started: Instant,
    /// The HTTP/2 connection every request but an upgrade takes.
    h2: Mutex<Option<http2::SendRequest<Outgoing>>>,
    in_flight: AtomicUsize,
    /// WebSocket connections open through it (not requests in flight: they do not
    /// count against `max_in_flight`, but a retired worker is drained of them too).
    sockets: AtomicUsize,
    retired: AtomicBool,
    /// Held while its HTTP/2 connection is being made, so that requests that find none
    /// make one between them.
    connecting: tokio::sync::Mutex<()>,
    /// Set when it was asked to stop: its end is no crash.
    stopping: AtomicBool,
    out_of_memory: Arc<AtomicBool>,
    commands: Mutex<Commands>,
    waiting: Waiting,
    child: Mutex<Child>,
    exit: Mutex<Option<Exit>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("server", &self.server)
            .field("number", &self.number)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

struct Commands {
    /// Lines for its stdin, which one thread writes (commands, and the answers to its
    /// service calls): nobody else waits on the pipe.
    to_worker: std::sync::mpsc::Sender<String>,
    /// The number of the last command sent: a reply names the command it answers, so
    /// one that comes after its command's deadline is never taken for another's.
    last: u64,
}

/// Commands waiting for their replies, by number (`None` once the worker's output has
/// ended: no reply will come). Several may wait at once: a health check is not held up
/// behind a state export.
type Waiting = Arc<Mutex<Option<std::collections::HashMap<u64, std::sync::mpsc::Sender<String>>>>>;

/// Called once when a worker's process has ended, on a thread of its own.
pub type OnExit = Box<dyn FnOnce(Arc<Worker>, Exit) + Send>;

impl Worker {
    /// Starts a worker and waits until it is ready (blocking: call it on a thread that
    /// may block). `Err`: it did not start, or its plugin did not (the reason); nothing
    /// is left running.
    pub fn spawn(spec: WorkerSpec, on_exit: OnExit) -> Result<Arc<Worker>, String> {
        let prefix = format!("worker-{}-{}", spec.server, spec.number);
        let dir = super::loader::private_dir_in(&spec.parent_dir, &prefix)
            .map_err(|e| format!("cannot make a folder for its worker process: {e}"))?;
        let started = Self::start(&spec, &dir, on_exit);
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        started
    }

    fn start(spec: &WorkerSpec, dir: &Path, on_exit: OnExit) -> Result<Arc<Worker>, String> {
        let file_name = spec
            .plugin_file
            .file_name()
            .ok_or_else(|| format!("{} has no file name", spec.plugin_file.display()))?;
        std::fs::copy(&spec.plugin_file, dir.join(file_name)).map_err(|e| {
            format!(
                "cannot copy {} for its worker process: {e}",
                spec.plugin_file.display()
            )
        })?;
        let description = serde_json::json!({
            "server": &*spec.server,
            "folder": spec.folder,
            "config": &*spec.source,
            "max_memory_mb": spec.max_memory_mb,
        });
        std::fs::write(dir.join("worker.json"), description.to_string())
            .map_err(|e| format!("cannot write the worker's description: {e}"))?;
        if let Some(state) = &spec.state {
            std::fs::write(dir.join("state.in"), state)
                .map_err(|e| format!("cannot write the state handed to the worker: {e}"))?;
        }
        let exe = if cfg!(target_os = "linux") {
            PathBuf::from("/proc/self/exe")
        } else {
            std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?
        };
        let mut command = Command::new(exe);
        command
            .arg("--worker")
            .arg(dir)
            .args(["--log-format", if spec.json_logs { "json" } else { "text" }])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(target_os = "linux")]
        unsafe {
            use std::os::unix::process::CommandExt;
            // The worker ends with the host, however the host ends. (The signal comes
            // when the *thread* that forked it ends: hence `spawn_from_keeper`.)
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = spawn_from_keeper(command)
            .map_err(|e| format!("cannot start its worker process: {e}"))?;
        let pid = child.id();
        let to_worker = write_stdin(child.stdin.take());
        let answers = to_worker.clone();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let out_of_memory = Arc::new(AtomicBool::new(false));
        let stderr_done = forward_stderr(stderr, out_of_memory.clone(), &spec.server, pid);
        let (replies_tx, replies) = std::sync::mpsc::channel::<String>();
        let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
        let server = spec.server.clone();
        let waiting: Waiting = Arc::new(Mutex::new(Some(Default::default())));
        let waiters = waiting.clone();
        let reader = std::thread::Builder::new()
            .name("worker-stdout".to_owned())
            .spawn(move || {
                let mut lines = BufReader::new(stdout);
                while let Some(line) = read_line(&mut lines, &server, pid) {
                    if let Some(event) = line.strip_prefix("bus ") {
                        publish_for(event, &server, pid);
                        continue;
                    }
                    if let Some(call) = line.strip_prefix("call ") {
                        call_for(call, &server, pid, &answers);
                        continue;
                    }
                    // A numbered reply goes to its command (none: it came too late);
                    // anything else (the `ready` line) to whoever starts the worker.
                    let numbered = line
                        .split_once(' ')
                        .and_then(|(n, rest)| Some((n.parse::<u64>().ok()?, rest)));
                    match numbered {
                        Some((n, reply)) => {
                            let mut waiting = waiters.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(command) = waiting.as_mut().and_then(|w| w.remove(&n)) {
                                let _ = command.send(reply.to_owned());
                            }
                        }
                        None => {
                            let _ = replies_tx.send(line);
                        }
                    }
                }
                // No reply will come: the commands waiting hear so at once.
                *waiters.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let _ = ended_tx.send(());
            });
        if let Err(e) = reader {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("cannot start a thread for its worker process: {e}"));
        }
        // The first line says whether its plugin serves.
        let first = replies.recv_timeout(spec.init_timeout);
        let ready = match first {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                return Err(match e {
                    std::sync::mpsc::RecvTimeoutError::Timeout => format!(
                        "its worker process was not ready within {} ms (global.reload.init_timeout_ms)",
                        spec.init_timeout.as_millis()
                    ),
                    std::sync::mpsc::RecvTimeoutError::Disconnected => format!(
                        "its worker process ended before it was ready: {}",
                        status.map_or_else(|e| e.to_string(), |s| describe(s, &out_of_memory, spec.max_memory_mb))
                    ),
                });
            }
        };
        let ready: Value = ready
            .strip_prefix("ready ")
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or(Value::Null);
        if ready.get("serving") != Some(&Value::Bool(true)) {
            let reason = ready
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("its worker process did not say it was ready")
                .to_owned();
            let _ = child.kill();
            let _ = child.wait();
            return Err(reason);
        }
        let text = |key: &str| {
            ready
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let worker = Arc::new(Worker {
            server: spec.server.clone(),
            number: spec.number,
            pid,
            plugin: PluginInfo {
                name: text("plugin"),
                version: text("version"),
                build: text("build"),
                topics: ready
                    .get("topics")
                    .and_then(Value::as_array)
                    .map(|topics| {
                        topics
                            .iter()
                            .filter_map(Value::as_str)
                            .map(Into::into)
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            max_memory_mb: spec.max_memory_mb,
            socket: dir.join("http.sock"),
            dir: dir.to_owned(),
            started: Instant::now(),
            h2: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            sockets: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            connecting: tokio::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
            out_of_memory,
            commands: Mutex::new(Commands { to_worker, last: 0 }),
            waiting,
            child: Mutex::new(child),
            exit: Mutex::new(None),
        });
        // Waits for the end of its output, then for the process.
        let watched = worker.clone();
        let watching = std::thread::Builder::new()
            .name("worker-exit".to_owned())
            .spawn(move || {
                // Ended (not reaped yet: until `exit` is set below, `kill` may still
                // signal its pid).
                #[cfg(unix)]
                loop {
                    // SAFETY: `waitid` with WNOWAIT only reads the child's state.
                    let waited = unsafe {
                        let mut info: libc::siginfo_t = std::mem::zeroed();
                        libc::waitid(
                            libc::P_PID,
                            pid as libc::id_t,
                            &mut info,
                            libc::WEXITED | libc::WNOWAIT,
                        )
                    };
                    let interrupted = waited != 0
                        && std::io::Error::last_os_error().kind()
                            == std::io::ErrorKind::Interrupted;
                    if !interrupted {
                        break;
                    }
                }
                // Its last words (an allocation failure) are read before its end is
                // described; a grandchild holding its stderr open does not hold this up.
                let _ = ended.recv_timeout(Duration::from_millis(500));
                let _ = stderr_done.recv_timeout(Duration::from_millis(500));
                // Reaped under the `exit` lock, never waiting under it: `try_wait` (and
                // if a plugin in the host set SIGCHLD to be ignored, the kernel reaped
                // it: its status is then unknown).
                let (mut slot, status) = loop {
                    let slot = watched.exit.lock().unwrap_or_else(|p| p.into_inner());
                    match watched.child().try_wait() {
                        Ok(Some(status)) => break (slot, Ok(status)),
                        Ok(None) => {
                            drop(slot);
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => break (slot, Err(e)),
                    }
                };
                let reason = match status {
                    Ok(status) => describe(status, &watched.out_of_memory, watched.max_memory_mb),
                    Err(e) => format!("its status is unknown: {e}"),
                };
                let exit = Exit {
                    reason,
                    asked: watched.stopping.load(Ordering::SeqCst),
                    after: watched.started.elapsed(),
                };
                *slot = Some(exit.clone());
                drop(slot);
                // Its stdin's writer ends with the last sender: nothing more goes there.
                watched.commands().to_worker = std::sync::mpsc::channel().0;
                *watched.h2.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let _ = std::fs::remove_dir_all(&watched.dir);
                on_exit(watched, exit);
            });
        if let Err(e) = watching {
            worker.kill();
            return Err(format!("cannot start a thread for its worker process: {e}"));
        }
        Ok(worker)
    }

    fn commands(&self) -> std::sync::MutexGuard<'_, Commands> {
        self.commands.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How it ended; `None` while it runs.
    pub fn exit(&self) -> Option<Exit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Requests sent to it whose responses have not ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// No request is sent to it any more (a successor took over).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// WebSocket connections open through it.
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Acquire)
    }

    /// Counts a request in flight until the guard is dropped; `None` once it is
    /// retired (the caller loads the server's state again: its successor's). Counted
    /// before the check, so a drain that saw none in flight after the retirement sees
    /// every request that got in.
    pub fn enter(self: &Arc<Self>) -> Option<WorkerInFlight> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let entered = WorkerInFlight(self.clone());
        (!self.retired.load(Ordering::SeqCst)).then_some(entered)
    }

    /// Sends one request and waits for its response's head. `upgrade`: on a connection
    /// of its own that may be upgraded (a WebSocket).
    ///
    /// A request finds the HTTP/2 connection ready (most) is handed to it here, and the
    /// future returned only waits for the answer: it is small (a few hundred bytes),
    /// where the one that may connect is kilobytes (connecting, the handshakes), and
    /// the request path moves a request's future into a box. Anything else goes the
    /// slow way, boxed.
    pub fn send(
        self: &Arc<Self>,
        request: Request<Outgoing>,
        upgrade: bool,
    ) -> impl std::future::Future<Output = Result<Response<Incoming>, SendError>> + Send + 'static
    {
        let ready = if upgrade { None } else { self.ready_h2() };
        let Some(mut sender) = ready else {
            return futures_util::future::Either::Right(Box::pin(
                self.clone().send_slowly(request, upgrade),
            ));
        };
        let sent = sender.try_send_request(request);
        let this = self.clone();
        futures_util::future::Either::Left(async move {
            match sent.await {
                Ok(response) => Ok(response),
                // Not sent (the connection closed meanwhile): on a new one.
                Err(mut e) => match e.take_message() {
                    Some(request) => Box::pin(this.send_slowly(request, false)).await,
                    None => Err(SendError::Lost(this.lost(e.error()))),
                },
            }
        })
    }

    /// The HTTP/2 connection, if it is open and ready for a request.
    fn ready_h2(&self) -> Option<http2::SendRequest<Outgoing>> {
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|s| s.is_ready())
            .cloned()
    }

    async fn send_slowly(
        self: Arc<Self>,
        request: Request<Outgoing>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, SendError> {
        if !upgrade {
            return self.send_multiplexed(request).await;
        }
        // An upgrade: an HTTP/1.1 connection of its own, which becomes the WebSocket.
        let mut sender = self
            .connect_upgradable()
            .await
            .map_err(SendError::Unreachable)?;
        sender
            .send_request(request)
            .await
            .map_err(|e| SendError::Lost(self.lost(&e)))
    }

    /// Sends a request on the worker's HTTP/2 connection, which carries every request
    /// but upgrades: requests that arrive together leave in one write and their
    /// responses come back in one read, where a connection per request in flight
    /// costs a write and a read (and a wake-up of each process) per request.
    async fn send_multiplexed(
        self: &Arc<Self>,
        request: Request<Outgoing>,
    ) -> Result<Response<Incoming>, SendError> {
        let current = || {
            self.h2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|s| !s.is_closed())
                .cloned()
        };
        let mut sender = match current() {
            Some(sender) => sender,
            None => {
                let _turn = self.connecting.lock().await;
                match current() {
                    Some(sender) => sender,
                    None => self.connect_h2().await.map_err(SendError::Unreachable)?,
                }
            }
        };
        if sender.ready().await.is_err() {
            // Closed since: a new connection says whether the worker is still there.
            sender = self.connect_h2().await.map_err(SendError::Unreachable)?;
        }
        match sender.try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut e) => match e.take_message() {
                Some(request) => {
                    let mut sender = self.connect_h2().await.map_err(SendError::Unreachable)?;
                    sender
                        .send_request(request)
                        .await
                        .map_err(|e| SendError::Lost(self.lost(&e)))
                }
                None => Err(SendError::Lost(self.lost(e.error()))),
            },
        }
    }

    /// Hands a bus event to the worker's plugin and waits until its handler is done
    /// (`timeout`: the worker's own deadline for it, with a second more for the hop).
    pub async fn deliver(
        self: &Arc<Self>,
        topic: &Bytes,
        payload: &Bytes,
        timeout: Duration,
    ) -> Delivered {
        let Some(_in_flight) = self.enter() else {
            return Delivered::Retired;
        };
        let body = encode_event(topic, payload);
        let mut request = Request::new(Either::Left(Full::new(Bytes::from(body))));
        *request.method_mut() = hyper::Method::POST;
        *request.uri_mut() = hyper::Uri::from_static("http://bus.event/");
        request.headers_mut().insert(
            hyper::header::HeaderName::from_static(EVENT_HEADER),
            hyper::header::HeaderValue::from_static("bus"),
        );
        let sent = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            self.send_multiplexed(request),
        )
        .await;
        let response = match sent {
            Err(_) => return Delivered::TimedOut,
            Ok(Err(SendError::Unreachable(why) | SendError::Lost(why))) => {
                return Delivered::Unavailable(why)
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        match status.as_u16() {
            204 => Delivered::Done,
            500 => Delivered::Panicked,
            504 => Delivered::TimedOut,
            _ => {
                use http_body_util::BodyExt;
                let body = response.into_body().collect().await;
                let why = body.map_or_else(
                    |e| e.to_string(),
                    |b| String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                );
                Delivered::Unavailable(why)
            }
        }
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<Outgoing>, String> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("cannot reach its worker process (pid {}): {e}", self.pid))?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(WINDOW)
            .initial_connection_window_size(WINDOW * 16)
            .max_frame_size(256 * 1024)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("cannot speak to its worker process: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    /// Why a request sent to it got no response.
    fn lost(&self, e: &hyper::Error) -> String {
        // The process may have ended a moment before its exit is known.
        format!(
            "its worker process (pid {}) ended before it answered ({e})",
            self.pid
        )
    }

    async fn connect_upgradable(&self) -> Result<SendRequest<Outgoing>, String> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("cannot reach its worker process (pid {}): {e}", self.pid))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("cannot speak to its worker process: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Sends a command (`<n> <line>`) and waits for its one-line reply (`<n> <reply>`),
    /// which the stdout reader hands to it by number: other commands may wait at the
    /// same time (a health check is not held up behind a state export).
    fn command(&self, line: &str, timeout: Duration) -> Result<String, String> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err("its worker process is stopping".to_owned());
        }
        let (tx, reply) = std::sync::mpsc::channel();
        let n = {
            let mut commands = self.commands();
            commands.last += 1;
            let n = commands.last;
            match self
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                Some(waiting) => waiting.insert(n, tx),
                None => return Err("its worker process ended".to_owned()),
            };
            if commands.to_worker.send(format!("{n} {line}\n")).is_err() {
                self.forget(n);
                return Err("cannot reach its worker process: its input is closed".to_owned());
            }
            n
        };
        reply.recv_timeout(timeout).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => {
                self.forget(n);
                format!(
                    "its worker process did not answer within {} ms",
                    timeout.as_millis()
                )
            }
            std::sync::mpsc::RecvTimeoutError::Disconnected => {
                "its worker process ended".to_owned()
            }
        })
    }

    /// A command that will not wait for its reply any more.
    fn forget(&self, n: u64) {
        if let Some(waiting) = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            waiting.remove(&n);
        }
    }

    /// The plugin's state for its successor (`export_state`), asked of the worker.
    pub fn export_state(&self, timeout: Duration) -> Result<Option<Vec<u8>>, String> {
        let reply = self.command("export-state", timeout)?;
        match reply.strip_prefix("state ") {
            Some("none") => Ok(None),
            Some(length) => {
                let state = std::fs::read(self.dir.join("state.out"))
                    .map_err(|e| format!("cannot read the state its worker wrote: {e}"))?;
                // The file of this export, not of an earlier one that came late.
                if length.parse() != Ok(state.len()) {
                    return Err(format!(
                        "the state its worker wrote is {} bytes, not the {length} it said",
                        state.len()
                    ));
                }
                Ok(Some(state))
            }
            None => Err(format!("its worker process answered {reply:?}")),
        }
    }

    /// The plugin's own health hook, asked of the worker (blocking).
    pub fn health(&self, timeout: Duration) -> Result<(), String> {
        let reply = self.command("health", timeout)?;
        match reply.strip_prefix("health ") {
            Some("ok") => Ok(()),
            Some(reason) => Err(reason.to_owned()),
            None => Err(format!("its worker process answered {reply:?}")),
        }
    }

    /// Asks it to finish its requests within `grace`, run the plugin's shutdown hook and
    /// exit; ends it after `grace` + `hook` if it has not (blocking).
    pub fn stop(&self, grace: Duration, hook: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.retire();
        if self.exit().is_some() {
            return;
        }
        {
            let mut commands = self.commands.lock().unwrap_or_else(|p| p.into_inner());
            commands.last += 1;
            let line = format!("{} shutdown {}\n", commands.last, grace.as_millis());
            // Its input stays open: the answers to service calls its plugin makes while
            // it stops (its shutdown hook's too) still reach it. It closes when the
            // worker has ended (the writer's next write fails) and the worker is dropped.
            let _ = commands.to_worker.send(line);
        }
        let until = Instant::now() + grace + hook + Duration::from_millis(500);
        while self.exit().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.exit().is_none() {
            tracing::warn!(server = %self.server, pid = self.pid, "its worker process did not exit within its deadline; killing it");
            self.kill();
        }
    }

    /// Ends the process at once (SIGKILL).
    pub fn kill(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Not through `Child`: its lock is held by the thread waiting for the exit.
        // Until that thread has reaped it, the pid is still this process's.
        let exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            #[cfg(unix)]
            // SAFETY: a plain system call on a pid this process has not reaped yet
            // (the lock on `exit` is held, and it is set only after the reaping).
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
            #[cfg(not(unix))]
            let _ = self.child().kill();
        }
    }
}

/// How a bus event handed to a worker ended.
#[derive(Debug)]
pub enum Delivered {
    Done,
    /// The worker was retired before it was sent: give it to its successor.
    Retired,
    Panicked,
    TimedOut,
    /// Not delivered: the reason.
    Unavailable(String),
}

/// Publishes an event a worker's plugin published (`<topic hex> <payload hex>`) on the
/// host's bus, as the host's own `bus::publish` does.
fn publish_for(event: &str, server: &str, pid: u32) {
    let decoded = event
        .split_once(' ')
        .and_then(|(topic, payload)| Some((unhex(topic)?, unhex(payload)?)));
    let Some((topic, payload)) = decoded else {
        tracing::warn!(
            server,
            pid,
            "a worker process sent a bus event the host cannot read; dropped"
        );
        return;
    };
    let (topic, payload) = (Bytes::from(topic), Bytes::from(payload));
    super::relay::forward_event(&topic, &payload);
    super::bus::Bus::get().publish(super::bus::BusEvent { topic, payload });
}

/// Makes a service call a worker's plugin asked for (`<id> <server hex> <timeout ms>
/// <request hex>`), and writes the answer on the worker's stdin.
fn call_for(call: &str, server: &str, pid: u32, to_worker: &std::sync::mpsc::Sender<String>) {
    let mut words = call.split(' ');
    let parsed = (|| {
        let id: u64 = words.next()?.parse().ok()?;
        let target = String::from_utf8(unhex(words.next()?)?).ok()?;
        let ms: u64 = words.next()?.parse().ok()?;
        let request = decode_request(&unhex(words.next()?)?)?;
        Some((
            id,
            target,
            (ms > 0).then(|| Duration::from_millis(ms)),
            request,
        ))
    })();
    let Some((id, target, timeout, request)) = parsed else {
        tracing::warn!(
            server,
            pid,
            "a worker process asked for a service call the host cannot read; ignored"
        );
        return;
    };
    let to_worker = to_worker.clone();
    super::services::call_for_worker(target, request, timeout, move |response| {
        let _ = to_worker.send(format!(
            "- answer {id} {}\n",
            hex(&encode_response(&response))
        ));
    });
}

/// The longest line the host reads from a worker (a bus event or a service call is one
/// line, in hex: twice its size): 64 MiB.
const MAX_LINE: usize = 64 << 20;

/// The worker's next line on stdout (`None`: it has ended). A line longer than
/// [`MAX_LINE`] is skipped, with a warning naming the server.
fn read_line(lines: &mut impl BufRead, server: &str, pid: u32) -> Option<String> {
    loop {
        let mut line = Vec::new();
        let read = std::io::Read::take(&mut *lines, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .ok()?;
        if read == 0 {
            return None;
        }
        if line.len() > MAX_LINE {
            // Skip the rest of it.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let n = std::io::Read::take(&mut *lines, 1 << 20)
                    .read_until(b'\n', &mut rest)
                    .ok()?;
                if n == 0 || rest.ends_with(b"\n") {
                    break;
                }
            }
            tracing::warn!(server, pid, max_bytes = MAX_LINE, "a line from a worker process (a bus event or a service call) was too long and was dropped");
            continue;
        }
        if line.ends_with(b"\n") {
            line.pop();
        }
        return Some(String::from_utf8_lossy(&line).into_owned());
    }
}

/// Starts the one thread that writes the worker's stdin, a line at a time; it ends when
/// a write fails (the worker is gone) or every sender is dropped (closing the pipe).
fn write_stdin(stdin: Option<ChildStdin>) -> std::sync::mpsc::Sender<String> {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let spawned = std::thread::Builder::new()
        .name("worker-stdin".to_owned())
        .spawn(move || {
            let Some(mut stdin) = stdin else { return };
            for line in rx {
                if stdin
                    .write_all(line.as_bytes())
                    .and_then(|()| stdin.flush())
                    .is_err()
                {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread to write to a worker process: {e}");
    }
    tx
}

/// A bus event for a worker: its topic's length in four bytes, big-endian, the topic,
/// the payload.
fn encode_event(topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + topic.len() + payload.len());
    put(&mut body, topic);
    body.extend_from_slice(payload);
    body
}

/// The topic and payload of [`encode_event`]'s bytes (slices of them, not copies).
pub fn decode_event(body: &Bytes) -> Option<(Bytes, Bytes)> {
    let length = u32::from_be_bytes(body.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize
        .checked_add(length)
        .filter(|&end| end <= body.len())?;
    Some((body.slice(4..end), body.slice(end..)))
}

/// Length-prefixed fields (four bytes, big-endian, then the bytes).
fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

fn fields(mut bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut fields = Vec::new();
    while !bytes.is_empty() {
        let length = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        fields.push(bytes.get(4..4 + length)?);
        bytes = &bytes[4 + length..];
    }
    Some(fields)
}

/// A service call's request between a worker and its host: its method, target and
/// body, then its headers' names and values, each a field.
pub fn encode_request(request: &Request<Bytes>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + request.body().len());
    put(&mut out, request.method().as_str().as_bytes());
    put(&mut out, request.uri().to_string().as_bytes());
    put(&mut out, request.body());
    for (name, value) in request.headers() {
        put(&mut out, name.as_str().as_bytes());
        put(&mut out, value.as_bytes());
    }
    out
}

fn decode_request(bytes: &[u8]) -> Option<Request<Bytes>> {
    let fields = fields(bytes)?;
    let (head, headers) = fields.split_at_checked(3)?;
    let mut builder = Request::builder()
        .method(head[0])
        .uri(std::str::from_utf8(head[1]).ok()?);
    for pair in headers.chunks_exact(2) {
        builder = builder.header(pair[0], pair[1]);
    }
    builder.body(Bytes::copy_from_slice(head[2])).ok()
}

/// A service call's response between a host and its worker: its status (as text) and
/// body, then its headers' names and values.
pub fn encode_response(response: &super::services::ServiceResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + response.body.len());
    put(&mut out, response.status.to_string().as_bytes());
    put(&mut out, &response.body);
    for (name, value) in &response.headers {
        put(&mut out, name.as_str().as_bytes());
        put(&mut out, value.as_bytes());
    }
    out
}

/// The response in a worker's `answer` line (hex).
pub fn decode_response(hex: &str) -> Option<super::services::ServiceResponse> {
    let bytes = unhex(hex)?;
    let fields = fields(&bytes)?;
    let (head, pairs) = fields.split_at_checked(2)?;
    let mut headers = hyper::HeaderMap::new();
    for pair in pairs.chunks_exact(2) {
        headers.append(
            hyper::header::HeaderName::from_bytes(pair[0]).ok()?,
            hyper::header::HeaderValue::from_bytes(pair[1]).ok()?,
        );
    }
    Some(super::services::ServiceResponse {
        status: std::str::from_utf8(head[0]).ok()?.parse().ok()?,
        headers,
        body: Bytes::copy_from_slice(head[1]),
    })
}

/// `bytes` as lowercase hex (a bus event on a worker's stdout).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Why a request sent to a worker got no response.
#[derive(Debug)]
pub enum SendError {
    /// Nothing was sent: the worker could not be reached (it has ended).
    Unreachable(String),
    /// It was sent, and the worker ended (or closed the connection) before it answered.
    Lost(String),
}

/// Starts `command` from one thread that lives as long as the process: Linux sends a
/// child's `PR_SET_PDEATHSIG` when the thread that forked it ends, and the threads that
/// start workers (the runtime's blocking pool) end when idle, which would kill their
/// workers.
fn spawn_from_keeper(command: Command) -> std::io::Result<Child> {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (jobs, receiver) = std::sync::mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name("worker-spawner".to_owned())
            .spawn(move || {
                for (mut command, answer) in receiver {
                    let _ = answer.send(command.spawn());
                }
            });
        if let Err(e) = started {
            tracing::error!("cannot start the thread that starts worker processes: {e}");
        }
        Mutex::new(jobs)
    });
    let (answer, answered) = std::sync::mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, answer))
        .map_err(|_| std::io::Error::other("the thread that starts worker processes is gone"))?;
    answered
        .recv()
        .map_err(|_| std::io::Error::other("the thread that starts worker processes is gone"))?
}

/// A request in flight on a worker: counted until dropped (with the response's body).
pub struct WorkerInFlight(Arc<Worker>);

impl WorkerInFlight {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.0
    }

    /// The request became a WebSocket connection: it counts as one (until the guard
    /// returned is dropped), no longer as a request in flight.
    pub fn into_socket(self) -> WorkerSocket {
        self.0.sockets.fetch_add(1, Ordering::SeqCst);
        WorkerSocket(self.0.clone())
    }
}

/// A WebSocket connection open through a worker: counted until dropped.
pub struct WorkerSocket(Arc<Worker>);

impl Drop for WorkerSocket {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for WorkerInFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a process ended, for people.
fn describe(
    status: std::process::ExitStatus,
    out_of_memory: &AtomicBool,
    max_memory_mb: Option<u64>,
) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if out_of_memory.load(Ordering::SeqCst) {
            return match max_memory_mb {
                Some(mb) => format!(
                    "it ran out of memory (worker.max_memory_mb is {mb}): an allocation failed"
                ),
                None => "it ran out of memory: an allocation failed".to_owned(),
            };
        }
        if let Some(signal) = status.signal() {
            let name = match signal {
                libc::SIGABRT => " (SIGABRT: aborted, or its stack overflowed)",
                libc::SIGSEGV => " (SIGSEGV: a crash)",
                libc::SIGBUS => " (SIGBUS: a crash)",
                libc::SIGILL => " (SIGILL: a crash)",
                libc::SIGFPE => " (SIGFPE: a crash)",
                libc::SIGKILL => " (SIGKILL: killed, perhaps by the kernel for lack of memory)",
                libc::SIGTERM => " (SIGTERM)",
                _ => "",
            };
            return format!("killed by signal {signal}{name}");
        }
    }
    match status.code() {
        Some(0) => "it exited".to_owned(),
        Some(EXIT_HELD_TOO_LONG) => {
            "a handler held its thread past the request timeout (global.limits.request_timeout_ms), so the worker ended itself".to_owned()
        }
        Some(code) => format!("it exited with code {code}"),
        None => "it ended".to_owned(),
    }
}

/// A worker's log line (without its newline) with the worker's pid added: a field
/// `worker_pid` at the end of a text line, the first key of a JSON one. Anything else
/// (what a plugin wrote to stderr itself) is left as it is.
fn tag_with_pid(line: &[u8], pid: u32) -> std::borrow::Cow<'_, [u8]> {
    // Text lines start with their time: `2026-12-03T19:43:39.599420Z  INFO ...`.
    let text = line.len() > 28 && line[..4].iter().all(u8::is_ascii_digit) && line[4] == b'-';
    if text && line[..32.min(line.len())].contains(&b'Z') {
        let mut tagged = line.to_vec();
        tagged.extend_from_slice(format!(" worker_pid={pid}").as_bytes());
        return tagged.into();
    }
    if line.starts_with(b"{\"") && line.ends_with(b"}") {
        let mut tagged = format!("{{\"worker_pid\":{pid},").into_bytes();
        tagged.extend_from_slice(&line[1..]);
        return tagged.into();
    }
    line.into()
}

/// Copies the worker's stderr to the host's, line by line, noting an allocation failure.
fn forward_stderr(
    stderr: std::process::ChildStderr,
    out_of_memory: Arc<AtomicBool>,
    server: &str,
    pid: u32,
) -> std::sync::mpsc::Receiver<()> {
    let (server, pid) = (server.to_owned(), pid);
    let (done, finished) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("worker-stderr".to_owned())
        .spawn(move || {
            let mut lines = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match lines.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                // Rust's message when an allocation fails (then it aborts).
                if line.windows(21).any(|w| w == b"memory allocation of ") {
                    out_of_memory.store(true, Ordering::SeqCst);
                }
                if line.ends_with(b"\n") {
                    line.pop();
                }
                let line = tag_with_pid(&line, pid);
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(&line);
                let _ = err.write_all(b"\n");
            }
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!(%server, pid, "cannot copy its worker's log lines: {e}");
    }
    finished
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_get_the_workers_pid_and_other_output_is_left_alone() {
        let text = b"2026-12-03T19:43:39.599420Z  WARN host::boundary: it panicked server=w";
        assert_eq!(
            &*tag_with_pid(text, 42),
            &b"2026-12-03T19:43:39.599420Z  WARN host::boundary: it panicked server=w worker_pid=42"[..]
        );
        let json = br#"{"timestamp":"2026-12-03T19:43:39Z","level":"WARN"}"#;
        let tagged = tag_with_pid(json, 42);
        let value: Value = serde_json::from_slice(&tagged).expect("still JSON");
        assert_eq!(value["worker_pid"], 42);
        assert_eq!(value["level"], "WARN");
        for other in [
            &b"hello from a plugin"[..],
            b"",
            b"{not json",
            b"2026 was a year",
        ] {
            assert_eq!(&*tag_with_pid(other, 42), other);
        }
    }

    #[test]
    fn lines_longer_than_the_limit_are_skipped() {
        let mut input = b"a\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\nb\nlast");
        let mut lines = std::io::Cursor::new(input);
        assert_eq!(read_line(&mut lines, "s", 1).as_deref(), Some("a"));
        assert_eq!(read_line(&mut lines, "s", 1).as_deref(), Some("b"));
        assert_eq!(read_line(&mut lines, "s", 1).as_deref(), Some("last"));
        assert_eq!(read_line(&mut lines, "s", 1), None);
    }

    #[test]
    fn service_calls_survive_their_encoding() {
        let request = Request::builder()
            .method("POST")
            .uri("/notes?x=1")
            .header("content-type", "application/json")
            .header("x-two", "a")
            .header("x-two", "b")
            .body(Bytes::from_static(b"{\"text\":\"hi\"}"))
            .unwrap();
        let back = decode_request(&encode_request(&request)).expect("decoded");
        assert_eq!(back.method(), "POST");
        assert_eq!(back.uri(), "/notes?x=1");
        assert_eq!(back.headers().get_all("x-two").iter().count(), 2);
        assert_eq!(back.body(), request.body());
        let mut headers = hyper::HeaderMap::new();
        headers.insert("content-type", "text/plain".parse().unwrap());
        let response = super::super::services::ServiceResponse {
            status: 201,
            headers,
            body: Bytes::from_static(b"made"),
        };
        let back = decode_response(&hex(&encode_response(&response))).expect("decoded");
        assert_eq!((back.status, &back.body[..]), (201, &b"made"[..]));
        assert_eq!(back.headers["content-type"], "text/plain");
        let event = Bytes::from(encode_event(b"orders.created", b"{}"));
        assert_eq!(
            decode_event(&event),
            Some((
                Bytes::from_static(b"orders.created"),
                Bytes::from_static(b"{}")
            ))
        );
        assert_eq!(decode_event(&Bytes::from_static(&[0, 0, 0, 9, b'x'])), None);
        // Damaged input is refused, never a panic.
        assert!(decode_response("zz").is_none());
        assert!(decode_response("0000ff").is_none());
        assert!(decode_request(&[0, 0, 0, 9, 1]).is_none());
    }
}
