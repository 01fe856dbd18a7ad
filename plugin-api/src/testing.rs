//! Calling a microserver's routes without a host, for fast unit tests in a plugin crate.
//!
//! [`TestServer::start`] runs the microserver's `init` with a config (a route table the
//! host would refuse fails it the same way), and [`TestServer::call`] sends it a
//! [`TestRequest`]: the route is matched by the host's router and rules (404, 405 with
//! `Allow`, `HEAD` served by a `GET` route without a body, the fallback route if there
//! is one), the handler runs to its answer on the calling thread, and its [`Response`]
//! comes back. Panics answer 500 with the panic's message as the body.
//! [`sleep`](crate::sleep) works (on a timer thread), and `tracing` events are printed
//! to stderr; the test binary's own panic hook is left as it is.
//!
//! For a plugin declared with `export_plugin!(T, tokio)`, start it with
//! [`TestServer::start_tokio`]: it then gets a tokio runtime like the one the host gives
//! an instance (2 worker threads), entered around `init`, every call, the shutdown hook
//! and the drop, so it is tested as it runs in the host, from a plain `#[test]` (no
//! `#[tokio::test]` needed). [`TestServer::start`] gives none, as `export_plugin!(T)`
//! does. [`TestServer::shutdown`] ends the instance as the host ends a generation: the
//! shutdown hook, the drop, then the runtime stopped. A route declared with
//! `Routes::streaming` gets its body as a stream of one chunk (413 past its limit).
//!
//! ```
//! use std::sync::Arc;
//! use plugin_api::testing::{TestRequest, TestServer};
//! use plugin_api::{Error, InitContext, Microserver, Request, Routes};
//!
//! struct Greeter;
//!
//! impl Microserver for Greeter {
//!     fn init(_: &InitContext<'_>) -> Result<Self, Error> {
//!         Ok(Greeter)
//!     }
//!     fn routes(routes: &mut Routes<Self>) {
//!         routes.get("/greet/{name}", |_: Arc<Self>, req: Request| async move {
//!             format!("Hi, {}!", req.param("name").unwrap_or_default())
//!         });
//!     }
//! }
//!
//! let server = TestServer::<Greeter>::start(serde_json::Value::Null).unwrap();
//! let r = server.call(TestRequest::get("/greet/ada"));
//! assert_eq!((r.status(), r.body()), (200, &b"Hi, ada!"[..]));
//! assert_eq!(server.call(TestRequest::post("/greet/ada")).status(), 405);
//! assert_eq!(server.call(TestRequest::get("/nowhere")).status(), 404);
//! ```
#![allow(unsafe_code)] // a request record of its own, lent to the handler like the host's

use std::ffi::c_void;
use std::future::Future;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{ROption, RResult};
use async_ffi::{ContextExt, FfiFuture};

use crate::ffi::{
    FfiBytes, FfiEachHeader, FfiHandleResult, FfiLogRecord, FfiParam, FfiRequest, FfiRequestData,
    FfiRequestFns, FfiRequestHead, FfiStr, FfiStreamPoll, HostFns,
};
use crate::{Error, InitContext, Microserver, Request, Response, Routes};

/// How long [`TestServer::call`] waits for a handler before it panics.
const HANDLER_DEADLINE: Duration = Duration::from_secs(30);

/// A microserver instance, started without a host (see the [module docs](self)).
pub struct TestServer<S> {
    /// Dropped by hand, inside the runtime (see `Drop`).
    server: ManuallyDrop<Arc<S>>,
    routes: ManuallyDrop<Routes<S>>,
    /// The routes' paths, grouped by the host's own rules (`route_table`).
    table: crate::route_table::Grouped,
    /// A tokio runtime like the one `export_plugin!(T, tokio)` gives each instance,
    /// entered around `init` and every call (unused by a plugin without tokio).
    #[cfg(feature = "tokio")]
    runtime: Option<tokio::runtime::Runtime>,
}

