//! The set of microservers: which library and config each server runs, and the routing
//! snapshot requests read. Also the control plane that keeps them in step with the
//! plugin folder and the config file.
//!
//! Invariants:
//! - Routing is never mutated in place. A [`Routing`] snapshot is built whole and
//!   swapped in atomically; a server's current generation is swapped the same way, so
//!   every domain of a server changes generation at the same instant.
//! - Only one caller changes anything at a time (`Microservers::control` is a mutex held
//!   for a whole start, plugin sync or config change); requests never take it.
//! - A build that fails anything never replaces a serving generation.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::boundary::bulkhead::{self, Bulkhead};
use crate::boundary::bus::{Bus, BusEvent, Inbox};
use crate::boundary::loader::{self, LoadError, LoadFailure, PluginLibrary};
use crate::boundary::plugin::{self, Instance};
use crate::boundary::services::mark_host_thread;
use crate::boundary::sockets::Hub;
use crate::boundary::worker::Worker;
use crate::control::config::{Config, Isolation, Limits, ResponseRules, StaticSite};
use crate::control::deliver;
use crate::control::worker;
use crate::operations::recording::{self, ServerMeter};
use crate::request::files::Site;
use crate::request::headers::ServerHeaders;
use crate::request::jwt::JwtGate;
use crate::request::rate_limits::Admission;
use crate::routing::domain::{DomainPattern, DomainTable};
use crate::routing::routes::RouteTable;

/// How long streamed responses get to end once a generation's drain deadline has
/// passed, before its shutdown hook runs anyway.
const CUT_GRACE: Duration = Duration::from_millis(500);

mod steer;
mod workers;
pub use steer::{Cause, Refusal, ReloadRecord, Steered};
use workers::{Crashes, WorkerExit};

/// A generation as it serves: with its route table.
pub type Generation = plugin::Generation<RouteTable>;

/// A server from the config (or a library served without an entry).
#[derive(Debug)]
pub struct Server {
    pub name: Arc<str>,
    /// True for a library served at `<name>.localhost` without a config entry.
    pub implicit: bool,
    state: ArcSwap<ServerState>,
    /// Its static files (`static` in its config entry), tried when no plugin route
    /// answers. Swapped whole when they change, like `state`.
    files: ArcSwapOption<Site>,
    /// What it adds to its responses (`headers`, `cors`, `compression`). Swapped whole
    /// when they change, like `files`.
    headers: ArcSwap<ServerHeaders>,
    generations: AtomicU64,
    /// Its WebSocket connections: one set for all its generations.
    pub sockets: Arc<Hub>,
    /// Its bus events: one queue for all its generations.
    pub inbox: Arc<Inbox>,
    /// The receiving end of `inbox`, until the task that delivers its events starts
    /// (when a generation first subscribes to a topic).
    inbox_rx: Mutex<Option<tokio::sync::mpsc::Receiver<BusEvent>>>,
    /// How many of its plugin polls may run at once (`max_threads`): one bound for all
    /// its generations.
    pub bulkhead: Arc<Bulkhead>,
    /// Its counters for the metrics: the same for every server of this name, ever.
    pub meter: &'static ServerMeter,
    /// Drained through the admin API: waiting on purpose, so not counted against ready.
    drained: std::sync::atomic::AtomicBool,
    /// Its worker processes' crashes, and the restart one of them waits for.
    crashes: Mutex<Crashes>,
}

/// What a server is doing right now.
#[derive(Debug)]
pub enum ServerState {
    Serving(Arc<Generation>),
    /// Its plugin runs in a worker process (`isolation: "process"`), which gets its
    /// requests.
    Worker(Arc<Worker>),
    /// Not serving; its domains answer 503 with this reason (but for the files its
    /// static folder has, if it has one).
    Waiting(String),
    /// It has no plugin: its static files answer every request.
    Static,
}

impl Server {
    fn new(name: &str, implicit: bool, inbox_capacity: usize) -> Arc<Self> {
        let name: Arc<str> = name.into();
        let (inbox, inbox_rx) = Inbox::new(name.clone(), inbox_capacity);
        Arc::new(Server {
            bulkhead: Bulkhead::new(bulkhead::default_limit(), &name),
            sockets: Hub::new(name.clone()),
            inbox,
            inbox_rx: Mutex::new(Some(inbox_rx)),
            meter: recording::meter(&name),
            name,
            implicit,
            state: ArcSwap::from_pointee(ServerState::Waiting("starting".to_owned())),
            files: ArcSwapOption::empty(),
            headers: ArcSwap::from_pointee(ServerHeaders::new(&ResponseRules::default())),
            generations: AtomicU64::new(0),
            drained: Default::default(),
            crashes: Mutex::default(),
        })
    }

    pub fn state(&self) -> arc_swap::Guard<Arc<ServerState>> {
        self.state.load()
    }

    /// Its static files, if it has any.
    pub fn files(&self) -> Option<Arc<Site>> {
        self.files.load_full()
    }

    /// What it adds to its responses.
    #[inline]
    pub fn headers(&self) -> arc_swap::Guard<Arc<ServerHeaders>> {
        self.headers.load()
    }

    /// Adds what `rules` say to its responses from now on (a change applies at once).
    fn set_headers(&self, rules: &ResponseRules) {
        if self.headers.load().rules != *rules {
            self.headers.store(Arc::new(ServerHeaders::new(rules)));
        }
    }

    fn serving(&self) -> Option<Arc<Generation>> {
        match &**self.state.load() {
            ServerState::Serving(g) => Some(g.clone()),
            ServerState::Waiting(_) | ServerState::Static | ServerState::Worker(_) => None,
        }
    }

    /// Its worker process, if its plugin runs in one now.
    pub fn worker(&self) -> Option<Arc<Worker>> {
        match &**self.state.load() {
            ServerState::Worker(w) => Some(w.clone()),
            _ => None,
        }
    }

    /// The number of the generation it serves, in process or in a worker.
    pub fn generation_number(&self) -> Option<u64> {
        match &**self.state.load() {
            ServerState::Serving(g) => Some(g.number),
            ServerState::Worker(w) => Some(w.number),
            ServerState::Waiting(_) | ServerState::Static => None,
        }
    }

    fn waiting_reason(&self) -> Option<String> {
        match &**self.state.load() {
            ServerState::Serving(_) | ServerState::Static | ServerState::Worker(_) => None,
            ServerState::Waiting(r) => Some(r.clone()),
        }
    }

    /// Serves `files` from now on (a change of `static` applies at once: no new
    /// generation is needed).
    fn set_files(&self, files: Option<&StaticSite>) {
        let current = self.files.load();
        if current.as_ref().map(|site| &site.config) == files {
            return;
        }
        match files {
            Some(files) => {
                tracing::info!(server = %self.name, root = %files.root.display(), "serving static files")
            }
            None if current.is_some() => {
                tracing::info!(server = %self.name, "no longer serving static files")
            }
            None => {}
        }
        self.files
            .store(files.map(|f| Site::new(&self.name, f, self.meter)));
    }

    fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Subscribes the server to the topics its new generation declared; the first time
    /// there are any, starts the task that delivers its events.
    fn subscribe(self: &Arc<Self>, topics: &[Box<str>], timeout: Duration) {
        Bus::get().subscribe(&self.inbox, topics);
        if topics.is_empty() {
            return;
        }
        let rx = self
            .inbox_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(deliver::bus_events(Arc::downgrade(self), rx, timeout));
                }
                Err(_) => {
                    tracing::error!(server = %self.name, "cannot deliver bus events: no runtime")
                }
            }
        }
    }
}

/// The snapshot every request reads: domains to servers, and the request limits.
#[derive(Debug)]
pub struct Routing {
    pub domains: DomainTable<Arc<Server>>,
    pub servers: Vec<Arc<Server>>,
    pub limits: Limits,
    /// Servers whose requests on plain listeners are redirected to HTTPS.
    pub redirect_https: Vec<Arc<str>>,
    /// Tenants and rate limits; `None` when the config has neither, so that a request
    /// pays one check for them.
    pub admission: Option<Box<Admission>>,
    /// Token rules (`servers[].jwt`); `None` when no server has any, so that a request
    /// pays one check for them.
    pub jwt: Option<Box<JwtGate>>,
    /// `global.health_path`. Requests look at it only while
    /// `request::http::health_path_on` says there is one.
    pub health_path: Option<Box<str>>,
}

/// What a server should run: from its config entry, or made up for a drop-in library.
#[derive(Debug, Clone, PartialEq)]
struct ServerSpec {
    name: String,
    implicit: bool,
    /// `None`: static files only.
    plugin: Option<String>,
    plugin_config: String,
    domains: Vec<DomainPattern>,
    files: Option<StaticSite>,
    response: ResponseRules,
    /// `None`: the default bound.
    max_threads: Option<usize>,
    isolation: Isolation,
}

struct ServerEntry {
    server: Arc<Server>,
    spec: ServerSpec,
    /// The library, config, `plugin` name and isolation of the last generation started
    /// (or tried, or refused), so that a failed init is retried only when one of them
    /// changes.
    tried: Option<Attempt>,
    /// The same, of the generation (or worker) serving now: a build put back after a
    /// refused one is that build, not a reload.
    serving: Option<Attempt>,
}

/// A library, config, `plugin` name and isolation a server was started with.
type Attempt = (Arc<PluginLibrary>, String, String, Isolation);

/// What the plugin folder holds, as last seen.
struct FileState {
    /// `None` after a failure that says nothing about the file (an I/O error while
    /// reading or copying it), so the next look tries again.
    fingerprint: Option<Fingerprint>,
    outcome: Result<Arc<PluginLibrary>, LoadError>,
}

/// Cheap identity of a file's current contents, to skip files that did not change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl Fingerprint {
    fn of(path: &Path) -> Option<Fingerprint> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Fingerprint {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        })
    }
}

struct Control {
    /// Set by `shutdown_all`: no change is applied after it.
    stopping: bool,
    /// The config in force: the file's, with `enabled` as the admin API last set it.
    config: Config,
    /// Servers enabled or disabled through the admin API: this wins over the file's
    /// `enabled` until the host stops (or the file is rewritten with `persist`).
    enabled: BTreeMap<String, bool>,
    /// Servers drained through the admin API, until they are enabled again.
    drained: HashSet<String>,
    /// The last generation number of each server removed (disabled, say), so that its
    /// numbers go on from there if it comes back.
    numbered: HashMap<String, u64>,
    plugin_dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    servers: Vec<ServerEntry>,
}

/// When a change was first noticed (a file event) and when the host started acting on
/// it; the reload log reports both durations.
#[derive(Debug, Clone, Copy)]
struct Timing {
    since: Instant,
    started: Instant,
    /// What asked for the change (for the reload history).
    cause: Cause,
}

impl Timing {
    fn new(since: Instant, cause: Cause) -> Self {
        Timing {
            since,
            started: Instant::now(),
            cause,
        }
    }
}

/// How long a generation may take to drain, and to start.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    drain: Duration,
    init: Duration,
    /// How long an event's handler may take (the request timeout).
    event: Duration,
}

/// A long-lived thread for plugin calls that must not block the control loop forever
/// (init, export_state). One thread, not one per call: glibc gives every new thread a
/// malloc arena of its own, and what a plugin allocates in init lives as long as its
/// instance, so a thread per call spreads long-lived allocations over many arenas
/// (measured: +580 KiB of resident memory per reload). A call that overruns its deadline
/// keeps its thread; the next call gets a fresh one.
#[derive(Default)]
struct PluginThread {
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

type Job = Box<dyn FnOnce() + Send>;

/// Where a plugin call's result goes: to the caller if it is still waiting, else to
/// the call's `late` handler. Decided under one lock, so a result is never lost between
/// the two (an init that finishes right at the deadline still gets its shutdown hook).
enum Handoff<T> {
    Waiting,
    Ready(T),
    Abandoned,
}

impl PluginThread {
    fn call<T: Send + 'static>(
        &self,
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
        late: impl FnOnce(T) + Send + 'static,
    ) -> Result<T, String> {
        let handoff = Arc::new((Mutex::new(Handoff::Waiting), std::sync::Condvar::new()));
        let job: Job = {
            let handoff = handoff.clone();
            Box::new(move || {
                let value = f();
                let mut slot = handoff.0.lock().unwrap_or_else(|p| p.into_inner());
                if matches!(*slot, Handoff::Abandoned) {
                    drop(slot);
                    late(value);
                } else {
                    *slot = Handoff::Ready(value);
                    handoff.1.notify_all();
                }
            })
        };
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let sender = match jobs.as_ref() {
            Some(sender) => sender.clone(),
            None => {
                let (sender, receiver) = std::sync::mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name("plugin-calls".to_owned())
                    .spawn(move || {
                        mark_host_thread();
                        for job in receiver {
                            job();
                        }
                    })
                    .map_err(|e| format!("cannot start a thread for plugin calls: {e}"))?;
                *jobs = Some(sender.clone());
                sender
            }
        };
        sender
            .send(job)
            .map_err(|_| "the plugin-calls thread is gone".to_owned())?;
        let (slot, _) = handoff
            .1
            .wait_timeout_while(
                handoff.0.lock().unwrap_or_else(|p| p.into_inner()),
                limit,
                |slot| matches!(slot, Handoff::Waiting),
            )
            .unwrap_or_else(|p| p.into_inner());
        let mut slot = slot;
        match std::mem::replace(&mut *slot, Handoff::Abandoned) {
            Handoff::Ready(value) => Ok(value),
            _ => {
                // Leave the stuck thread behind; it ends once its call returns, and its
                // result goes to `late`.
                *jobs = None;
                Err(format!(
                    "init did not finish within {} ms (the time counts the export_state of the generation it replaces, if any)",
                    limit.as_millis()
                ))
            }
        }
    }
}

/// Problems found while starting or changing; `--check` turns them into exit code 2.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    /// Some file was incomplete (still being written?); sync again soon.
    pub retry: bool,
}

