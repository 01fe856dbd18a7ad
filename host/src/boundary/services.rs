//! Functions the host lends to plugins (see `plugin_api::ffi::HostFns`).
//!
//! They run host code on behalf of a plugin: log events land in the host's subscriber,
//! and timers are tokio timers on the host's runtime. None of them may panic, because a
//! panic cannot unwind through the plugin's frames.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use abi_stable::prefix_type::PrefixTypeTrait;
use async_ffi::FfiFuture;
use plugin_api::ffi::{FfiLogRecord, HostFns, HostFnsRef};
use tracing::level_filters::LevelFilter;

use crate::boundary::repeats::{Repeats, INTERVAL};

/// The table handed to every plugin's init.
pub fn host_fns() -> HostFnsRef {
    static FNS: OnceLock<HostFnsRef> = OnceLock::new();
    *FNS.get_or_init(|| {
        HostFns {
            max_log_level,
            log,
            sleep,
            on_host_thread,
        }
        .leak_into_prefix()
    })
}

extern "C" fn max_log_level() -> u8 {
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

extern "C" fn log(record: FfiLogRecord<'_>) {
    let plugin = record.plugin.as_str();
    let module = record.target.as_str();
    let message = record.message.as_str();
    if module == "panic" && !first_of_its_kind(plugin, message) {
        return;
    }
    let sep = if record.fields.is_empty() { "" } else { " " };
    let fields = record.fields.as_str();
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(target: "plugin", $level, plugin, module, "{message}{sep}{fields}")
        };
    }
    match record.level {
        1 => emit!(tracing::Level::ERROR),
        2 => emit!(tracing::Level::WARN),
        3 => emit!(tracing::Level::INFO),
        4 => emit!(tracing::Level::DEBUG),
        _ => emit!(tracing::Level::TRACE),
    }
}

/// The host's runtime, for host futures a plugin polls on a thread of its own (a task on
/// its own tokio runtime, or `block_on` in its `init`), where the host's runtime is not
/// the current one.
static HOST_RUNTIME: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();

/// Records the host's runtime (called once, by `main`, when it has started it).
pub fn set_host_runtime(handle: tokio::runtime::Handle) {
    let _ = HOST_RUNTIME.set(handle);
}

extern "C" fn sleep(nanos: u64) -> FfiFuture<()> {
    // The timer is created on first poll, in the host's runtime (the one recorded, or
    // else the current one: a library user such as the criterion bench records none).
    FfiFuture::new(async move {
        let duration = Duration::from_nanos(nanos);
        let timer = match HOST_RUNTIME.get() {
            Some(runtime) => {
                let _entered = runtime.enter();
                tokio::time::sleep(duration)
            }
            None => tokio::time::sleep(duration),
        };
        timer.await
    })
}

thread_local! {
    static HOST_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as the host's. Every thread of the host that may run plugin
/// code calls this when it starts (the runtime's workers and blocking threads, the
/// plugin-calls thread, the shutdown-hook threads, `main`): a plugin's panic hook asks
/// [`on_host_thread`] to tell a panic that plugin-api will catch and report (on a host
/// thread, plugin code runs only inside its entry points) from one on a thread of the
/// plugin's own, which nobody else reports. A thread that is not marked gets its
/// plugin panics logged twice, nothing worse.
pub fn mark_host_thread() {
    HOST_THREAD.with(|t| t.set(true));
}

extern "C" fn on_host_thread() -> bool {
    HOST_THREAD.try_with(Cell::get).unwrap_or(false)
}

/// Whether to log a panic line a plugin sent (a panic in a shutdown hook, a drop, a
/// waker, or on a thread of its own): the first of its kind (plugin, and the message up
/// to its first `:`) in an interval is, repeats are summed up in one line at its end.
fn first_of_its_kind(plugin: &str, message: &str) -> bool {
    static REPEATS: OnceLock<Arc<Repeats<(String, String)>>> = OnceLock::new();
    let kind = message.split(':').next().unwrap_or(message);
    let key = (plugin.to_owned(), kind.to_owned());
    let (plugin, kind) = key.clone();
    REPEATS.get_or_init(Arc::default).first(
        key,
        || message.to_owned(),
        move |count, last| {
            tracing::error!(
                target: "plugin",
                %plugin,
                module = "panic",
                "{kind}: {count} more time(s) in the last {} s; the last: {last}",
                INTERVAL.as_secs()
            );
        },
    )
}
