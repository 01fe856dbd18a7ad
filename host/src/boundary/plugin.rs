//! Microserver instances and generations.
//!
//! A [`Generation`] is one instance of a plugin serving one server, built from one
//! library and one config. Requests hold it through an [`InFlight`] guard, so a
//! generation that has been replaced keeps serving the requests it already started and
//! can tell when the last one is done.
//!
//! `unsafe` here is confined to [`Instance`]: the root module's functions take the
//! instance pointer its `init` returned, and an `Instance` owns exactly one such pointer
//! until its drop frees it.
#![allow(unsafe_code)]

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use abi_stable::std_types::{RResult, RSlice};
use async_ffi::FfiContext;
use plugin_api::ffi::{
    FfiBusEvent, FfiCall, FfiHandleResult, FfiHealth, FfiInitArgs, FfiInstance, FfiRequest,
    FfiSocketEvent, FfiSockets, PluginModRef,
};
use tokio::sync::Notify;

use crate::boundary::bulkhead::Bulkhead;
use crate::boundary::loader::PluginLibrary;
use crate::boundary::repeats::{Repeats, INTERVAL};
use crate::boundary::services::host_fns;

/// One live microserver instance inside a plugin library. Dropping it drops the
/// plugin's object (in the plugin's own code).
pub struct Instance {
    library: Arc<PluginLibrary>,
    /// The library's root module (an instance exists only for a library open here).
    module: PluginModRef,
    ptr: FfiInstance,
    /// How long a plugin runtime of the instance gets to stop when it is dropped (see
    /// [`Instance::stop_within`]).
    stop_wait_ms: AtomicU64,
    /// Held while the plugin's health hook runs on a blocking thread, so one call runs
    /// at a time: a hook that hangs holds one thread, not one more per health request.
    health_gate: Arc<tokio::sync::Semaphore>,
}

/// How long a plugin's health hook gets before it counts as unhealthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(1000);

/// The time a dropped instance's runtime gets to cancel its tasks and join its threads
/// unless the host says otherwise.
const DEFAULT_STOP_WAIT: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("plugin", &self.library.name)
            .finish()
    }
}

/// The routes a plugin declared in its init, copied into host memory: (method, pattern)
/// in route-index order, and the index of the fallback route, if any. What they match is
/// routing's business (a layer above this one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclaredRoutes {
    pub routes: Vec<(String, String)>,
    pub fallback: Option<u32>,
    /// By route index: `Some(limit)` for a route that takes its body as a stream.
    pub stream_body_limits: Vec<Option<u64>>,
    /// By route index: whether it is a WebSocket route.
    pub websockets: Vec<bool>,
    /// The bus topics it subscribes to, by subscription index.
    pub topics: Vec<Box<str>>,
}

