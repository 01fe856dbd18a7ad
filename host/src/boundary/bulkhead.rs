//! Bulkheads: how many of a server's plugin polls may run at the same time on the host's
//! threads (`servers[].max_threads`), so that a handler that blocks or spins holds at
//! most that many of the runtime's worker threads and the other servers keep the rest;
//! and the watchdog that logs a poll holding its thread longer than
//! `global.blocking_warn_ms`.
//!
//! A poll of plugin code (a handler's first poll, each later one, a WebSocket or bus
//! event's) takes a permit first ([`Bulkhead::try_poll`]: one compare-and-swap on the
//! server's count) and gives it back when the plugin returns. When none is free, the
//! task waits to be woken ([`Bulkhead::poll_enter`], a tokio `Notify`): it does not
//! spin, and the worker thread serves other tasks meanwhile.
//!
//! The watchdog sees which poll each thread is in without any clock read on the request
//! path: a poll notes the watchdog's tick count and the route's [`Label`] in its
//! thread's slot (two stores), and clears it when it ends (one); the watchdog thread
//! advances the count and looks at the slots each tick.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use crate::boundary::repeats::{Repeats, INTERVAL};

/// The runtime's worker threads, as `main` built it (for the default bound).
static WORKERS: AtomicUsize = AtomicUsize::new(0);

/// Records how many worker threads the host's runtime has.
pub fn set_workers(workers: usize) {
    WORKERS.store(workers, Ordering::Relaxed);
}

/// A server's bound when its config sets none: all the runtime's worker threads but
/// one (at least one), so that one server's blocking handlers always leave a thread to
/// the others and to the connections.
pub fn default_limit() -> usize {
    let workers = match WORKERS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    workers.saturating_sub(1).max(1)
}

/// One server's bound on plugin polls running at once. Shared by its generations, so a
/// reload does not double it.
#[derive(Debug)]
pub struct Bulkhead {
    running: AtomicUsize,
    limit: AtomicUsize,
    /// Tasks waiting for a permit (only they make a release wake anyone).
    waiting: AtomicUsize,
    free: Arc<Notify>,
    /// The label of the server's WebSocket and bus events.
    events: Label,
}

impl Bulkhead {
    /// A bound of `limit` polls at once for the server `server`.
    pub fn new(limit: usize, server: &Arc<str>) -> Arc<Self> {
        Arc::new(Bulkhead {
            running: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit.max(1)),
            waiting: AtomicUsize::new(0),
            free: Arc::new(Notify::new()),
            events: label(server, "an event (WebSocket or bus)"),
        })
    }

    /// The label of the server's WebSocket and bus event handlers.
    pub fn event_label(&self) -> Label {
        self.events
    }

    /// Changes the bound (a config change): polls already running finish; waiting tasks
    /// look again.
    pub fn set_limit(&self, limit: usize) {
        if self.limit.swap(limit.max(1), Ordering::SeqCst) != limit.max(1) {
            self.free.notify_waiters();
        }
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// A permit for one poll of plugin code on this thread, if one is free.
    #[inline]
    pub fn try_poll(&self, label: Label) -> Option<Polling<'_>> {
        let limit = self.limit.load(Ordering::Relaxed);
        self.running
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(Polling::start(self, label))
    }

    /// A permit, or `Pending` with `cx`'s task woken when one may be free. `turn` keeps
    /// the task's place while it waits (drop it to give up).
    pub fn poll_enter<'b>(
        self: &'b Arc<Self>,
        turn: &mut Turn,
        label: Label,
        cx: &mut Context<'_>,
    ) -> Poll<Polling<'b>> {
        loop {
            if let Some(permit) = self.try_poll(label) {
                turn.stop();
                return Poll::Ready(permit);
            }
            match &mut turn.waiting {
                None => {
                    // Counted before the next try: a release either sees the count (and
                    // wakes a waiter) or happened before the try (which then succeeds).
                    self.waiting.fetch_add(1, Ordering::SeqCst);
                    turn.waiting = Some((self.clone(), self.registered()));
                }
                Some((_, notified)) => {
                    if notified.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    *notified = self.registered();
                }
            }
        }
    }

    fn registered(&self) -> Pin<Box<OwnedNotified>> {
        let mut notified = Box::pin(self.free.clone().notified_owned());
        notified.as_mut().enable();
        notified
    }

    #[inline]
    fn release(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.free.notify_one();
        }
    }
}