/// All microservers of this host and the libraries they run.
pub struct Microservers {
    routing: ArcSwap<Routing>,
    control: Mutex<Control>,
    copies_dir: PathBuf,
    /// Replaced generations still draining, so that shutdown can reach them too.
    retiring: Arc<Mutex<Vec<Arc<Generation>>>>,
    plugin_thread: PluginThread,
    /// Set by `shutdown_all` before it waits for the control lock: a change in progress
    /// starts no further generation.
    stopping: std::sync::atomic::AtomicBool,
    /// The last reloads, newest last (at most `steer::HISTORY`).
    reloads: Mutex<VecDeque<ReloadRecord>>,
    /// Replaced worker processes still draining or stopping.
    retiring_workers: Arc<Mutex<Vec<Arc<Worker>>>>,
    /// Worker processes that ended, for `supervise` (which restarts crashed ones).
    exits: tokio::sync::mpsc::UnboundedSender<WorkerExit>,
    exits_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<WorkerExit>>>,
    /// State handed to the first generation (a worker process's, from the generation it
    /// replaces).
    handed: Mutex<Option<Vec<u8>>>,
    /// `global.shutdown_timeout_ms`, for a retired worker's shutdown hook.
    hook_ms: AtomicU64,
}

impl std::fmt::Debug for Microservers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Microservers").finish_non_exhaustive()
    }
}

/// The name a library file is known by: `hello` for `hello.so` and `libhello.so`.
pub fn file_stem(file: &Path) -> Option<String> {
    let stem = file.file_stem()?.to_str()?;
    Some(
        stem.strip_prefix("lib")
            .filter(|s| !s.is_empty())
            .unwrap_or(stem)
            .to_owned(),
    )
}

/// Compares plugin names the way cargo does: `-` and `_` are the same.
fn same_name(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            let norm = |c: u8| {
                if c == b'-' {
                    b'_'
                } else {
                    c.to_ascii_lowercase()
                }
            };
            norm(x) == norm(y)
        })
}

/// Whether `path` is a library file by its name.
pub fn is_library(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some(std::env::consts::DLL_EXTENSION)
}

/// Library files in `dir`, sorted by name. Hidden files (such as the temporary files
/// `cargo xtask build-plugins` renames into place) are skipped.
pub fn scan_plugin_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)?.filter_map(Result::ok) {
        let p = entry.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden || !is_library(&p) {
            continue;
        }
        // The entry's own type, as listed (a path looked up again could be gone if the
        // folder was renamed meanwhile); a symlink is followed.
        let is_file = match entry.file_type() {
            Ok(t) if t.is_symlink() => p.is_file(),
            Ok(t) => t.is_file(),
            Err(_) => false,
        };
        if is_file {
            files.push(p);
        }
    }
    // A folder renamed or removed while it was being listed is not a folder without
    // libraries: the caller keeps what it has and looks again.
    std::fs::metadata(dir)?;
    files.sort();
    Ok(files)
}

/// What a server's `plugin` resolves to in the plugin folder.
enum Resolution {
    Library(Arc<PluginLibrary>),
    Refused(LoadError),
    Missing(String),
}

impl Microservers {
    /// Loads every library in the plugin folder and starts every enabled server.
    /// A server that cannot start is left waiting; the report lists why.
    pub fn start(config: &Config, plugin_dir: PathBuf) -> (Self, Report) {
        Self::start_handed(config, plugin_dir, None)
    }

    /// [`Microservers::start`], handing `state` to the first generation that starts
    /// (a worker process's plugin, from the one it replaces).
    pub fn start_handed(
        config: &Config,
        plugin_dir: PathBuf,
        state: Option<Vec<u8>>,
    ) -> (Self, Report) {
        let mut report = Report::default();
        let (exits, exits_rx) = tokio::sync::mpsc::unbounded_channel();
        let copies_dir = loader::private_copies_dir().unwrap_or_else(|e| {
            let message = format!("cannot create a private folder for plugin copies: {e}");
            tracing::error!("{message}");
            report.problems.push(message);
            PathBuf::from("/nonexistent")
        });
        let this = Microservers {
            routing: ArcSwap::from_pointee(Routing {
                domains: DomainTable::default(),
                servers: Vec::new(),
                limits: config.global.limits.clone(),
                redirect_https: Vec::new(),
                admission: None,
                jwt: None,
                health_path: None,
            }),
            control: Mutex::new(Control {
                stopping: false,
                config: config.clone(),
                enabled: BTreeMap::new(),
                drained: HashSet::new(),
                numbered: HashMap::new(),
                plugin_dir,
                files: BTreeMap::new(),
                servers: Vec::new(),
            }),
            copies_dir,
            retiring: Arc::default(),
            plugin_thread: PluginThread::default(),
            stopping: Default::default(),
            reloads: Mutex::default(),
            retiring_workers: Arc::default(),
            exits,
            exits_rx: Mutex::new(Some(exits_rx)),
            handed: Mutex::new(state),
            hook_ms: AtomicU64::new(config.global.shutdown_timeout.as_millis() as u64),
        };
        {
            let mut control = this.control();
            this.sync_files(&mut control, &mut report);
            this.sync_servers(
                &mut control,
                Timing::new(Instant::now(), Cause::Start),
                &mut report,
            );
            this.publish(&control);
        }
        (this, report)
    }

    /// The current routing snapshot.
    pub fn routing(&self) -> arc_swap::Guard<Arc<Routing>> {
        self.routing.load()
    }