impl Instance {
    /// Calls the plugin's init, and returns the instance and the routes it declares.
    pub fn create(
        library: Arc<PluginLibrary>,
        server_name: &str,
        config_json: &str,
        previous_state: Option<&[u8]>,
        sockets: FfiSockets,
    ) -> Result<(Instance, DeclaredRoutes), String> {
        let args = FfiInitArgs {
            server_name: server_name.into(),
            config_json: config_json.into(),
            previous_state: previous_state.map(RSlice::from_slice).into(),
            host: host_fns(),
            sockets,
        };
        let Some(module) = library.module else {
            return Err(
                "this build was checked in a separate process only, for worker processes (isolation: \"process\"); it is opened in the host at the next change of its file"
                    .to_owned(),
            );
        };
        let init = match (module.init())(args) {
            RResult::ROk(init) => init,
            RResult::RErr(message) => return Err(message.to_string()),
        };
        let instance = Instance {
            library,
            module,
            ptr: init.instance,
            stop_wait_ms: AtomicU64::new(DEFAULT_STOP_WAIT.as_millis() as u64),
            health_gate: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        let routes = DeclaredRoutes {
            routes: init
                .routes
                .iter()
                .map(|r| (r.method.to_string(), r.pattern.to_string()))
                .collect(),
            fallback: init.fallback.into_option(),
            stream_body_limits: init
                .routes
                .iter()
                .map(|r| r.stream_body_limit.into_option())
                .collect(),
            websockets: init.routes.iter().map(|r| r.websocket).collect(),
            topics: init.topics.iter().map(|t| t.as_str().into()).collect(),
        };
        Ok((instance, routes))
    }

    pub fn library(&self) -> &Arc<PluginLibrary> {
        &self.library
    }

    /// Starts handling a request and polls the handler once (see `call::start`, which
    /// is the only caller). The plugin catches the handler's panics itself.
    ///
    /// # Safety
    /// `out` points at room for one outcome, which the plugin writes when the returned
    /// call has a null future.
    pub(crate) unsafe fn handle(
        &self,
        request: FfiRequest,
        cx: &mut FfiContext<'_>,
        out: *mut FfiHandleResult,
    ) -> FfiCall {
        // SAFETY: `ptr` is this library's live instance (freed only by our drop); `out`
        // has room for one outcome (`call::start`'s slot).
        unsafe { (self.module.handle())(self.ptr, request, cx, out) }
    }

    /// Hands a WebSocket event to the instance and polls its handler once (like
    /// `handle`; see `call::start_event`, the only caller).
    ///
    /// # Safety
    /// As `handle`.
    pub(crate) unsafe fn socket_event(
        &self,
        event: FfiSocketEvent,
        cx: &mut FfiContext<'_>,
        out: *mut FfiHandleResult,
    ) -> FfiCall {
        // SAFETY: as in `handle`.
        unsafe { (self.module.socket_event())(self.ptr, event, cx, out) }
    }

    /// Hands a bus event to the instance (see `call::start_bus_event`, the only caller).
    ///
    /// # Safety
    /// As `handle`.
    pub(crate) unsafe fn bus_event(
        &self,
        event: FfiBusEvent,
        cx: &mut FfiContext<'_>,
        out: *mut FfiHandleResult,
    ) -> FfiCall {
        // SAFETY: as in `handle`.
        unsafe { (self.module.bus_event())(self.ptr, event, cx, out) }
    }

    /// The state this instance hands to its successor, copied into host memory.
    pub fn export_state(&self) -> Option<Vec<u8>> {
        // SAFETY: `ptr` is this library's live instance.
        unsafe { (self.module.export_state())(self.ptr) }
            .into_option()
            .map(|bytes| bytes.into_vec())
    }

    pub fn shutdown(&self) {
        // SAFETY: `ptr` is this library's live instance.
        unsafe { (self.module.shutdown())(self.ptr) };
    }

    /// Calls the plugin's health hook and copies its answer into host memory. Blocks as
    /// long as the hook does (see [`Generation::health`]).
    fn health(&self, hook: FfiHealth) -> Result<(), String> {
        // SAFETY: `ptr` is this library's live instance (the caller holds its
        // generation), and `hook` is this library's.
        let answer = unsafe { hook(self.ptr) };
        answer
            .into_result()
            .map_err(|reason| reason.as_str().to_owned())
    }

    /// Sets how long the plugin's runtime (if it has one) gets to cancel its tasks and
    /// join its threads when this instance is dropped.
    pub fn stop_within(&self, wait: Duration) {
        let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.stop_wait_ms.store(millis, Ordering::Relaxed);
    }
}

impl Drop for Instance {
    /// Frees the instance in the plugin, which also stops its runtime if it has one
    /// (joining its threads, for up to the stop wait). That may block: when the last
    /// reference goes on one of the host's runtime threads (a request or a stream that
    /// outlived its generation's drain), it is done on a thread of its own instead.
    fn drop(&mut self) {
        let wait = *self.stop_wait_ms.get_mut();
        let (library, module, ptr) = (self.library.clone(), self.module, self.ptr);
        let free = move || {
            // SAFETY: `ptr` is this library's live instance, freed here, once (the
            // `Instance` that owned it is being dropped). The library stays mapped.
            unsafe { (module.drop_instance())(ptr, wait) };
            drop(library);
        };
        if tokio::runtime::Handle::try_current().is_err() {
            free();
            return;
        }
        let free = std::sync::Arc::new(std::sync::Mutex::new(Some(free)));
        let on_thread = free.clone();
        let spawned = std::thread::Builder::new()
            .name("plugin-drop".to_owned())
            .spawn(move || {
                crate::boundary::services::mark_host_thread();
                let taken = on_thread.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(free) = taken {
                    free();
                }
            });
        if spawned.is_err() {
            let taken = free.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(free) = taken {
                free();
            }
        }
    }
}

/// One instance serving one server, numbered per server from 1, with what routes
/// requests to it (`R`: the layer above builds it from the [`DeclaredRoutes`]).
#[derive(Debug)]
pub struct Generation<R> {
    pub server: Arc<str>,
    pub number: u64,
    pub instance: Instance,
    pub routes: R,
    in_flight: AtomicUsize,
    idle: Notify,
    /// Set when the generation is replaced; no request may enter after that.
    retired: AtomicBool,
    hook: Mutex<Hook>,
    hook_done: Condvar,
    /// Set when the drain deadline has passed: streamed responses still running on this
    /// generation end (see [`Generation::cut_off`]).
    cut: tokio::sync::watch::Sender<bool>,
    /// Handler panics, logged one line each with repeats summarised.
    pub panics: PanicLog,
    /// Its server's bound on plugin polls at once (shared by the server's generations).
    pub bulkhead: Arc<Bulkhead>,
}

/// Where a generation's shutdown hook is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    NotRun,
    Running,
    Done,
}

