//! What the host lends a plugin: logging into the host's tracing output, and timers.
//!
//! A plugin library has its own copy of every static, tokio's and tracing's included, so
//! `tokio::time::sleep` or `tokio::spawn` inside a plugin panic ("no reactor running").
//! The host's functions return futures the host built, which run on the host's runtime.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
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
    // name, instead of this library's own copy of std printing to stderr.
    std::panic::set_hook(Box::new(|info| {
        let message = panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log(1, "panic", &format!("panicked{location}: {message}"), "");
    }));
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

/// Waits for `duration` on the host's timer. Use this instead of `tokio::time::sleep`,
/// which cannot work inside a plugin.
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
    sleep(nanos)
}