impl<S> Drop for TestServer<S> {
    /// Drops the instance as the host drops a generation's: inside its runtime, which is
    /// then stopped (its tasks dropped, its threads joined, for at most 5 s).
    fn drop(&mut self) {
        #[cfg(feature = "tokio")]
        let entered = self.runtime.as_ref().map(|r| r.enter());
        // SAFETY: dropped once, here; the fields are not used after.
        unsafe {
            ManuallyDrop::drop(&mut self.routes);
            ManuallyDrop::drop(&mut self.server);
        }
        #[cfg(feature = "tokio")]
        {
            drop(entered);
            if let Some(runtime) = self.runtime.take() {
                // Inside a test's own runtime (`#[tokio::test]`) a runtime may not block
                // to stop: its threads are then left to stop by themselves.
                if tokio::runtime::Handle::try_current().is_ok() {
                    runtime.shutdown_background();
                } else {
                    runtime.shutdown_timeout(Duration::from_secs(5));
                }
            }
        }
    }
}

impl<S> std::fmt::Debug for TestServer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("routes", &*self.routes)
            .finish_non_exhaustive()
    }
}

/// A request for [`TestServer::call`].
#[derive(Debug, Clone)]
pub struct TestRequest {
    method: String,
    path: String,
    query: String,
    domain: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl TestRequest {
    /// A request with `method` for `target` (a path, optionally with `?query`).
    pub fn new(method: &str, target: &str) -> Self {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        TestRequest {
            method: method.to_ascii_uppercase(),
            path: path.to_owned(),
            query: query.to_owned(),
            domain: "test.localhost".to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn get(target: &str) -> Self {
        Self::new("GET", target)
    }

    pub fn post(target: &str) -> Self {
        Self::new("POST", target)
    }

    /// Adds a header (names compare case-insensitively, as over HTTP).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the body to `value` as JSON, with `content-type: application/json`.
    pub fn json<T: serde::Serialize>(self, value: &T) -> Self {
        let body = serde_json::to_vec(value).expect("a value that serialises to JSON");
        self.header("content-type", "application/json").body(body)
    }

    /// Sets the domain the request is for (default `test.localhost`).
    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = domain.to_ascii_lowercase();
        self
    }
}

impl<S: Microserver> TestServer<S> {
    /// Runs the microserver's `init` with `config` (as the server's `config` in
    /// `servers.config.json`; `Value::Null` for none) and collects its routes, as the
    /// host does for a plugin declared with `export_plugin!(MyServer)`: no runtime (for
    /// one declared with `tokio`, use [`start_tokio`](Self::start_tokio)).
    pub fn start(config: serde_json::Value) -> Result<Self, Error> {
        Self::start_with_state(config, None)
    }

    /// As [`start`](Self::start), with state handed over as if from a previous
    /// generation's [`Microserver::export_state`].
    pub fn start_with_state(
        config: serde_json::Value,
        previous_state: Option<&[u8]>,
    ) -> Result<Self, Error> {
        Self::start_inner(config, previous_state, false)
    }

    /// As [`start`](Self::start), for a plugin declared with
    /// `export_plugin!(MyServer, tokio)`: the instance gets a tokio runtime like the
    /// host's (2 worker threads), entered around `init`, every call, the shutdown hook
    /// and the drop, and stopped after the drop.
    #[cfg(feature = "tokio")]
    pub fn start_tokio(config: serde_json::Value) -> Result<Self, Error> {
        Self::start_inner(config, None, true)
    }

    /// As [`start_tokio`](Self::start_tokio), with state handed over.
    #[cfg(feature = "tokio")]
    pub fn start_tokio_with_state(
        config: serde_json::Value,
        previous_state: Option<&[u8]>,
    ) -> Result<Self, Error> {
        Self::start_inner(config, previous_state, true)
    }

    #[cfg_attr(not(feature = "tokio"), allow(unused_variables))]
    fn start_inner(
        config: serde_json::Value,
        previous_state: Option<&[u8]>,
        tokio: bool,
    ) -> Result<Self, Error> {
        crate::host::connect_with(test_host(), "test", false);
        #[cfg(feature = "tokio")]
        let runtime = if tokio {
            let built = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| Error::internal(format!("cannot start a tokio runtime: {e}")))?;
            Some(built)
        } else {
            None
        };
        #[cfg(feature = "tokio")]
        let entered = runtime.as_ref().map(|r| r.enter());
        let config_json = config.to_string();
        let sockets = crate::ffi::FfiSockets::empty();
        let ctx = InitContext {
            server_name: "test",
            config_json: &config_json,
            previous_state,
            sockets: &sockets,
        };
        let server = Arc::new(S::init(&ctx)?);
        let mut routes = Routes::new();
        S::routes(&mut routes);
        let declared = routes
            .entries
            .iter()
            .map(|e| (e.method.as_str(), e.pattern.as_str()));
        let table = crate::route_table::group(declared)
            .map_err(|e| Error::internal(format!("its route table is invalid: {e}")))?;
        #[cfg(feature = "tokio")]
        drop(entered);
        Ok(TestServer {
            server: ManuallyDrop::new(server),
            routes: ManuallyDrop::new(routes),
            table,
            #[cfg(feature = "tokio")]
            runtime,
        })
    }

    /// The microserver itself, for checks on its state.
    pub fn server(&self) -> &Arc<S> {
        &self.server
    }

    /// Sends `request` and waits for the answer (at most 30 s, then it panics).
    pub fn call(&self, request: TestRequest) -> Response {
        let head = request.method == "HEAD";
        let (handler, params, streamed) = match self.table.router.at(&request.path) {
            Ok(found) => {
                let path = &self.table.paths[*found.value];
                let route = path.route_for(&request.method);
                let Some(route) = route else {
                    let message = format!("{} is not allowed for {}", request.method, request.path);
                    return crate::IntoResponse::into_response(Error::new(405, message))
                        .with_header("allow", &path.allow);
                };
                let params = found
                    .params
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                let entry = &self.routes.entries[route as usize];
                if let Some(limit) = entry.stream_body_limit {
                    if request.body.len() as u64 > limit {
                        let message =
                            format!("the request body is larger than the limit of {limit} bytes");
                        return crate::IntoResponse::into_response(Error::new(413, message));
                    }
                }
                (&entry.handler, params, entry.stream_body_limit.is_some())
            }
            Err(_) => match &self.routes.fallback {
                Some(fallback) => (fallback, Vec::new(), false),
                None => {
                    let message = format!("no route for {} {}", request.method, request.path);
                    return crate::IntoResponse::into_response(Error::not_found(message));
                }
            },
        };
        let _entered = self.enter();
        let request = Record::lend(request, params, streamed);
        let response = run(|cx, out| handler(Arc::clone(&self.server), request, cx, out));
        if head {
            // No body in a HEAD response, as over HTTP.
            response.with_body(crate::Body::empty())
        } else {
            response
        }
    }

    /// `GET target`.
    pub fn get(&self, target: &str) -> Response {
        self.call(TestRequest::get(target))
    }

    /// Ends the instance as the host ends a generation: calls
    /// [`Microserver::shutdown`] (inside its runtime, so `plugin_api::block_on` works
    /// there), then drops it, then stops its runtime. (Dropping a `TestServer` does the
    /// same without the hook.)
    pub fn shutdown(self) {
        {
            let _entered = self.enter();
            self.server.shutdown();
        }
        drop(self);
    }

    /// Enters the test runtime (nothing without the `tokio` feature).
    fn enter(&self) -> impl Sized + '_ {
        #[cfg(feature = "tokio")]
        return self.runtime.as_ref().map(|r| r.enter());
        #[cfg(not(feature = "tokio"))]
        return ();
    }

