//! What the host lends a plugin: logging into the host's tracing output, and timers.
//!
//! A plugin library has its own copy of every static, tokio's and tracing's included, so
//! without a runtime of its own (`export_plugin!(T, tokio)`), `tokio::time::sleep` or
//! `tokio::spawn` inside a plugin panic ("no reactor running"). The host's functions
//! return futures the host built, which run on the host's runtime.

use std::cell::Cell;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use abi_stable::std_types::RStr;
use tracing_core::field::{Field, Visit};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::{Event, Level, LevelFilter, Metadata, Subscriber};

use crate::ffi::{FfiLogRecord, HostFnsRef};

struct HostLink {
    fns: HostFnsRef,
    plugin: &'static str,
}

static HOST: OnceLock<HostLink> = OnceLock::new();

/// Records the host's functions the first time any instance of this library is created,
/// and routes this library's `tracing` events and panic messages to the host.
pub(crate) fn connect(fns: HostFnsRef, plugin: &'static str) {
    connect_with(fns, plugin, true);
}

/// As [`connect`]; without the panic hook when `panic_hook` is false (`testing`: a test
/// binary keeps its own hook, with its backtraces).
pub(crate) fn connect_with(fns: HostFnsRef, plugin: &'static str, panic_hook: bool) {
    let mut first = false;
    HOST.get_or_init(|| {
        first = true;
        HostLink { fns, plugin }
    });
    if !first {
        return;
    }
    // This library's copy of tracing has no subscriber of its own; give it one that
    // forwards to the host. Failing means the plugin installed its own, which is its call.
    let _ = tracing_core::dispatcher::set_global_default(tracing_core::Dispatch::new(Forwarder {
        max: level_filter((fns.max_log_level())()),
        spans: AtomicU64::new(1),
    }));
    // Panics inside this library are reported through the host's log, with the plugin's
    // name, instead of this library's own copy of std printing to stderr. On one of the
    // host's threads, plugin code runs only inside plugin-api's entry points, which catch
    // every panic and report it once, where they know what failed (the host logs a
    // handler's panic with the server, route and request id): there the hook only notes
    // the message and its location for them. (Asked of the host at panic time, so the
    // request path touches no thread-local: in a `cdylib` each access is a call into the
    // dynamic loader, and it cost about 3% of a request's CPU.)
    if !panic_hook {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let message = panic_message(info.payload());
        let text = match info.location() {
            Some(l) => format!("{message} (at {}:{})", l.file(), l.line()),
            None => message,
        };
        if on_host_thread() && CAUGHT.try_with(|c| c.set(Some(text.clone()))).is_ok() {
            return;
        }
        log_panic(&format!("panicked: {text}"));
    }));
}

/// The host's functions, once an instance of this library was created by a host.
pub(crate) fn fns() -> Option<HostFnsRef> {
    HOST.get().map(|host| host.fns)
}

/// Whether this thread is one of the host's (a host too old to say: no).
fn on_host_thread() -> bool {
    HOST.get()
        .and_then(|host| host.fns.on_host_thread())
        .is_some_and(|asks| asks())
}

thread_local! {
    /// The message and location of the last panic on this (host) thread, for the
    /// plugin-api catch that is about to report it.
    static CAUGHT: Cell<Option<String>> = const { Cell::new(None) };
}

/// The text (message and location) of the panic just caught on this thread.
pub(crate) fn take_caught() -> Option<String> {
    CAUGHT.try_with(Cell::take).ok().flatten()
}

/// Logs a panic that no handler reports (one in a shutdown hook, a drop or a waker)
/// through the host, with the plugin's name.
pub(crate) fn log_panic(message: &str) {
    log(1, "panic", message, "");
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn log(level: u8, target: &str, message: &str, fields: &str) {
    if let Some(host) = HOST.get() {
        (host.fns.log())(FfiLogRecord {
            level,
            plugin: RStr::from_str(host.plugin),
            target: RStr::from_str(target),
            message: RStr::from_str(message),
            fields: RStr::from_str(fields),
        });
    }
}

fn level_filter(n: u8) -> LevelFilter {
    match n {
        0 => LevelFilter::OFF,
        1 => LevelFilter::ERROR,
        2 => LevelFilter::WARN,
        3 => LevelFilter::INFO,
        4 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

fn level_number(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

/// A tracing subscriber that formats each event and hands it to the host.
struct Forwarder {
    max: LevelFilter,
    spans: AtomicU64,
}

#[derive(Default)]
struct EventText {
    message: String,
    fields: String,
}

impl Visit for EventText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            if !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}

impl Subscriber for Forwarder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.spans.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut text = EventText::default();
        event.record(&mut text);
        let meta = event.metadata();
        log(
            level_number(meta.level()),
            meta.target(),
            &text.message,
            &text.fields,
        );
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Waits for `duration` on the host's timer: the timer of a plugin without a runtime of
/// its own (in one declared with `export_plugin!(T, tokio)`, `tokio::time::sleep` works
/// too, and so does this, in handlers and in the plugin's own tasks).
///
/// ```no_run
/// # async fn f() {
/// plugin_api::sleep(std::time::Duration::from_millis(50)).await;
/// # }
/// ```
///
/// # Panics
/// If called before the plugin was initialised by a host (for example in a unit test
/// that calls a handler directly). Inside a handler, that panic answers 500 like any
/// other.
pub fn sleep(duration: Duration) -> impl Future<Output = ()> + Send + 'static {
    // Fields up to `last_prefix_field` are always present; only functions added in later
    // versions are `Option`s.
    let sleep = HOST
        .get()
        .expect("plugin_api::sleep needs a running host (call it from a handler)")
        .fns
        .sleep();
    let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    HostFuture {
        inner: sleep(nanos),
        waker: None,
    }
}

/// A future the host built, polled with a waker of plugin-api's own. The host wakes it
/// from its own threads; if it called the waker of the plugin's context directly and
/// that waker panicked (a waker the plugin made itself), the panic would unwind through
/// async-ffi's `extern "C"` glue and abort the host. [`ContainedWaker`] catches it.
pub(crate) struct HostFuture<F> {
    inner: F,
    waker: Option<(Arc<ContainedWaker>, Waker)>,
}

impl<F> HostFuture<F> {
    pub(crate) fn new(inner: F) -> Self {
        HostFuture { inner, waker: None }
    }
}

impl<F: Future + Unpin> Future for HostFuture<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let (contained, waker) = this.waker.get_or_insert_with(|| {
            let contained = Arc::new(ContainedWaker(Mutex::new(None)));
            (contained.clone(), Waker::from(contained))
        });
        contained.set(cx.waker());
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(waker))
    }
}

/// Holds the waker of the plugin's context, and wakes it under a catch.
struct ContainedWaker(Mutex<Option<Waker>>);

impl ContainedWaker {
    fn set(&self, waker: &Waker) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            // Runs inside the plugin's poll: a panic here is the handler's, and caught
            // with it.
            *slot = Some(waker.clone());
        }
    }
}

impl Wake for ContainedWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Cloned out of the lock first: a waker may poll the task on the spot, and that
        // poll takes the lock.
        let woken = crate::export::catch(|| {
            let waker = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(waker) = waker {
                waker.wake();
            }
        });
        if let Err(message) = woken {
            log_panic(&format!("a waker panicked (the task it would wake may hang until its request times out): {message}"));
        }
    }
}

impl Drop for ContainedWaker {
    fn drop(&mut self) {
        let waker = self.0.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(message) = crate::export::catch(move || drop(waker)) {
            log_panic(&format!("a waker panicked while it was dropped: {message}"));
        }
    }
}