    /// The current routing snapshot, to keep for a while.
    pub fn routing_full(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// The configuration in force (the last one applied).
    pub fn config(&self) -> Config {
        self.control().config.clone()
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        // A panic while holding the lock would be a host bug; the data is still usable.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings servers in line with the plugin folder: loads new and changed libraries and
    /// moves every server using one to a new generation. `since` is when the change was
    /// first noticed (for the reload log line).
    pub fn sync_plugins(&self, since: Instant) -> Report {
        let timing = Timing::new(since, Cause::PluginFolder);
        let mut report = Report::default();
        let mut control = self.control();
        if control.stopping {
            return report;
        }
        self.sync_files(&mut control, &mut report);
        self.sync_servers(&mut control, timing, &mut report);
        self.publish(&control);
        report
    }

    /// Applies a new, already validated config: servers and domains added, removed or
    /// moved, servers enabled or disabled, changed plugin configs (a new generation),
    /// new limits. Listen addresses are the caller's business.
    ///
    /// `keep_listen`: the listeners come from the command line (`--listen`), so the
    /// file's `global.listen` is not part of the running config and is not a change.
    pub fn apply_config(
        &self,
        mut config: Config,
        since: Instant,
        keep_listen: bool,
    ) -> Option<Report> {
        let timing = Timing::new(since, Cause::ConfigFile);
        let mut report = Report::default();
        let mut control = self.control();
        if keep_listen {
            config.global.listen = control.config.global.listen.clone();
        }
        // The admin listener is set up at start (from the file or `--admin`) and stays.
        config.global.admin = control.config.global.admin.clone();
        // So does what the admin API enabled or disabled.
        for server in &mut config.servers {
            if let Some(&enabled) = control.enabled.get(&server.name) {
                server.enabled = enabled;
            }
        }
        if control.stopping || control.config == config {
            return None;
        }
        if config.global.plugin_dir != control.config.global.plugin_dir {
            tracing::warn!(
                "global.plugin_dir changed; restart the host to load plugins from the new folder"
            );
        }
        if config.global.bus.backend != control.config.global.bus.backend {
            tracing::warn!(
                "global.bus.backend, url or channel_prefix changed; restart the host to use the new bus backend"
            );
        }
        control.config = config;
        // A config may name a library that just arrived: look at the folder first.
        self.sync_files(&mut control, &mut report);
        self.sync_servers(&mut control, timing, &mut report);
        self.publish(&control);
        Some(report)
    }

    /// Stops every server (the host is stopping), in this order: each server's
    /// domains answer 503 and its generation is retired, so no request enters it any
    /// more; requests still inside a plugin get until `requests_until`; then every
    /// shutdown hook that has not run yet is called, all at once, and each gets
    /// `hook_deadline` (generations replaced earlier whose hook is still running are
    /// waited for the same way). A hook that misses its deadline is logged by name and
    /// left running. Waits for a change in progress to finish, and applies none after it.
    pub fn shutdown_all(&self, requests_until: Instant, hook_deadline: Duration) {
        // Seen by a change in progress before it starts its next generation, so that the
        // lock below waits for one init at most.
        self.stopping.store(true, Ordering::SeqCst);
        let mut control = self.control();
        control.stopping = true;
        let mut generations: Vec<Arc<Generation>> = Vec::new();
        let mut worker_list = Vec::new();
        let mut hubs = Vec::new();
        for entry in &control.servers {
            entry
                .server
                .sockets
                .close_all("the host is shutting down", true);
            hubs.push(entry.server.sockets.clone());
            let stopping = ServerState::Waiting("the host is shutting down".to_owned());
            match &*entry.server.state.swap(Arc::new(stopping)) {
                ServerState::Serving(g) => {
                    g.retire();
                    generations.push(g.clone());
                }
                ServerState::Worker(w) => {
                    w.retire();
                    worker_list.push(w.clone());
                }
                ServerState::Waiting(_) | ServerState::Static => {}
            }
        }
        drop(control);
        // Worker processes stop on their own, in parallel with what follows: each
        // finishes its requests, runs its hooks and exits.
        let stopping_workers = {
            let retiring = self.retiring_workers.clone();
            let hook = hook_deadline;
            std::thread::Builder::new()
                .name("workers-stop".to_owned())
                .spawn(move || {
                    let mut all = worker_list;
                    all.extend(
                        retiring
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .iter()
                            .cloned(),
                    );
                    workers::stop_all(all, requests_until, hook);
                })
                .ok()
        };
        // Replaced generations still draining or running their hooks.
        generations.extend(
            self.retiring
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        // WebSocket connections send their close frames and wait for the client's.
        let busy = |generations: &[Arc<Generation>]| {
            generations.iter().any(|g| g.in_flight() > 0) || hubs.iter().any(|h| !h.is_empty())
        };
        while busy(&generations) && Instant::now() < requests_until {
            std::thread::sleep(Duration::from_millis(5));
        }
        for hub in hubs.iter().filter(|h| !h.is_empty()) {
            tracing::warn!(server = %hub.server, connections = hub.len(), "WebSocket connections were still closing at the shutdown deadline");
        }
        if generations.iter().any(|g| g.in_flight() > 0) {
            // Streamed responses end now, and get a moment to let go.
            for g in &generations {
                g.cut_off();
            }
            let until = Instant::now() + CUT_GRACE;
            while generations.iter().any(|g| g.in_flight() > 0) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for g in generations.iter().filter(|g| g.in_flight() > 0) {
            tracing::warn!(
                server = %g.server,
                generation = g.number,
                in_flight = g.in_flight(),
                "requests were still running in this generation at the shutdown deadline; calling its shutdown hook anyway"
            );
        }
        let hooks_until = Instant::now() + hook_deadline;
        for g in &generations {
            g.instance.stop_within(hook_deadline);
        }
        for g in &generations {
            let g = g.clone();
            // A thread each, so that one slow hook does not eat the others' time; a
            // hook that overruns keeps its thread (and its generation) to itself.
            let spawned = std::thread::Builder::new()
                .name("plugin-shutdown".to_owned())
                .spawn(move || {
                    mark_host_thread();
                    g.shutdown();
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start a thread for a shutdown hook: {e}");
            }
        }
        for g in &generations {
            let plugin = &g.plugin().name;
            if g.wait_for_shutdown(hooks_until) {
                tracing::info!(server = %g.server, generation = g.number, %plugin, "shut down");
            } else {
                tracing::warn!(
                    server = %g.server,
                    generation = g.number,
                    %plugin,
                    "shutdown hook did not return within {} ms; exiting without waiting for it",
                    hook_deadline.as_millis()
                );
            }
        }
        // The last references to the instances are usually here, and dropping one runs
        // the plugin's own drop: under the same deadline, on a thread of its own.
        let (dropped, done) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("plugin-drop".to_owned())
            .spawn(move || {
                mark_host_thread();
                drop(generations);
                let _ = dropped.send(());
            });
        let left = hooks_until.saturating_duration_since(Instant::now());
        if spawned.is_ok() && done.recv_timeout(left).is_err() {
            tracing::warn!(
                "dropping the plugins' instances did not finish within {} ms; exiting without waiting for it",
                hook_deadline.as_millis()
            );
        }
        if let Some(stopping) = stopping_workers {
            let _ = stopping.join();
        }
    }

    /// Loads what changed in the plugin folder since the last look.
    fn sync_files(&self, control: &mut Control, report: &mut Report) {
        let files = match scan_plugin_dir(&control.plugin_dir) {
            Ok(files) => files,
            Err(e) => {
                // Out of file descriptors, or the folder being replaced: what was loaded
                // stays as it is, and the folder is looked at again shortly.
                let message = format!("plugin folder {}: {e}", control.plugin_dir.display());
                tracing::error!("{message}; looking again shortly");
                report.problems.push(message);
                report.retry = true;
                return;
            }
        };
        control.files.retain(|path, _| {
            let present = files.contains(path);
            if !present {
                tracing::info!(file = %path.display(), "plugin library removed");
            }
            present
        });
        for path in files {
            let Some(fingerprint) = Fingerprint::of(&path) else {
                continue;
            };
            // A library only worker processes run is checked in a child process and
            // never opened here (`loader::open_elsewhere`); one that an in-process
            // server needs now is opened, even if its file did not change.
            let elsewhere = Self::only_in_workers(control, &path);
            let previous = control.files.get(&path);
            let opened_as_needed = |state: &FileState| match &state.outcome {
                Ok(lib) => elsewhere || lib.is_open_here(),
                Err(_) => true,
            };
            if previous.is_some_and(|p| {
                p.fingerprint.as_ref() == Some(&fingerprint) && opened_as_needed(p)
            }) {
                continue;
            }
            let outcome = match loader::read(&path, &self.copies_dir) {
                Ok(file) => {
                    // The same bytes as the library last loaded from this file, or (after
                    // a build that was refused) as the one a server runs now.
                    let running = || {
                        control.servers.iter().find_map(|e| {
                            let lib = match &**e.server.state() {
                                ServerState::Serving(g) => Some(g.instance.library().clone()),
                                ServerState::Worker(w) => e
                                    .tried
                                    .as_ref()
                                    .map(|(lib, ..)| lib.clone())
                                    .filter(|lib| lib.build() == w.plugin.build),
                                _ => None,
                            };
                            lib.filter(|lib| lib.file == path)
                        })
                    };
                    let same = |lib: &Arc<PluginLibrary>| {
                        lib.content_hash == file.content_hash && (elsewhere || lib.is_open_here())
                    };
                    let same_bytes = previous
                        .and_then(|p| p.outcome.as_ref().ok())
                        .filter(|lib| same(lib))
                        .cloned()
                        .or_else(|| running().filter(same));
                    if let Some(lib) = same_bytes {
                        tracing::info!(file = %path.display(), "plugin library rewritten with identical bytes; not reloaded");
                        let outcome = Ok(lib.clone());
                        control.files.insert(
                            path,
                            FileState {
                                fingerprint: Some(fingerprint),
                                outcome,
                            },
                        );
                        continue;
                    }
                    if elsewhere {
                        loader::open_elsewhere(file).map(Arc::new)
                    } else {
                        loader::open(file).map(Arc::new)
                    }
                }
                Err(e) => Err(e),
            };
            match &outcome {
                Ok(library) if worker::running() => {
                    tracing::debug!(plugin = %library.name, file = %path.display(), "loaded plugin library");
                }
                Ok(library) => {
                    tracing::info!(
                        plugin = %library.name,
                        version = %library.version,
                        build = %library.build(),
                        api = %library.api_version,
                        file = %path.display(),
                        "loaded plugin library"
                    );
                    let stem = file_stem(&path);
                    let named = control.config.servers.iter().any(|s| {
                        s.plugin.as_ref() == Some(&library.name)
                            || s.plugin.is_some() && s.plugin == stem
                    });
                    if !named && !control.config.global.serves_drop_ins() {
                        tracing::info!(
                            plugin = %library.name,
                            "no server names this plugin, and drop-in plugins are served only on loopback listeners (global.drop_in_plugins): it is not served"
                        );
                    }
                }
                Err(e) if matches!(e.reason, LoadFailure::Incomplete(_)) => {
                    tracing::warn!("refused plugin {e} (looking again while it changes)");
                    report.retry = true;
                    report.problems.push(e.to_string());
                }
                Err(e) => {
                    tracing::error!("refused plugin {e}");
                    report.problems.push(e.to_string());
                }
            }
            let transient = matches!(
                &outcome,
                Err(LoadError {
                    reason: LoadFailure::Unreadable(_) | LoadFailure::Other(_),
                    ..
                })
            );
            if transient {
                report.retry = true;
            }
            let fingerprint = (!transient).then_some(fingerprint);
            control.files.insert(
                path,
                FileState {
                    fingerprint,
                    outcome,
                },
            );
        }
    }

    /// Whether the library at `path` runs only in worker processes: some enabled
    /// server names it by its file's name, and every one that does has `isolation:
    /// "process"`.
    fn only_in_workers(control: &Control, path: &Path) -> bool {
        let Some(stem) = file_stem(path) else {
            return false;
        };
        let mut naming = control
            .config
            .servers
            .iter()
            .filter(|s| s.enabled && s.plugin.as_deref().is_some_and(|p| same_name(p, &stem)))
            .peekable();
        naming.peek().is_some() && naming.all(|s| matches!(s.isolation, Isolation::Process(_)))
    }

    /// Which library (or why none) a `plugin` name refers to.
    fn resolve(control: &Control, plugin: &str) -> Resolution {
        let by_stem = |path: &Path| file_stem(path).is_some_and(|s| same_name(&s, plugin));
        // A file named after the plugin wins over another file that happens to hold a
        // plugin of that name (such as a backup copy next to it).
        let mut refused = None;
        for (_, state) in control.files.iter().filter(|(p, _)| by_stem(p)) {
            match &state.outcome {
                Ok(lib) => return Resolution::Library(lib.clone()),
                Err(e) => refused = Some(e.clone()),
            }
        }
        if refused.is_none() {
            let by_name = control
                .files
                .values()
                .find_map(|state| match &state.outcome {
                    Ok(lib) if same_name(&lib.name, plugin) => Some(lib.clone()),
                    _ => None,
                });
            if let Some(lib) = by_name {
                return Resolution::Library(lib);
            }
        }
        match refused {
            Some(e) => Resolution::Refused(e),
            None => Resolution::Missing(format!(
                "no plugin named {plugin:?} in {} (looked for {plugin}.{ext}, lib{plugin}.{ext} and plugin names)",
                control.plugin_dir.display(),
                ext = std::env::consts::DLL_EXTENSION
            )),
        }
    }

    /// The servers the config and the plugin folder call for, in routing priority order:
    /// configured servers first, then drop-in libraries at `<name>.localhost`.
    fn desired_servers(control: &Control) -> Vec<ServerSpec> {
        let mut specs: Vec<ServerSpec> = control
            .config
            .servers
            .iter()
            .filter(|s| s.enabled)
            .map(|s| ServerSpec {
                name: s.name.clone(),
                implicit: false,
                plugin: s.plugin.clone(),
                plugin_config: s.plugin_config.clone(),
                domains: s.domains.clone(),
                files: s.files.clone(),
                response: s.response.clone(),
                max_threads: s.max_threads,
                isolation: s.isolation.clone(),
            })
            .collect();
        // Libraries named by any entry, enabled or not, are not drop-ins: disabling a
        // server must turn it off, not move it to `<name>.localhost`.
        let used: Vec<Arc<PluginLibrary>> = control
            .config
            .servers
            .iter()
            .filter_map(|s| match Self::resolve(control, s.plugin.as_deref()?) {
                Resolution::Library(lib) => Some(lib),
                _ => None,
            })
            .collect();
        let taken = |specs: &[ServerSpec], name: &str, domain: &DomainPattern| {
            specs
                .iter()
                .any(|s| s.name == name || s.domains.contains(domain))
        };
        // Drop-in libraries, plus drop-in servers that already exist (a removed library's
        // server stays, waiting, so its domain answers 503 rather than 404).
        if !control.config.global.serves_drop_ins() {
            return specs;
        }
        let mut implicit: Vec<(String, String)> = control
            .servers
            .iter()
            .filter(|e| e.spec.implicit)
            .filter_map(|e| Some((e.spec.name.clone(), e.spec.plugin.clone()?)))
            .collect();
        for (path, state) in &control.files {
            let Ok(lib) = &state.outcome else { continue };
            if used.iter().any(|u| Arc::ptr_eq(u, lib))
                || implicit.iter().any(|(n, _)| n == &lib.name)
            {
                continue;
            }
            if let Some(stem) = file_stem(path) {
                implicit.push((lib.name.clone(), stem));
            }
        }
        for (name, plugin) in implicit {
            let label = name.replace('_', "-").to_ascii_lowercase();
            let Ok(domain) = DomainPattern::parse(&format!("{label}.localhost")) else {
                tracing::warn!(plugin = %name, "cannot serve this plugin at <name>.localhost: its name is not a valid domain label");
                continue;
            };
            if taken(&specs, &name, &domain) {
                continue;
            }
            if let Resolution::Library(lib) = Self::resolve(control, &plugin) {
                if used.iter().any(|u| Arc::ptr_eq(u, &lib)) {
                    continue;
                }
            }
            specs.push(ServerSpec {
                name,
                implicit: true,
                plugin: Some(plugin),
                plugin_config: "null".to_owned(),
                domains: vec![domain],
                files: None,
                response: ResponseRules::default(),
                max_threads: None,
                isolation: Isolation::InProcess,
            });
        }
        specs
    }

    /// Moves every server to what its spec and the plugin folder call for.
    fn sync_servers(&self, control: &mut Control, timing: Timing, report: &mut Report) {
        let reload = &control.config.global.reload;
        let deadlines = Deadlines {
            drain: reload.drain_timeout,
            init: reload.init_timeout,
            event: control.config.global.limits.request_timeout,
        };
        let drain = deadlines.drain;
        bulkhead::set_blocking_warn(control.config.global.blocking_warn);
        self.hook_ms.store(
            control.config.global.shutdown_timeout.as_millis() as u64,
            Ordering::Relaxed,
        );
        let desired = Self::desired_servers(control);
        let mut old: Vec<ServerEntry> = std::mem::take(&mut control.servers);
        let mut next = Vec::new();
        for spec in desired {
            let existing = old
                .iter()
                .position(|e| e.spec.name == spec.name && e.spec.implicit == spec.implicit)
                .map(|i| old.swap_remove(i));
            let (server, mut tried, mut serving) = match existing {
                Some(e) => (e.server, e.tried, e.serving),
                None => {
                    let server =
                        Server::new(&spec.name, spec.implicit, control.config.global.bus.queue);
                    let last = control.numbered.get(&spec.name).copied().unwrap_or(0);
                    server.generations.store(last, Ordering::Relaxed);
                    (server, None, None)
                }
            };
            server.set_files(spec.files.as_ref());
            server.set_headers(&spec.response);
            server
                .bulkhead
                .set_limit(spec.max_threads.unwrap_or_else(bulkhead::default_limit));
            server.crashes().process = matches!(spec.isolation, Isolation::Process(_));
            if control.drained.contains(&spec.name) {
                self.drain(&server, drain);
                next.push(ServerEntry {
                    server,
                    spec,
                    tried: None,
                    serving: None,
                });
                continue;
            }
            server.drained.store(false, Ordering::Relaxed);
            let current = server.serving();
            let Some(plugin) = spec.plugin.as_deref() else {
                self.files_only(&server, drain);
                next.push(ServerEntry {
                    server,
                    spec,
                    tried: None,
                    serving: None,
                });
                continue;
            };
            match Self::resolve(control, plugin) {
                Resolution::Library(lib) => {
                    let attempt = (
                        lib.clone(),
                        spec.plugin_config.clone(),
                        plugin.to_owned(),
                        spec.isolation.clone(),
                    );
                    let same = |a: &Attempt| {
                        let (l, c, p, i) = a;
                        Arc::ptr_eq(l, &lib)
                            && *c == spec.plugin_config
                            && p == plugin
                            && *i == spec.isolation
                    };
                    let same_as_tried = tried.as_ref().is_some_and(same);
                    // The build serving now, back after a refused or failed one: nothing
                    // to do.
                    let serves = |a: &Attempt| match &**server.state() {
                        ServerState::Serving(g) => Arc::ptr_eq(g.instance.library(), &a.0),
                        ServerState::Worker(w) => w.plugin.build == a.0.build(),
                        _ => false,
                    };
                    let same_as_serving = serving.as_ref().is_some_and(|a| same(a) && serves(a));
                    if same_as_serving && !same_as_tried {
                        // A build put back was said already (identical bytes); a config
                        // put back is said here.
                        let config_back = tried.as_ref().is_some_and(|(_, c, p, i)| {
                            *c != spec.plugin_config || p != plugin || *i != spec.isolation
                        });
                        if config_back {
                            tracing::info!(
                                server = %server.name,
                                generation = server.generation_number().unwrap_or_default(),
                                "the generation serving runs this config already; not reloaded"
                            );
                        }
                        tried = serving.clone();
                    } else if let (false, false, Isolation::Process(limits)) = (
                        same_as_tried,
                        self.stopping.load(Ordering::SeqCst),
                        &spec.isolation,
                    ) {
                        let work = workers::Start {
                            source: control.config.source.clone(),
                            folder: control.config.folder.clone(),
                            limits: limits.clone(),
                        };
                        if self.start_worker(&server, &lib, work, timing, deadlines, report) {
                            serving = Some(attempt.clone());
                        }
                        tried = Some(attempt);
                    } else if !same_as_tried && !self.stopping.load(Ordering::SeqCst) {
                        // Another plugin's library under this server's file name does not
                        // replace the server (its state would be lost), unless the config
                        // names that plugin.
                        let foreign = current.as_ref().filter(|g| {
                            !same_name(&g.plugin().name, &lib.name) && !same_name(plugin, &lib.name)
                        });
                        match foreign {
                            Some(g) => {
                                let reason = format!(
                                    "{} holds plugin {:?}, but this server runs plugin {:?}; generation {} keeps serving (set the server's \"plugin\" to {:?} to switch)",
                                    lib.file.display(),
                                    lib.name,
                                    g.plugin().name,
                                    g.number,
                                    lib.name
                                );
                                tracing::error!(server = %server.name, "refused a library of another plugin: {reason}");
                                report
                                    .problems
                                    .push(format!("server {:?}: {reason}", &*server.name));
                            }
                            None => {
                                let before = server.generation_number();
                                self.start_generation(
                                    &server, &spec, &lib, current, timing, deadlines, report,
                                );
                                // Started (not refused, with the previous one serving on).
                                if server.generation_number() != before && serves(&attempt) {
                                    serving = Some(attempt.clone());
                                }
                            }
                        }
                        tried = Some(attempt);
                    }
                }
                Resolution::Refused(e) => match current {
                    Some(g) => {
                        // Said once per refusal: a look again at the folder (a file still
                        // being written, a SIGHUP) finds the same one.
                        let reason = format!("refused: {e}");
                        let again =
                            server.meter.last_reload().0.is_some_and(|n| {
                                !n.ok && n.error.as_deref() == Some(reason.as_str())
                            });
                        if !again {
                            tracing::warn!(
                                server = %server.name,
                                generation = g.number,
                                "kept serving the previous build of {}: the new one was refused",
                                e.file.display()
                            );
                            self.note_reload(&server, timing, Err(reason.clone()));
                            server.meter.refused(reason);
                        }
                    }
                    None => self.wait(
                        &server,
                        format!("its plugin was refused: {e}"),
                        drain,
                        report,
                    ),
                },
                Resolution::Missing(reason) => {
                    let reason = match &current {
                        Some(g) => {
                            format!("its plugin file {} was removed", g.plugin().file.display())
                        }
                        None => reason,
                    };
                    self.wait(&server, reason, drain, report);
                    tried = None;
                    serving = None;
                }
            }
            next.push(ServerEntry {
                server,
                spec,
                tried,
                serving,
            });
        }
        for gone in old {
            tracing::info!(server = %gone.server.name, "server removed");
            control.numbered.insert(
                gone.spec.name.clone(),
                gone.server.generations.load(Ordering::Relaxed),
            );
            gone.server
                .sockets
                .close_all("this server was removed", true);
            Bus::get().subscribe(&gone.server.inbox, &[]);
            let previous = gone.server.state.swap(Arc::new(ServerState::Waiting(
                "this server was removed".to_owned(),
            )));
            self.retire_state(&previous, drain);
        }
        control.servers = next;
    }

    /// Starts a new generation of `server` on `library`. On success it replaces the
    /// current one (which drains and shuts down); on failure the current one, if any,
    /// keeps serving.
    #[allow(clippy::too_many_arguments)]
    fn start_generation(
        &self,
        server: &Arc<Server>,
        spec: &ServerSpec,
        library: &Arc<PluginLibrary>,
        current: Option<Arc<Generation>>,
        timing: Timing,
        deadlines: Deadlines,
        report: &mut Report,
    ) {
        // State is handed over only between builds of the same plugin. Both calls run on
        // a watchdog thread: a plugin that hangs in them must not stall every later
        // change.
        let handover = current.clone().filter(|g| g.plugin().name == library.name);
        // A worker process's first generation gets the state its host handed it.
        let handed = self.handed.lock().unwrap_or_else(|p| p.into_inner()).take();
        let number = server.next_generation();
        let domains = spec
            .domains
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let (lib, name, config, sockets) = (
            library.clone(),
            server.name.to_string(),
            spec.plugin_config.clone(),
            server.sockets.ffi(),
        );
        let created = self.plugin_thread.call(
            deadlines.init,
            move || {
                let state = handover.and_then(|g| g.instance.export_state()).or(handed);
                let created = Instance::create(lib, &name, &config, state.as_deref(), sockets)
                    .and_then(|(instance, declared)| {
                        let routes = declared
                            .routes
                            .iter()
                            .map(|(m, p)| (m.as_str(), p.as_str()));
                        match RouteTable::new(routes, declared.fallback) {
                            Ok(routes) => Ok((
                                instance,
                                routes
                                    .with_stream_body_limits(declared.stream_body_limits)
                                    .with_websockets(declared.websockets)
                                    .with_topics(declared.topics),
                            )),
                            Err(e) => {
                                // It never served, but init may have started things; let it
                                // stop them.
                                instance.shutdown();
                                Err(format!("its route table is invalid: {e}"))
                            }
                        }
                    });
                (created, state.map_or(0, |s| s.len()))
            },
            // An init that finishes after the deadline started things nobody will use.
            |(late, _)| {
                if let Ok((instance, _)) = late {
                    tracing::warn!("an init that overran its deadline finished; shutting it down");
                    instance.shutdown();
                }
            },
        );
        let (created, state_bytes) = match created {
            Ok(done) => done,
            Err(timeout) => (Err(timeout), 0),
        };
        match created {
            Ok((instance, routes)) => {
                let takes_websockets = routes.takes_websockets();
                let topics = routes.topics().to_vec();
                let routes = routes.labelled(&server.name);
                let generation = Generation::new(
                    server.name.clone(),
                    number,
                    instance,
                    routes,
                    server.bulkhead.clone(),
                );
                let previous = server
                    .state
                    .swap(Arc::new(ServerState::Serving(generation)));
                if let ServerState::Worker(w) = &*previous {
                    // Its plugin moved into the host's process.
                    self.retire_worker(w.clone(), deadlines.drain);
                }
                server.subscribe(&topics, deadlines.event);
                if !takes_websockets && !server.sockets.is_empty() {
                    // Nobody would handle their events.
                    tracing::warn!(server = %server.name, connections = server.sockets.len(), "closing the server's WebSocket connections: its new generation declares no WebSocket route");
                    server
                        .sockets
                        .close_all("the server no longer takes WebSockets", false);
                }
                let ms = |t: Instant| t.elapsed().as_micros() as f64 / 1000.0;
                if worker::running() {
                    tracing::debug!(server = %server.name, generation = number, "serving");
                } else {
                    tracing::info!(
                        server = %server.name,
                        generation = number,
                        plugin = %library.name,
                        version = %library.version,
                        build = %library.build(),
                        file = %library.file.display(),
                        %domains,
                        state_bytes,
                        took_ms = ms(timing.since),
                        work_ms = ms(timing.started),
                        "{}",
                        if current.is_some() { "reloaded" } else { "serving" }
                    );
                }
                server.meter.reloaded(Ok(number));
                self.note_reload(server, timing, Ok(number));
                if let Some(old) = current {
                    self.retire(old, deadlines.drain);
                }
            }
            Err(reason) => {
                let reason = format!(
                    "plugin {} ({}) failed to initialise: {reason}",
                    library.name,
                    library.file.display()
                );
                server.meter.reloaded(Err(reason.clone()));
                self.note_reload(server, timing, Err(reason.clone()));
                match current {
                    Some(g) => tracing::error!(
                        server = %server.name,
                        "reload refused, generation {} keeps serving: {reason}",
                        g.number
                    ),
                    None if worker::running() => {
                        tracing::debug!(server = %server.name, "not serving: {reason}");
                        server
                            .state
                            .store(Arc::new(ServerState::Waiting(reason.clone())));
                    }
                    None => {
                        tracing::error!(server = %server.name, %domains, "not serving: {reason}");
                        server
                            .state
                            .store(Arc::new(ServerState::Waiting(reason.clone())));
                    }
                }
                report
                    .problems
                    .push(format!("server {:?}: {reason}", &*server.name));
            }
        }
    }

    /// Puts a server in the waiting state, retiring what it was serving.
    fn wait(
        &self,
        server: &Arc<Server>,
        reason: String,
        drain: std::time::Duration,
        report: &mut Report,
    ) {
        report
            .problems
            .push(format!("server {:?}: {reason}", &*server.name));
        if server.waiting_reason().as_deref() == Some(reason.as_str()) {
            return;
        }
        tracing::error!(server = %server.name, "not serving: {reason}");
        server
            .sockets
            .close_all("the server is not available", false);
        let previous = server.state.swap(Arc::new(ServerState::Waiting(reason)));
        self.retire_state(&previous, drain);
    }

    /// Retires what a server served before its state was swapped: a generation or a
    /// worker process.
    fn retire_state(&self, previous: &ServerState, drain: Duration) {
        match previous {
            ServerState::Serving(g) => self.retire(g.clone(), drain),
            ServerState::Worker(w) => self.retire_worker(w.clone(), drain),
            ServerState::Waiting(_) | ServerState::Static => {}
        }
    }

    /// Leaves a server with static files only: a plugin it ran (before a config change
    /// took it away) is retired, and its WebSocket connections and bus subscriptions
    /// end with it.
    fn files_only(&self, server: &Arc<Server>, drain: Duration) {
        if matches!(**server.state.load(), ServerState::Static) {
            return;
        }
        server
            .sockets
            .close_all("the server no longer has a plugin", false);
        Bus::get().subscribe(&server.inbox, &[]);
        let previous = server.state.swap(Arc::new(ServerState::Static));
        if let Some(number) = match &*previous {
            ServerState::Serving(g) => Some(g.number),
            ServerState::Worker(w) => Some(w.number),
            _ => None,
        } {
            tracing::info!(server = %server.name, generation = number, "the server has no plugin any more: static files only");
        }
        self.retire_state(&previous, drain);
    }

    /// Lets a replaced generation finish its requests (up to `drain`), then calls its
    /// shutdown hook. Its instance is dropped when the last request lets go of it.
    fn retire(&self, generation: Arc<Generation>, drain: Duration) {
        // No request enters it from now on; those inside finish.
        generation.retire();
        generation.instance.stop_within(drain);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            generation.shutdown();
            return;
        };
        self.retiring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(generation.clone());
        let retiring = self.retiring.clone();
        runtime.spawn(async move {
            let started = Instant::now();
            let mut drained = generation.drain(drain).await;
            if !drained {
                // Streamed responses end now (cleanly, at their next poll), and get a
                // moment to let go of the generation before its hook runs.
                generation.cut_off();
                drained = generation.drain(CUT_GRACE).await;
            }
            let in_flight = generation.in_flight();
            // The shutdown hook (and, usually, the instance's drop) is plugin code that may
            // block: it runs on a thread of its own, not on the runtime's workers nor its
            // blocking pool (a runtime waits for its blocking pool when it is dropped, so
            // a hook stuck there would hold up the host's exit). The generation leaves the
            // retiring list only after its hook ran, so a host stopping meanwhile still
            // reaches it, and waits for the hook under its own deadline.
            let (server, number) = (generation.server.clone(), generation.number);
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            let hook = move || {
                mark_host_thread();
                generation.shutdown();
                retiring
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|g| !Arc::ptr_eq(g, &generation));
                drop(generation);
                let _ = done.send(());
            };
            let hook = std::sync::Arc::new(std::sync::Mutex::new(Some(hook)));
            let run = {
                let hook = hook.clone();
                move || {
                    let taken = hook.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(hook) = taken {
                        hook();
                    }
                }
            };
            if let Err(e) = std::thread::Builder::new()
                .name("plugin-shutdown".to_owned())
                .spawn(run)
            {
                tracing::error!(%server, "cannot start a thread for the shutdown hook ({e}); running it on the blocking pool");
                let taken = hook.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(hook) = taken {
                    tokio::task::spawn_blocking(hook);
                }
            }
            let _ = finished.await;
            tracing::info!(
                %server,
                generation = number,
                drained,
                in_flight,
                waited_ms = started.elapsed().as_millis() as u64,
                "retired"
            );
        });
    }

    /// Builds a routing snapshot from the current servers and swaps it in.
    fn publish(&self, control: &Control) {
        let mut domains = DomainTable::default();
        let by_name: HashMap<&str, &Arc<Server>> = control
            .servers
            .iter()
            .map(|e| (&*e.server.name, &e.server))
            .collect();
        for entry in &control.servers {
            for domain in &entry.spec.domains {
                domains.insert(domain, entry.server.clone());
            }
        }
        let default = control
            .config
            .global
            .default_server
            .as_deref()
            .and_then(|name| by_name.get(name))
            .map(|s| (*s).clone());
        domains.set_default(default);
        // Limits still configured keep their limiters, and so their counts.
        let admission = Admission::build(&control.config, self.routing.load().admission.as_deref());
        self.routing.store(Arc::new(Routing {
            domains,
            servers: control.servers.iter().map(|e| e.server.clone()).collect(),
            limits: control.config.global.limits.clone(),
            redirect_https: control
                .config
                .servers
                .iter()
                .filter(|s| s.enabled && s.redirect_https)
                .map(|s| Arc::from(s.name.as_str()))
                .collect(),
            admission,
            jwt: JwtGate::build(&control.config),
            health_path: control.config.global.health_path.as_deref().map(Box::from),
        }));
        crate::request::http::set_health_path_on(control.config.global.health_path.is_some());
        // Counting requests is wasted without a listener to show the counts.
        let global = &control.config.global;
        recording::set_enabled(global.metrics && global.admin.is_some());
    }

    /// The servers that should serve and do not (a server that is waiting: its plugin
    /// missing, refused or failing its init), with why. Empty: the host is ready. A
    /// server drained through the admin API waits on purpose, and does not count.
    pub fn not_ready(&self) -> Vec<(Arc<str>, String)> {
        self.routing()
            .servers
            .iter()
            .filter(|s| !s.drained.load(Ordering::Relaxed))
            .filter_map(|s| match &**s.state() {
                ServerState::Waiting(reason) => Some((s.name.clone(), reason.clone())),
                ServerState::Serving(_) | ServerState::Static | ServerState::Worker(_) => None,
            })
            .collect()
    }
}

impl Drop for Microservers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.copies_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A call's result that counts whether anyone received it: the caller or `late`.
    struct Token {
        lost: Arc<AtomicUsize>,
        received: bool,
    }

    impl Drop for Token {
        fn drop(&mut self) {
            if !self.received {
                self.lost.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// An init that finishes right at its deadline must reach either the caller or the
    /// `late` handler (which shuts it down), never neither: every initialised instance
    /// gets exactly one shutdown call.
    #[test]
    fn a_call_that_finishes_at_its_deadline_reaches_the_caller_or_late() {
        let thread = PluginThread::default();
        let lost = Arc::new(AtomicUsize::new(0));
        let late = Arc::new(AtomicUsize::new(0));
        let mut on_time = 0;
        let limit = Duration::from_micros(300);
        for i in 0..2000u64 {
            let token_lost = lost.clone();
            let late_count = late.clone();
            // Finishing times spread around the moment the caller gives up (its deadline
            // plus the timer's slack), in steps of half a microsecond.
            let takes = Duration::from_nanos(250_000 + (i * 7919) % 200_000);
            let outcome = thread.call(
                limit,
                move || {
                    let started = Instant::now();
                    while started.elapsed() < takes {
                        std::hint::spin_loop();
                    }
                    Token {
                        lost: token_lost,
                        received: false,
                    }
                },
                move |mut token| {
                    token.received = true;
                    late_count.fetch_add(1, Ordering::SeqCst);
                },
            );
            if let Ok(mut token) = outcome {
                token.received = true;
                on_time += 1;
            }
        }
        // Calls that overran finish on their own threads.
        let deadline = Instant::now() + Duration::from_secs(5);
        while on_time + late.load(Ordering::SeqCst) + lost.load(Ordering::SeqCst) < 2000
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(lost.load(Ordering::SeqCst), 0, "results lost");
        assert_eq!(on_time + late.load(Ordering::SeqCst), 2000);
    }
}
