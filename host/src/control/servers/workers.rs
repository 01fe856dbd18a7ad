//! Servers whose plugin runs in a worker process (`isolation: "process"`): starting a
//! worker per generation (with the state of the one it replaces), retiring the old one
//! (drain, then its shutdown hook, then its exit), and restarting a worker that died,
//! with backoff.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Cause, Deadlines, Microservers, Report, Resolution, Server, ServerState, Timing};
use crate::boundary::loader::PluginLibrary;
use crate::boundary::worker::{self, Exit, Worker, WorkerSpec};
use crate::control::config::{Isolation, WorkerLimits};

/// A worker that ended, for the supervisor.
pub(super) type WorkerExit = (Arc<Server>, Arc<Worker>, Exit);

/// Crashes counted within this window make a crash loop past `LOOP_CRASHES`.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
const LOOP_CRASHES: usize = 5;
/// The first restart's delay; doubled for each crash in the window, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A server's worker crashes.
#[derive(Default, Debug)]
pub(super) struct Crashes {
    /// When its workers died, within the last `CRASH_WINDOW`.
    recent: VecDeque<Instant>,
    /// In a crash loop (logged once when it starts, once when it ends).
    looping: bool,
    /// The dead worker a restart is scheduled for; cleared by any new start.
    restart: Option<Arc<Worker>>,
    /// How many times its workers were restarted after a crash, ever.
    pub restarts: u64,
    /// Its config says `isolation: "process"`.
    pub process: bool,
}

impl Crashes {
    /// Notes a crash: the delay before the restart, whether a crash loop starts now,
    /// and how many crashes the window holds.
    fn crashed(&mut self, dead: &Arc<Worker>) -> (Duration, bool, usize) {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let n = self.recent.len();
        // A loop that calmed down (fewer crashes in the window) is over; a new one is
        // said again.
        if n < LOOP_CRASHES {
            self.looping = false;
        }
        let delay = FIRST_BACKOFF
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(MAX_BACKOFF);
        let starts_loop = n >= LOOP_CRASHES && !self.looping;
        self.looping |= starts_loop;
        self.restart = Some(dead.clone());
        (delay, starts_loop, n)
    }
}

/// What a worker needs from the config beyond the server's spec.
pub(super) struct Start {
    pub source: Arc<Value>,
    pub folder: PathBuf,
    pub limits: WorkerLimits,
}