/// A task's place in a bulkhead's queue while it waits for a permit.
#[derive(Default)]
pub struct Turn {
    waiting: Option<(Arc<Bulkhead>, Pin<Box<OwnedNotified>>)>,
}

impl Turn {
    fn stop(&mut self) {
        if let Some((bulkhead, notified)) = self.waiting.take() {
            // A wake-up it received but did not use goes to the next waiter.
            drop(notified);
            bulkhead.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One poll of plugin code holding a permit; dropping it ends the poll.
pub struct Polling<'a> {
    bulkhead: &'a Bulkhead,
}

impl<'a> Polling<'a> {
    #[inline]
    fn start(bulkhead: &'a Bulkhead, label: Label) -> Self {
        watch_start(label);
        Polling { bulkhead }
    }
}

impl Drop for Polling<'_> {
    #[inline]
    fn drop(&mut self) {
        watch_end();
        self.bulkhead.release();
    }
}

/// A future of plugin code (a handler or an event still running), each of whose polls
/// takes a permit of its server's bulkhead first.
pub struct Bounded<F> {
    inner: F,
    bulkhead: Arc<Bulkhead>,
    label: Label,
    turn: Turn,
}

impl<F> Bounded<F> {
    pub fn new(inner: F, bulkhead: Arc<Bulkhead>, label: Label) -> Self {
        Bounded {
            inner,
            bulkhead,
            label,
            turn: Turn::default(),
        }
    }

    /// The future, for its owner to drop in the order it needs.
    pub fn into_inner(self) -> F {
        self.inner
    }
}

impl<F: Future + Unpin> Future for Bounded<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let permit = std::task::ready!(this.bulkhead.poll_enter(&mut this.turn, this.label, cx));
        let out = Pin::new(&mut this.inner).poll(cx);
        drop(permit);
        out
    }
}

/// Waits for a permit (for a first poll that found none free).
pub async fn permit(bulkhead: &Arc<Bulkhead>, label: Label) -> Polling<'_> {
    let mut turn = Turn::default();
    std::future::poll_fn(|cx| bulkhead.poll_enter(&mut turn, label, cx)).await
}

/// A server and one of its routes, named in the watchdog's line; interned, so that a
/// poll notes a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(u32);

impl Label {
    /// A poll of a route table that was never labelled (a library user's, such as the
    /// criterion bench): the watchdog names no route for it.
    pub const UNNAMED: Label = Label(u32::MAX);
}

#[derive(Default)]
struct Labels {
    ids: HashMap<(Arc<str>, Box<str>), u32>,
    names: Vec<(Arc<str>, Box<str>)>,
}

fn labels() -> &'static Mutex<Labels> {
    static LABELS: OnceLock<Mutex<Labels>> = OnceLock::new();
    LABELS.get_or_init(Mutex::default)
}

/// The label of `route` (as `METHOD /pattern`) of `server`: the same one each time.
pub fn label(server: &Arc<str>, route: &str) -> Label {
    let mut labels = labels().lock().unwrap_or_else(|p| p.into_inner());
    let key = (server.clone(), Box::<str>::from(route));
    if let Some(id) = labels.ids.get(&key) {
        return Label(*id);
    }
    let id = labels.names.len() as u32;
    labels.names.push(key.clone());
    labels.ids.insert(key, id);
    Label(id)
}