impl<R: Send + Sync + 'static> Generation<R> {
    /// The plugin's own health: its hook's answer, asked on a blocking thread and
    /// waited for at most [`HEALTH_TIMEOUT`]. A plugin without the hook is healthy. A
    /// hook that panics is unhealthy with the panic's message (plugin-api catches it).
    /// One call runs at a time: a caller that finds one running waits for it (within
    /// its own timeout), so a hook that hangs holds one blocking thread, however often
    /// health is asked.
    pub async fn health(self: &Arc<Self>) -> Result<(), String> {
        let Some(hook) = self.instance.library.health else {
            return Ok(());
        };
        let generation = self.clone();
        let asked = async move {
            // One call at a time: a caller waits for the one running (quick, unless it
            // hangs, and then this one times out too).
            let gate = generation.instance.health_gate.clone();
            let Ok(turn) = gate.acquire_owned().await else {
                return Ok(());
            };
            let call = tokio::task::spawn_blocking(move || {
                let answer = generation.instance.health(hook);
                drop(turn);
                answer
            });
            call.await
                .unwrap_or_else(|e| Err(format!("the health hook could not run: {e}")))
        };
        match tokio::time::timeout(HEALTH_TIMEOUT, asked).await {
            Ok(answer) => answer,
            Err(_) => Err(format!(
                "the health hook did not answer within {} ms",
                HEALTH_TIMEOUT.as_millis()
            )),
        }
    }
}

impl<R> Generation<R> {
    pub fn new(
        server: Arc<str>,
        number: u64,
        instance: Instance,
        routes: R,
        bulkhead: Arc<Bulkhead>,
    ) -> Arc<Self> {
        let panics = PanicLog {
            server: server.clone(),
            plugin: instance.library().name.clone(),
            generation: number,
            repeats: Arc::default(),
        };
        Arc::new(Generation {
            server,
            number,
            instance,
            routes,
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            retired: AtomicBool::new(false),
            hook: Mutex::new(Hook::NotRun),
            hook_done: Condvar::new(),
            cut: tokio::sync::watch::Sender::new(false),
            panics,
            bulkhead,
        })
    }

    pub fn plugin(&self) -> &PluginLibrary {
        self.instance.library()
    }