impl Microservers {
    /// Starts a worker process for a new generation of `server` on `library`. On
    /// success (true) it replaces what the server ran (which drains and stops); on
    /// failure that keeps serving.
    pub(super) fn start_worker(
        &self,
        server: &Arc<Server>,
        library: &Arc<PluginLibrary>,
        start: Start,
        timing: Timing,
        deadlines: Deadlines,
        report: &mut Report,
    ) -> bool {
        let previous = server.state.load_full();
        // State is handed over between builds of the same plugin, whichever side of a
        // process boundary the previous one ran on.
        let state = match &*previous {
            ServerState::Worker(w) if super::same_name(&w.plugin.name, &library.name) => {
                w.export_state(deadlines.init).unwrap_or_else(|e| {
                    tracing::warn!(server = %server.name, "the state of its worker process was not handed over: {e}");
                    None
                })
            }
            ServerState::Serving(g) if g.plugin().name == library.name => {
                let g = g.clone();
                self.plugin_thread
                    .call(deadlines.init, move || g.instance.export_state(), |_| {})
                    .unwrap_or(None)
            }
            _ => None,
        };
        let state_bytes = state.as_ref().map_or(0, Vec::len);
        let number = server.next_generation();
        let spec = WorkerSpec {
            server: server.name.clone(),
            number,
            plugin_file: library.file.clone(),
            source: start.source,
            folder: start.folder,
            max_memory_mb: start.limits.max_memory_mb,
            state,
            init_timeout: deadlines.init,
            json_logs: worker::json_logs(),
            parent_dir: self.copies_dir.clone(),
        };
        let exits = self.exits.clone();
        let watched = server.clone();
        let on_exit: worker::OnExit = Box::new(move |w, exit| {
            let _ = exits.send((watched, w, exit));
        });
        let restarting = timing.cause == Cause::WorkerCrash;
        match Worker::spawn(spec, on_exit) {
            Ok(w) => {
                let previous = server.state.swap(Arc::new(ServerState::Worker(w.clone())));
                if let ServerState::Serving(_) = &*previous {
                    // Its plugin moved out of the host: what the host held for it (its
                    // WebSockets, its bus topics) ends here; the worker has its own.
                    server
                        .sockets
                        .close_all("the server moved to a worker process", false);
                }
                // The host takes bus events for it, and hands them to the worker.
                server.subscribe(&w.plugin.topics, deadlines.event);
                let crashes = {
                    let mut crashes = server.crashes();
                    crashes.restart = None;
                    if restarting {
                        crashes.restarts += 1;
                    }
                    crashes.recent.len()
                };
                let ms = |t: Instant| t.elapsed().as_micros() as f64 / 1000.0;
                tracing::info!(
                    server = %server.name,
                    generation = number,
                    plugin = %w.plugin.name,
                    version = %w.plugin.version,
                    build = %w.plugin.build,
                    file = %library.file.display(),
                    pid = w.pid,
                    isolation = "process",
                    state_bytes,
                    took_ms = ms(timing.since),
                    work_ms = ms(timing.started),
                    "{}",
                    match (&*previous, restarting) {
                        (_, true) => format!("worker process restarted ({crashes} crash(es) in the last 60 s)"),
                        (ServerState::Serving(_) | ServerState::Worker(_), _) => "reloaded".to_owned(),
                        _ => "serving".to_owned(),
                    }
                );
                server.meter.reloaded(Ok(number));
                self.note_reload(server, timing, Ok(number));
                self.retire_state(&previous, deadlines.drain);
                true
            }
            Err(reason) => {
                let reason = format!(
                    "plugin {} ({}) failed to initialise in its worker process: {reason}",
                    library.name,
                    library.file.display()
                );
                server.meter.reloaded(Err(reason.clone()));
                self.note_reload(server, timing, Err(reason.clone()));
                match &*previous {
                    ServerState::Serving(_) | ServerState::Worker(_) if !restarting => {
                        tracing::error!(
                            server = %server.name,
                            "reload refused, generation {} keeps serving: {reason}",
                            server.generation_number().unwrap_or_default()
                        );
                    }
                    _ => {
                        // A restart that fails is logged as the crash it counts as
                        // (once per state change in a crash loop), not here too.
                        if !restarting {
                            tracing::error!(server = %server.name, "not serving: {reason}");
                        }
                        let previous = server
                            .state
                            .swap(Arc::new(ServerState::Waiting(reason.clone())));
                        self.retire_state(&previous, deadlines.drain);
                    }
                }
                report
                    .problems
                    .push(format!("server {:?}: {reason}", &*server.name));
                false
            }
        }
    }

    /// Lets a replaced worker finish its requests (up to `drain`), then asks it to run
    /// its plugin's shutdown hook and exit.
    pub(super) fn retire_worker(&self, worker: Arc<Worker>, drain: Duration) {
        worker.retire();
        let hook = Duration::from_millis(self.hook_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.retiring_workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(worker.clone());
        let retiring = self.retiring_workers.clone();
        let stop = move |worker: Arc<Worker>, drained: bool, started: Instant| {
            let in_flight = worker.in_flight();
            // What is still in flight gets a moment to end with the worker's own
            // shutdown (which closes its WebSockets with 1001).
            worker.stop(Duration::from_millis(500), hook);
            retiring
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|w| !Arc::ptr_eq(w, &worker));
            tracing::info!(
                server = %worker.server,
                generation = worker.number,
                pid = worker.pid,
                drained,
                in_flight,
                waited_ms = started.elapsed().as_millis() as u64,
                "retired"
            );
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            stop(worker, false, Instant::now());
            return;
        };
        runtime.spawn(async move {
            let started = Instant::now();
            let until = started + drain;
            // Its WebSockets stay open with it until the drain deadline too.
            let busy = |w: &Worker| w.in_flight() + w.sockets() > 0;
            while busy(&worker) && Instant::now() < until && worker.exit().is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let drained = !busy(&worker);
            let spawned = std::thread::Builder::new()
                .name("worker-stop".to_owned())
                .spawn(move || stop(worker, drained, started));
            if let Err(e) = spawned {
                tracing::error!("cannot start a thread to stop a worker process: {e}");
            }
        });
    }

