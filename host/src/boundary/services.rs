//! Functions the host lends to plugins (see `plugin_api::ffi::HostFns`).
//!
//! They run host code on behalf of a plugin: log events land in the host's subscriber,
//! and timers are tokio timers on the host's runtime. None of them may panic, because a
//! panic cannot unwind through the plugin's frames.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::RStr;
use async_ffi::FfiFuture;
use bytes::Bytes;
use plugin_api::ffi::{
    FfiBytes, FfiHeaders, FfiLogRecord, FfiResponse, FfiServiceRequest, FfiStream, HostFns,
    HostFnsRef,
};
use tracing::level_filters::LevelFilter;

use crate::boundary::bus::{Bus, BusEvent};

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
            publish,
            call,
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

/// The name of the field that carries a plugin's own fields (`key=value ...`, as
/// plugin-api wrote them) once [`keep_plugin_fields_apart`] was called; the JSON log
/// splits it into fields of their own.
pub const PLUGIN_FIELDS: &str = "plugin_fields";

static FIELDS_APART: AtomicBool = AtomicBool::new(false);

/// From now on a plugin's fields reach the host's subscriber in a field of their own
/// ([`PLUGIN_FIELDS`]) instead of after its message (the text log's form).
pub fn keep_plugin_fields_apart() {
    FIELDS_APART.store(true, Ordering::Relaxed);
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
    let apart = !fields.is_empty() && FIELDS_APART.load(Ordering::Relaxed);
    macro_rules! emit {
        ($level:expr) => {
            if apart {
                tracing::event!(target: "plugin", $level, plugin, module, plugin_fields = fields, "{message}")
            } else {
                tracing::event!(target: "plugin", $level, plugin, module, "{message}{sep}{fields}")
            }
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

extern "C" fn publish(topic: RStr<'_>, payload: FfiBytes) -> u64 {
    let topic = Bytes::copy_from_slice(topic.as_str().as_bytes());
    // The plugin's buffer, not copied (freed by its code, which stays mapped).
    let payload = match payload.as_static() {
        Some(bytes) => Bytes::from_static(bytes),
        None => Bytes::from_owner(payload),
    };
    if let Some(forward) = PUBLISH_TO_HOST.get() {
        // In a worker process: its host publishes it (to every subscriber, this
        // server included).
        return u64::from(forward(topic, payload));
    }
    // The other hosts' subscribers, when the bus runs over Redis.
    crate::boundary::relay::forward_event(&topic, &payload);
    Bus::get().publish(BusEvent { topic, payload })
}

/// What a worker process does with an event its plugin publishes: hands it to its
/// host (`true`), or drops it (`false`, its queue to the host being full).
pub type PublishToHost = Box<dyn Fn(Bytes, Bytes) -> bool + Send + Sync>;

static PUBLISH_TO_HOST: OnceLock<PublishToHost> = OnceLock::new();

/// In a worker process: sends what its plugin publishes to the host (set once, before
/// the plugin starts).
pub fn publish_to_host(forward: PublishToHost) {
    let _ = PUBLISH_TO_HOST.set(forward);
}

/// A response to a service call, as the request path made it (its body read whole).
#[derive(Debug)]
pub struct ServiceResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// What answers service calls: the request path, which registers itself at start-up
/// (this layer cannot reach it).
pub type ServiceCaller = Arc<
    dyn Fn(
            String,
            hyper::Request<Bytes>,
            Option<Duration>,
        ) -> Pin<Box<dyn Future<Output = ServiceResponse> + Send>>
        + Send
        + Sync,
>;

static CALLER: OnceLock<ServiceCaller> = OnceLock::new();

/// The answer to a service call before the host has registered its caller: while it
/// starts its servers (or, in a library user such as a bench, never).
const NOT_YET: &str = "service calls are not taken yet: the host is still starting its servers";

/// Registers what answers service calls (once, at start-up).
pub fn set_service_caller(caller: ServiceCaller) {
    let _ = CALLER.set(caller);
}

/// Makes a service call for a plugin that runs in a worker process (its host makes
/// them), on the host's runtime, and hands the answer to `answer`.
pub fn call_for_worker(
    server: String,
    request: hyper::Request<Bytes>,
    timeout: Option<Duration>,
    answer: impl FnOnce(ServiceResponse) + Send + 'static,
) {
    let Some(runtime) = HOST_RUNTIME.get() else {
        return answer(refused(503, NOT_YET));
    };
    let Some(caller) = CALLER.get().cloned() else {
        return answer(refused(503, NOT_YET));
    };
    runtime.spawn(async move { answer(caller(server, request, timeout).await) });
}

/// A JSON error answer to a service call that never reached a server.
pub fn refused(status: u16, message: &str) -> ServiceResponse {
    let mut headers = hyper::HeaderMap::new();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    ServiceResponse {
        status,
        headers,
        body: Bytes::from(serde_json::json!({ "error": message }).to_string()),
    }
}

/// The plugin's request as an HTTP request, or why it is not one.
fn service_request(request: FfiServiceRequest) -> Result<hyper::Request<Bytes>, String> {
    let FfiServiceRequest {
        method,
        path,
        headers,
        body,
        timeout_ms: _,
    } = request;
    let mut builder = hyper::Request::builder()
        .method(method.as_str())
        .uri(path.as_str());
    for (name, value) in headers.iter() {
        builder = builder.header(name, value);
    }
    let body = match body.as_static() {
        Some(bytes) => Bytes::from_static(bytes),
        None if body.is_empty() => Bytes::new(),
        None => Bytes::from_owner(body),
    };
    builder
        .body(body)
        .map_err(|e| format!("invalid service request ({} {}): {e}", method, path))
}

fn into_ffi(response: ServiceResponse) -> FfiResponse {
    let mut headers = FfiHeaders::default();
    for (name, value) in &response.headers {
        headers.push(name.as_str().as_bytes(), value.as_bytes());
    }
    let body = if response.body.is_empty() {
        FfiBytes::empty()
    } else {
        FfiBytes::from_owner(response.body)
    };
    FfiResponse::new(response.status, b"", headers, body, FfiStream::empty())
}

extern "C" fn call(server: RStr<'_>, request: FfiServiceRequest) -> FfiFuture<FfiResponse> {
    let server = server.as_str().to_owned();
    let timeout = (request.timeout_ms > 0).then(|| Duration::from_millis(request.timeout_ms));
    let request = service_request(request);
    let caller = CALLER.get().cloned();
    FfiFuture::new(async move {
        let request = match request {
            Ok(request) => request,
            Err(message) => return into_ffi(refused(400, &message)),
        };
        let Some(caller) = caller else {
            return into_ffi(refused(503, NOT_YET));
        };
        // On the host's runtime: the caller may poll this from a thread of its own.
        let answer = caller(server, request, timeout);
        let joined = match HOST_RUNTIME.get() {
            Some(runtime) => runtime.spawn(answer).await,
            None => tokio::spawn(answer).await,
        };
        match joined {
            Ok(response) => into_ffi(response),
            Err(e) => into_ffi(refused(500, &format!("the service call failed: {e}"))),
        }
    })
}