    /// Reads a streamed response's body (see [`Response::stream`]) until it ends or at
    /// least `limit` bytes have come (for a stream that never ends), waiting at most
    /// 30 s in all. `Err` carries the message of a stream that failed or panicked. An
    /// ordinary response's body comes back as it is.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use plugin_api::testing::TestServer;
    /// # use plugin_api::stream::unfold;
    /// # use plugin_api::{Error, InitContext, Microserver, Response, Routes};
    /// struct Counter;
    /// impl Microserver for Counter {
    ///     fn init(_: &InitContext<'_>) -> Result<Self, Error> { Ok(Counter) }
    ///     fn routes(routes: &mut Routes<Self>) {
    ///         routes.get("/", |_: Arc<Self>, _| async {
    ///             Response::stream(unfold(1, |n| async move { (n <= 3).then(|| (format!("{n} "), n + 1)) }))
    ///         });
    ///     }
    /// }
    /// let server = TestServer::<Counter>::start(serde_json::Value::Null).unwrap();
    /// let body = server.read_stream(server.get("/"), usize::MAX).unwrap();
    /// assert_eq!(body, b"1 2 3 ");
    /// ```
    pub fn read_stream(&self, mut response: Response, limit: usize) -> Result<Vec<u8>, String> {
        // Entered first, so that the stream is dropped inside the runtime.
        let _entered = self.enter();
        let Some(mut stream) = response.take_stream() else {
            return Ok(response.body().to_vec());
        };
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let deadline = Instant::now() + HANDLER_DEADLINE;
        let mut body = Vec::new();
        while body.len() < limit {
            match cx.with_ffi_context(|fcx| stream.poll_next(fcx)) {
                FfiStreamPoll::Chunk(bytes) => body.extend_from_slice(bytes.as_slice()),
                FfiStreamPoll::End => break,
                FfiStreamPoll::Failed(message) => return Err(message.into_string()),
                FfiStreamPoll::TooLarge(limit) => return Err(format!("too large: {limit}")),
                FfiStreamPoll::Pending => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(format!(
                            "the stream did not end within {} s",
                            HANDLER_DEADLINE.as_secs()
                        ));
                    }
                    std::thread::park_timeout(left);
                }
            }
        }
        Ok(body)
    }
}