    /// Restarts the worker processes that die, from now on (with a runtime). Exits seen
    /// before this are handled now.
    pub fn supervise(self: &Arc<Self>) {
        let Some(mut exits) = self
            .exits_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some((server, worker, exit)) = exits.recv().await {
                let Some(this) = weak.upgrade() else { break };
                this.worker_ended(&server, &worker, &exit, &weak);
            }
        });
    }

    /// A worker ended: if it was asked to, nothing; if it served its server, the server
    /// waits (503 with the reason) and a restart is scheduled after a backoff.
    fn worker_ended(
        &self,
        server: &Arc<Server>,
        worker: &Arc<Worker>,
        exit: &Exit,
        weak: &Weak<Microservers>,
    ) {
        let stopping = self.stopping.load(std::sync::atomic::Ordering::SeqCst);
        if exit.asked || stopping {
            return;
        }
        if worker.is_retired() {
            tracing::warn!(server = %server.name, generation = worker.number, pid = worker.pid, "a replaced worker process died while it drained: {}", exit.reason);
            return;
        }
        // Only the worker serving now: and a reload that swaps in another at the same
        // moment wins (compare and swap), so its worker is neither lost nor doubled.
        let current = server.state.load_full();
        if !matches!(&*current, ServerState::Worker(w) if Arc::ptr_eq(w, worker)) {
            return;
        }
        let died = format!(
            "its worker process (pid {}, generation {}) died after {} s: {}",
            worker.pid,
            worker.number,
            exit.after.as_secs(),
            exit.reason
        );
        server.meter.worker_crashed();
        self.schedule_restart(server, worker, Some(&current), &died, &exit.reason, weak);
    }

    /// Notes a crash (a worker that died, or a restart that failed), makes the server
    /// wait with the reason (unless `expected` is given and is no longer its state), and
    /// restarts it after the backoff.
    fn schedule_restart(
        &self,
        server: &Arc<Server>,
        dead: &Arc<Worker>,
        expected: Option<&Arc<ServerState>>,
        what: &str,
        last: &str,
        weak: &Weak<Microservers>,
    ) {
        let (delay, starts_loop, n, looping) = {
            let mut crashes = server.crashes();
            let (delay, starts_loop, n) = crashes.crashed(dead);
            (delay, starts_loop, n, crashes.looping)
        };
        let reason = if looping {
            format!(
                "its worker process keeps crashing ({n} times in the last {} s; last: {last}); next restart in {} ms",
                CRASH_WINDOW.as_secs(),
                delay.as_millis()
            )
        } else {
            format!("{what}; restarting in {} ms", delay.as_millis())
        };
        let waiting = Arc::new(ServerState::Waiting(reason.clone()));
        match expected {
            Some(current) => {
                let previous = server.state.compare_and_swap(current, waiting);
                if !Arc::ptr_eq(&previous, current) {
                    server.crashes().restart = None;
                    return;
                }
            }
            None => server.state.store(waiting),
        }
        if starts_loop {
            tracing::error!(server = %server.name, crashes = n, "crash loop: {reason}; restarts go on with a growing delay (up to {} s)", MAX_BACKOFF.as_secs());
        } else if !looping {
            tracing::error!(server = %server.name, "{reason}");
        } else {
            tracing::debug!(server = %server.name, "{reason}");
        }
        let (server, dead, weak) = (server.clone(), dead.clone(), weak.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(this) = weak.upgrade() else { return };
            let _ = tokio::task::spawn_blocking(move || this.restart_worker(&server, &dead)).await;
        });
    }

    /// Starts a worker again for a server whose worker died, unless something else
    /// started one since (a reload), the server changed, or it was drained. A restart
    /// that fails counts as a crash, and is tried again after its backoff.
    fn restart_worker(self: &Arc<Self>, server: &Arc<Server>, dead: &Arc<Worker>) {
        let control = self.control();
        if control.stopping {
            return;
        }
        let scheduled = server
            .crashes()
            .restart
            .as_ref()
            .is_some_and(|w| Arc::ptr_eq(w, dead));
        if !scheduled || !matches!(&**server.state(), ServerState::Waiting(_)) {
            return;
        }
        // Not to be restarted any more (removed, drained, in process now, its library
        // gone): the restart is forgotten.
        let forget = || server.crashes().restart = None;
        let Some(entry) = control
            .servers
            .iter()
            .find(|e| Arc::ptr_eq(&e.server, server))
        else {
            return forget();
        };
        if control.drained.contains(&entry.spec.name) {
            return forget();
        }
        let (Isolation::Process(limits), Some(plugin)) =
            (entry.spec.isolation.clone(), entry.spec.plugin.clone())
        else {
            return forget();
        };
        let Resolution::Library(lib) = Self::resolve(&control, &plugin) else {
            return forget();
        };
        let reload = &control.config.global.reload;
        let deadlines = Deadlines {
            drain: reload.drain_timeout,
            init: reload.init_timeout,
            event: control.config.global.limits.request_timeout,
        };
        let start = Start {
            source: control.config.source.clone(),
            folder: control.config.folder.clone(),
            limits,
        };
        let timing = Timing::new(Instant::now(), Cause::WorkerCrash);
        let mut report = Report::default();
        let started = self.start_worker(server, &lib, start, timing, deadlines, &mut report);
        drop(control);
        if started {
            // (A crash of the new worker from here on is its own.)
            return;
        }
        let state = server.state.load_full();
        if let ServerState::Waiting(why) = &*state {
            // It did not start (its init failed, or it crashed while starting): a crash
            // too, tried again after its backoff.
            let what = format!("its worker process did not start again: {why}");
            let weak = Arc::downgrade(self);
            self.schedule_restart(server, dead, Some(&state), &what, why, &weak);
        }
    }
}

/// Stops worker processes (the host is stopping): each finishes its requests until
/// `requests_until`, runs its plugin's shutdown hook within `hook`, and exits. Blocking.
pub(super) fn stop_all(all: Vec<Arc<Worker>>, requests_until: Instant, hook: Duration) {
    {
        let grace = requests_until.saturating_duration_since(Instant::now());
        let stopping: Vec<_> = all
            .into_iter()
            .map(|w| {
                std::thread::Builder::new()
                    .name("worker-stop".to_owned())
                    .spawn(move || {
                        w.stop(grace, hook);
                        tracing::info!(server = %w.server, generation = w.number, pid = w.pid, "worker process stopped");
                    })
            })
            .collect();
        for handle in stopping.into_iter().flatten() {
            let _ = handle.join();
        }
    }
}

impl Server {
    pub(super) fn crashes(&self) -> std::sync::MutexGuard<'_, Crashes> {
        self.crashes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times its worker processes were restarted after a crash.
    pub fn worker_restarts(&self) -> u64 {
        self.crashes().restarts
    }

    /// Whether its plugin runs (or is to run) in a worker process.
    pub fn is_process_isolated(&self) -> bool {
        let crashes = self.crashes();
        crashes.process || crashes.restart.is_some()
    }
}