    /// Counts a request as in flight on this generation until the guard is dropped.
    /// `None` if the generation was retired meanwhile: the caller looks up the server's
    /// current generation again.
    ///
    /// The increment and the `retired` check here, and the `retired` store and the count
    /// check in [`Generation::drain`], are all SeqCst: either this request sees the flag
    /// and backs out, or the drain sees the request and waits for it. Never neither.
    pub fn enter(self: &Arc<Self>) -> Option<InFlight<R>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight {
            generation: self.clone(),
        };
        if self.retired.load(Ordering::SeqCst) {
            return None; // dropping the guard gives the count back
        }
        Some(guard)
    }

    /// Stops new requests from entering. Requests already in flight carry on.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Retires the generation and waits until no request is in flight, or `deadline`
    /// passes. True if drained.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.retire();
        let wait = async {
            loop {
                let idle = self.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.in_flight() == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }

    /// Ends what still runs on this generation after its drain deadline: every streamed
    /// response ends cleanly at its next poll (the body stops, its stream is dropped).
    /// Handlers still running are not touched (the request timeout ends them).
    pub fn cut_off(&self) {
        self.cut.send_replace(true);
    }

    /// Completes once [`cut_off`](Self::cut_off) has been called.
    pub fn cut_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut cut = self.cut.subscribe();
        async move {
            // An error means the generation is gone, which a caller holding it in flight
            // never sees; either way there is nothing left to wait for.
            let _ = cut.wait_for(|cut| *cut).await;
        }
    }

    /// Calls the plugin's shutdown hook, once: a second caller returns at once, whether
    /// the hook has finished or is still running on another thread (see
    /// [`wait_for_shutdown`](Self::wait_for_shutdown)).
    pub fn shutdown(&self) {
        {
            let mut hook = self.hook.lock().unwrap_or_else(|p| p.into_inner());
            if *hook != Hook::NotRun {
                return;
            }
            *hook = Hook::Running;
        }
        self.instance.shutdown();
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = Hook::Done;
        self.hook_done.notify_all();
    }

    /// Waits until the shutdown hook has returned, or `deadline` passes. True if it has
    /// returned.
    pub fn wait_for_shutdown(&self, deadline: Instant) -> bool {
        let mut hook = self.hook.lock().unwrap_or_else(|p| p.into_inner());
        while *hook != Hook::Done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            hook = self
                .hook_done
                .wait_timeout(hook, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// A generation's handler panics in the log: the first panic of a route is one ERROR
/// line; further panics of that route within [`INTERVAL`] are counted and summarised in
/// one line when the interval ends. A panicking route cannot flood the log.
#[derive(Debug)]
pub struct PanicLog {
    server: Arc<str>,
    plugin: String,
    generation: u64,
    /// By route index.
    repeats: Arc<Repeats<u32>>,
}

impl PanicLog {
    /// Logs (or counts) a panic of `route` (described as `METHOD /pattern`).
    pub fn report(&self, route: u32, described: &str, request_id: &str, message: &str) {
        let (server, plugin, generation) =
            (self.server.clone(), self.plugin.clone(), self.generation);
        let route_name = described.to_owned();
        let first = self.repeats.first(
            route,
            || format!("{message} (request {request_id})"),
            move |count, last| {
                tracing::error!(
                    %server,
                    %plugin,
                    generation,
                    route = route_name.as_str(),
                    repeats = count,
                    "handler panicked {count} more time(s) in the last {} s; the last: {last}",
                    INTERVAL.as_secs()
                );
            },
        );
        if first {
            tracing::error!(
                server = %self.server,
                plugin = %self.plugin,
                generation = self.generation,
                route = described,
                request_id,
                "handler panicked: {message}"
            );
        }
    }
}

/// Marks a request in flight on a generation, and keeps the generation alive.
#[derive(Debug)]
pub struct InFlight<R> {
    generation: Arc<Generation<R>>,
}

impl<R> InFlight<R> {
    pub fn generation(&self) -> &Arc<Generation<R>> {
        &self.generation
    }
}

impl<R> Drop for InFlight<R> {
    fn drop(&mut self) {
        // Only a retired generation has anyone waiting (see `enter` for why SeqCst on
        // both sides makes this check race-free).
        if self.generation.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.generation.retired.load(Ordering::SeqCst)
        {
            self.generation.idle.notify_waiters();
        }
    }
}