fn label_names(label: u32) -> Option<(Arc<str>, Box<str>)> {
    let labels = labels().lock().unwrap_or_else(|p| p.into_inner());
    labels.names.get(label as usize).cloned()
}

/// What one thread is polling: the tick its poll began in, plus one (0: none), and the
/// poll's label.
#[derive(Default)]
struct Slot {
    since: AtomicU64,
    label: AtomicU32,
}

/// The watchdog's tick count.
static TICKS: AtomicU64 = AtomicU64::new(0);
/// `global.blocking_warn_ms`; 0: off.
static WARN_MS: AtomicU64 = AtomicU64::new(0);
/// In a worker process, the request timeout: a poll that holds its thread longer ends
/// the process (its host starts another); 0: never.
static END_MS: AtomicU64 = AtomicU64::new(0);

/// Makes the watchdog end this process when a plugin poll holds its thread for `after`
/// (a worker process: its host replaces it, where a host could only warn).
pub fn end_process_after(after: Duration) {
    END_MS.store(
        u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1),
        Ordering::Relaxed,
    );
}

fn slots() -> &'static Mutex<Vec<Arc<Slot>>> {
    static SLOTS: OnceLock<Mutex<Vec<Arc<Slot>>>> = OnceLock::new();
    SLOTS.get_or_init(Mutex::default)
}

/// A thread's slot, listed for the watchdog while the thread lives.
struct ThreadSlot(Arc<Slot>);

impl ThreadSlot {
    fn new() -> Self {
        let slot = Arc::new(Slot::default());
        slots()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot.clone());
        ThreadSlot(slot)
    }
}

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        let mut slots = slots().lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|s| !Arc::ptr_eq(s, &self.0));
    }
}

thread_local! {
    static SLOT: ThreadSlot = ThreadSlot::new();
}

#[inline]
fn watch_start(label: Label) {
    let _ = SLOT.try_with(|slot| {
        slot.0.label.store(label.0, Ordering::Relaxed);
        slot.0
            .since
            .store(TICKS.load(Ordering::Relaxed) + 1, Ordering::Release);
    });
}

#[inline]
fn watch_end() {
    let _ = SLOT.try_with(|slot| slot.0.since.store(0, Ordering::Release));
}