/// Wakes a thread parked waiting for a handler or a stream.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls a handler on this thread until it answers, and turns its outcome into a
/// [`Response`].
fn run(
    start: impl FnOnce(&mut Context<'_>, *mut FfiHandleResult) -> crate::ffi::FfiCall,
) -> Response {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut out = MaybeUninit::<FfiHandleResult>::uninit();
    let call = start(&mut cx, out.as_mut_ptr());
    if !call.future.is_null() {
        let deadline = Instant::now() + HANDLER_DEADLINE;
        loop {
            // SAFETY: the handler's own call, polled from this thread only, with room for
            // one outcome.
            let ready = cx
                .with_ffi_context(|fcx| unsafe { (call.poll)(call.future, fcx, out.as_mut_ptr()) });
            if ready {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the handler did not answer within {} s",
                HANDLER_DEADLINE.as_secs()
            );
            std::thread::park_timeout(left);
        }
        // SAFETY: the call's own future, dropped once.
        unsafe { (call.drop)(call.future) };
    }
    // SAFETY: a call with a null future, or a poll that returned true, wrote the outcome.
    match unsafe { out.assume_init() } {
        RResult::ROk(response) => Response::from_ffi(response),
        RResult::RErr(panic) => {
            Response::text(format!("handler panicked: {panic}")).with_status(500)
        }
    }
}

/// A request record like the host's: the head the plugin reads, then what it views.
#[repr(C)]
struct Record {
    head: FfiRequestHead,
    request: TestRequest,
    /// Parameter names and values, which the head's parameters view.
    param_text: Vec<(String, String)>,
    params: Vec<FfiParam>,
}

impl Record {
    /// `streamed`: the body goes to the handler as a stream (one chunk), as the host
    /// lends it to a route declared with `Routes::streaming`.
    fn lend(request: TestRequest, param_text: Vec<(String, String)>, streamed: bool) -> Request {
        let mut record = Box::new(Record {
            head: FfiRequestHead::empty(),
            request,
            param_text,
            params: Vec::new(),
        });
        let params: Vec<FfiParam> = record
            .param_text
            .iter()
            .map(|(name, value)| FfiParam {
                name: FfiStr::new(name.as_bytes()),
                value: FfiStr::new(value.as_bytes()),
            })
            .collect();
        record.params = params;
        let body = std::mem::take(&mut record.request.body);
        let (body, body_stream) = if streamed {
            let chunk = crate::stream::unfold(Some(body), |body| async move {
                let body = body.filter(|b| !b.is_empty())?;
                Some((body, None))
            });
            (Vec::new(), Some(crate::stream::ffi_stream(chunk)))
        } else {
            (body, None)
        };
        let r = &record.request;
        // SAFETY (`FfiRequestHead::new`): every view is of heap memory the boxed record
        // owns (its strings and the parameters' vector), which neither moves nor changes
        // until the request is dropped; the text fields are `String`s.
        let head = unsafe {
            FfiRequestHead::new(
                FfiStr::new(r.method.as_bytes()),
                FfiStr::new(r.path.as_bytes()),
                FfiStr::new(r.query.as_bytes()),
                FfiStr::new(r.domain.as_bytes()),
                FfiStr::new(b"127.0.0.1:0"),
                FfiStr::new(b"0000000000000000"),
                &record.params,
                0,
                FfiBytes::from_vec(body),
                body_stream,
            )
        };
        record.head = head;
        let data = FfiRequestData(Box::into_raw(record).cast::<c_void>());
        // SAFETY (`FfiRequest::from_raw`): `data` is the boxed record, which begins with
        // the head just made; `RECORD_FNS` read it and free it once.
        Request::from_ffi(unsafe { FfiRequest::from_raw(data, &RECORD_FNS) })
    }
}

static RECORD_FNS: FfiRequestFns = FfiRequestFns {
    header,
    each_header,
    drop: drop_record,
};

/// The request a record holds (and not the head, which the plugin may write to).
///
/// # Safety
/// `data` is a live record made by `Record::lend`.
unsafe fn request<'a>(data: FfiRequestData) -> &'a TestRequest {
    // SAFETY: the caller's promise.
    unsafe { &*std::ptr::addr_of!((*data.0.cast::<Record>()).request) }
}

unsafe extern "C" fn header(data: FfiRequestData, name: FfiStr) -> ROption<FfiStr> {
    // SAFETY: `FfiRequestFns`' contract: a live record, and a view of the caller's name.
    let (request, name) = unsafe { (request(data), name.get()) };
    request
        .headers
        .iter()
        .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
        .map(|(_, v)| FfiStr::new(v))
        .into()
}

unsafe extern "C" fn each_header(data: FfiRequestData, context: *mut c_void, each: FfiEachHeader) {
    // SAFETY: `FfiRequestFns`' contract; `each` is the caller's, with its own context.
    let headers = unsafe { &request(data).headers };
    // As the host lists them: names in the order they first came, the values of a
    // repeated name together.
    for (i, (name, _)) in headers.iter().enumerate() {
        if headers[..i].iter().any(|(n, _)| n == name) {
            continue;
        }
        for (_, value) in headers.iter().filter(|(n, _)| n == name) {
            unsafe { (each.0)(context, FfiStr::new(name.as_bytes()), FfiStr::new(value)) };
        }
    }
}

unsafe extern "C" fn drop_record(data: FfiRequestData) {
    // SAFETY: made by `Box::into_raw` in `Record::lend`; `FfiRequest` drops it once.
    drop(unsafe { Box::from_raw(data.0.cast::<Record>()) });
}

/// Host functions for tests: logs to stderr, timers on threads.
fn test_host() -> crate::ffi::HostFnsRef {
    static FNS: std::sync::OnceLock<crate::ffi::HostFnsRef> = std::sync::OnceLock::new();
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
    3
}

extern "C" fn log(record: FfiLogRecord<'_>) {
    let level = ["", "ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
        .get(record.level as usize)
        .copied()
        .unwrap_or("TRACE");
    eprintln!(
        "{level} {}: {} {}",
        record.target.as_str(),
        record.message.as_str(),
        record.fields.as_str()
    );
}

extern "C" fn on_host_thread() -> bool {
    false
}

/// No bus in tests: nobody receives what is published.
extern "C" fn publish(_: abi_stable::std_types::RStr<'_>, _: crate::ffi::FfiBytes) -> u64 {
    0
}

/// No other servers in tests: every service call answers 503.
extern "C" fn call(
    server: abi_stable::std_types::RStr<'_>,
    _: crate::ffi::FfiServiceRequest,
) -> FfiFuture<crate::ffi::FfiResponse> {
    let body = serde_json::json!({
        "error": format!("no server {:?}: service calls need the host (TestServer has none)", server.as_str())
    });
    let response = crate::Response::json(&body).with_status(503).into_ffi();
    FfiFuture::new(async move { response })
}

extern "C" fn sleep(nanos: u64) -> FfiFuture<()> {
    FfiFuture::new(Timer {
        until: Instant::now() + Duration::from_nanos(nanos),
        shared: None,
    })
}

/// A timer whose waiting is done by a thread of its own.
struct Timer {
    until: Instant,
    shared: Option<Arc<Mutex<Option<Waker>>>>,
}

impl Future for Timer {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.until {
            return Poll::Ready(());
        }
        let until = self.until;
        let shared = self.shared.get_or_insert_with(|| {
            let shared: Arc<Mutex<Option<Waker>>> = Arc::default();
            let wakes = shared.clone();
            std::thread::spawn(move || {
                while Instant::now() < until {
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                }
                if let Some(waker) = wakes.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    waker.wake();
                }
            });
            shared
        });
        *shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        if Instant::now() >= until {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{TestRequest, TestServer};
    use crate::{Error, InitContext, Microserver, Request, Response, Routes};

    struct Files;

    impl Microserver for Files {
        fn init(_: &InitContext<'_>) -> Result<Self, Error> {
            Ok(Files)
        }

        fn routes(routes: &mut Routes<Self>) {
            routes
                .get("/files/{*rest}", |_: Arc<Self>, req: Request| async move {
                    format!("rest={}", req.param("rest").unwrap_or_default())
                })
                .get("/files/readme", |_, _| async { "the readme" })
                .get(
                    "/docs/{name}/meta",
                    |_: Arc<Self>, req: Request| async move {
                        format!("meta of {}", req.param("name").unwrap_or_default())
                    },
                )
                .post("/upload", |_: Arc<Self>, req: Request| async move {
                    let kind = req.header("X-Kind").unwrap_or("none").to_owned();
                    let names: Vec<&str> = req.headers().map(|(n, _)| n).collect();
                    format!("{} bytes of {kind} ({})", req.body().len(), names.join(" "))
                })
                .get("/panic", |_, _| async { panic!("on purpose") as Response });
        }
    }

    fn files() -> TestServer<Files> {
        TestServer::start(serde_json::Value::Null).unwrap()
    }

    #[test]
    fn routes_match_as_the_host_ranks_them() {
        let server = files();
        let body = |path: &str| String::from_utf8(server.get(path).body().to_vec()).unwrap();
        assert_eq!(body("/files/readme"), "the readme");
        assert_eq!(body("/files/a/b/c"), "rest=a/b/c");
        assert_eq!(body("/docs/a/meta"), "meta of a");
        // The path first, then the method: `/files/readme` exists, for GET only.
        let r = server.call(TestRequest::post("/files/readme"));
        assert_eq!((r.status(), r.header("allow")), (405, Some("GET, HEAD")));
        // A catch-all never matches nothing.
        assert_eq!(server.get("/files/").status(), 404);
        // HEAD is served by the GET route, without a body.
        let r = server.call(TestRequest::new("HEAD", "/files/readme"));
        assert_eq!((r.status(), r.body()), (200, &b""[..]));
    }

    #[test]
    fn headers_and_body_arrive_and_a_panic_is_a_500_with_its_message() {
        let server = files();
        let r = server.call(
            TestRequest::post("/upload")
                .header("x-kind", "photo")
                .header("x-other", "1")
                .header("X-Kind", "second")
                .body(vec![0u8; 10]),
        );
        // Repeated names listed together, as the host lists them.
        assert_eq!(r.body(), b"10 bytes of photo (x-kind x-kind x-other)");
        let r = server.get("/panic");
        assert_eq!(r.status(), 500);
        let text = String::from_utf8(r.body().to_vec()).unwrap();
        assert!(text.contains("handler panicked: on purpose"), "{text}");
    }

    struct Conflicting;

    impl Microserver for Conflicting {
        fn init(_: &InitContext<'_>) -> Result<Self, Error> {
            Ok(Conflicting)
        }

        fn routes(routes: &mut Routes<Self>) {
            routes
                .get("/a", |_, _| async { "one" })
                .get("/a", |_, _| async { "two" });
        }
    }

    #[test]
    fn a_route_table_the_host_refuses_fails_start() {
        let error = TestServer::<Conflicting>::start(serde_json::Value::Null).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("its route table is invalid: route GET /a is declared twice"),
            "{error}"
        );
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn tokio_works_in_init_and_handlers() {
        struct Timed(u64);
        impl Microserver for Timed {
            fn init(_: &InitContext<'_>) -> Result<Self, Error> {
                let n = crate::block_on(async { tokio::spawn(async { 7 }).await.unwrap() });
                Ok(Timed(n))
            }
            fn routes(routes: &mut Routes<Self>) {
                routes.get("/", |s: Arc<Self>, _| async move {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    let doubled = tokio::spawn(async move { s.0 * 2 }).await.unwrap();
                    doubled.to_string()
                });
            }
        }
        let server = TestServer::<Timed>::start_tokio(serde_json::Value::Null).unwrap();
        assert_eq!(server.get("/").body(), b"14");
        server.shutdown();
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn shutdown_runs_the_hook_inside_the_runtime_and_then_drops_the_instance() {
        use std::sync::atomic::{AtomicU32, Ordering};
        static EVENTS: AtomicU32 = AtomicU32::new(0);
        struct Hooked;
        impl Microserver for Hooked {
            fn init(_: &InitContext<'_>) -> Result<Self, Error> {
                Ok(Hooked)
            }
            fn routes(_: &mut Routes<Self>) {}
            fn shutdown(&self) {
                crate::block_on(tokio::time::sleep(std::time::Duration::from_millis(1)));
                EVENTS.fetch_add(1, Ordering::SeqCst);
            }
        }
        impl Drop for Hooked {
            fn drop(&mut self) {
                // Dropped inside the runtime, after the hook.
                assert!(tokio::runtime::Handle::try_current().is_ok());
                assert_eq!(EVENTS.fetch_add(10, Ordering::SeqCst), 1);
            }
        }
        TestServer::<Hooked>::start_tokio(serde_json::Value::Null)
            .unwrap()
            .shutdown();
        assert_eq!(EVENTS.load(Ordering::SeqCst), 11);
    }

    #[test]
    fn a_streaming_route_gets_its_body_as_a_stream_under_its_limit() {
        struct Upload;
        impl Microserver for Upload {
            fn init(_: &InitContext<'_>) -> Result<Self, Error> {
                Ok(Upload)
            }
            fn routes(routes: &mut Routes<Self>) {
                routes.streaming(
                    "PUT",
                    "/up",
                    10,
                    |_: Arc<Self>, mut req: Request| async move {
                        let mut body = req
                            .body_stream()
                            .ok_or_else(|| Error::bad_request("none"))?;
                        let mut got = Vec::new();
                        while let Some(chunk) = body.next().await {
                            got.extend_from_slice(chunk?.as_bytes());
                        }
                        Ok::<_, Error>(format!(
                            "{} bytes: {}",
                            got.len(),
                            String::from_utf8_lossy(&got)
                        ))
                    },
                );
            }
        }
        let server = TestServer::<Upload>::start(serde_json::Value::Null).unwrap();
        let r = server.call(TestRequest::new("PUT", "/up").body("0123456789"));
        assert_eq!(r.body(), b"10 bytes: 0123456789");
        assert_eq!(
            server.call(TestRequest::new("PUT", "/up")).body(),
            b"0 bytes: "
        );
        let r = server.call(TestRequest::new("PUT", "/up").body("0123456789a"));
        assert_eq!(r.status(), 413);
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn a_tokio_test_server_can_be_dropped_inside_a_test_runtime() {
        struct Nothing;
        impl Microserver for Nothing {
            fn init(_: &InitContext<'_>) -> Result<Self, Error> {
                Ok(Nothing)
            }
            fn routes(_: &mut Routes<Self>) {}
        }
        drop(TestServer::<Nothing>::start_tokio(serde_json::Value::Null).unwrap());
    }
}