/// Sets how long a poll may hold its thread before the watchdog logs it (0: never).
pub fn set_blocking_warn(warn: Duration) {
    WARN_MS.store(
        u64::try_from(warn.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// Starts the watchdog thread (once; later calls do nothing). Its lines are summed up
/// per route over 5 s through tasks on `runtime`.
pub fn start_watchdog(runtime: tokio::runtime::Handle) {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("blocking-watchdog".to_owned())
            .spawn(move || {
                let _entered = runtime.enter();
                watchdog();
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the blocking-poll watchdog: {e}");
        }
    });
}

fn watchdog() {
    let repeats: Arc<Repeats<u32>> = Arc::default();
    // The polls already reported: (slot, the tick it began in).
    let mut reported: HashSet<(usize, u64)> = HashSet::new();
    loop {
        let warn = WARN_MS.load(Ordering::Relaxed);
        let end = END_MS.load(Ordering::Relaxed);
        if warn == 0 && end == 0 {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        // A quarter of the threshold: a poll is reported once it has run between 1 and
        // 1.25 times it (`held_ms`, what is sure, is the lower figure).
        let basis = match (warn, end) {
            (0, end) => end,
            (warn, 0) => warn,
            (warn, end) => warn.min(end),
        };
        let tick = (basis / 4).clamp(5, 250);
        std::thread::sleep(Duration::from_millis(tick));
        let now = TICKS.fetch_add(1, Ordering::Relaxed) + 1;
        let slots: Vec<Arc<Slot>> = slots().lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut still = HashSet::new();
        for slot in &slots {
            let since = slot.since.load(Ordering::Acquire);
            if since == 0 {
                continue;
            }
            // Begun in tick `since - 1`, so running for at least the ticks since then.
            let held_ms = now.saturating_sub(since) * tick;
            if end > 0 && held_ms >= end {
                let label = slot.label.load(Ordering::Relaxed);
                let (server, route) = label_names(label).unwrap_or_default();
                tracing::error!(
                    %server,
                    route = %route,
                    held_ms,
                    "a handler held its thread past the request timeout (global.limits.request_timeout_ms): ending this worker process, which its host replaces"
                );
                super::worker::end_now(super::worker::EXIT_HELD_TOO_LONG);
            }
            if warn == 0 || held_ms < warn {
                continue;
            }
            let key = (Arc::as_ptr(slot) as usize, since);
            still.insert(key);
            if !reported.insert(key) {
                continue;
            }
            let label = slot.label.load(Ordering::Relaxed);
            let Some((server, route)) = label_names(label) else {
                continue;
            };
            let first = repeats.first(
                label,
                String::new,
                {
                    let (server, route) = (server.clone(), route.clone());
                    move |count, _| {
                        tracing::warn!(
                            %server,
                            route = %route,
                            "a plugin poll held a runtime thread past global.blocking_warn_ms {count} more time(s) in the last {} s",
                            INTERVAL.as_secs()
                        )
                    }
                },
            );
            if first {
                tracing::warn!(
                    %server,
                    route = %route,
                    held_ms,
                    blocking_warn_ms = warn,
                    "a plugin poll has held a runtime thread for at least {held_ms} ms: the handler blocks or spins instead of awaiting (servers[].max_threads bounds how many threads the server can hold)"
                );
            }
        }
        reported.retain(|k| still.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop_cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    #[test]
    fn permits_are_bounded_and_given_back() {
        let bulkhead = Bulkhead::new(2, &Arc::from("s"));
        let l = label(&Arc::from("s"), "GET /");
        let a = bulkhead.try_poll(l).expect("first");
        let b = bulkhead.try_poll(l).expect("second");
        assert!(bulkhead.try_poll(l).is_none(), "over the bound");
        drop(a);
        let c = bulkhead.try_poll(l).expect("given back");
        drop((b, c));
        assert_eq!(bulkhead.running.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_waiting_task_is_woken_by_a_release() {
        let bulkhead = Bulkhead::new(1, &Arc::from("s"));
        let l = label(&Arc::from("s"), "GET /");
        let held = bulkhead.try_poll(l).expect("free");
        let mut turn = Turn::default();
        assert!(bulkhead
            .poll_enter(&mut turn, l, &mut noop_cx())
            .is_pending());
        assert_eq!(bulkhead.waiting.load(Ordering::SeqCst), 1);
        let waiter = {
            let bulkhead = bulkhead.clone();
            tokio::spawn(async move {
                let _p = permit(&bulkhead, l).await;
            })
        };
        tokio::task::yield_now().await;
        drop(turn); // the first waiter gives up: its place goes
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(bulkhead.waiting.load(Ordering::SeqCst), 0);
        assert_eq!(bulkhead.running.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_raised_bound_lets_more_in() {
        let bulkhead = Bulkhead::new(1, &Arc::from("s"));
        let l = label(&Arc::from("s"), "GET /");
        let _a = bulkhead.try_poll(l).expect("free");
        assert!(bulkhead.try_poll(l).is_none());
        bulkhead.set_limit(2);
        assert!(bulkhead.try_poll(l).is_some());
    }

    #[test]
    fn labels_are_interned() {
        let s: Arc<str> = Arc::from("labels");
        assert_eq!(label(&s, "GET /a"), label(&s, "GET /a"));
        assert_ne!(label(&s, "GET /a"), label(&s, "GET /b"));
        let Label(id) = label(&s, "GET /b");
        assert_eq!(label_names(id).map(|(_, r)| r), Some("GET /b".into()));
    }
}
