//! Calling a microserver's routes without a host, for fast unit tests in a plugin crate.
//!
//! [`TestServer::start`] runs the microserver's `init` with a config, and
//! [`TestServer::call`] sends it a [`TestRequest`]: the route is matched (404 and 405
//! as the host answers them, the fallback route if there is one), the handler runs to
//! its answer on the calling thread, and its [`Response`] comes back. Panics answer 500
//! with the panic's message as the body. [`sleep`](crate::sleep) works (on a timer
//! thread), and `tracing` events and panics are printed to stderr.
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
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{ROption, RResult};
use async_ffi::{ContextExt, FfiFuture};

use crate::ffi::{
    FfiBytes, FfiEachHeader, FfiHandleResult, FfiLogRecord, FfiParam, FfiRequest, FfiRequestData,
    FfiRequestFns, FfiRequestHead, FfiStr, HostFns,
};
use crate::{Error, InitContext, Microserver, Request, Response, Routes};

/// How long [`TestServer::call`] waits for a handler before it panics.
const HANDLER_DEADLINE: Duration = Duration::from_secs(30);

/// A microserver instance, started without a host (see the [module docs](self)).
pub struct TestServer<S> {
    server: Arc<S>,
    routes: Routes<S>,
}

impl<S> std::fmt::Debug for TestServer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("routes", &self.routes)
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
    /// `servers.config.json`; `Value::Null` for none) and collects its routes.
    pub fn start(config: serde_json::Value) -> Result<Self, Error> {
        Self::start_with_state(config, None)
    }

    /// As [`start`](Self::start), with state handed over as if from a previous
    /// generation's [`Microserver::export_state`].
    pub fn start_with_state(
        config: serde_json::Value,
        previous_state: Option<&[u8]>,
    ) -> Result<Self, Error> {
        crate::host::connect(test_host(), "test");
        let config_json = config.to_string();
        let ctx = InitContext {
            server_name: "test",
            config_json: &config_json,
            previous_state,
        };
        let server = Arc::new(S::init(&ctx)?);
        let mut routes = Routes::new();
        S::routes(&mut routes);
        Ok(TestServer { server, routes })
    }

    /// The microserver itself, for checks on its state.
    pub fn server(&self) -> &Arc<S> {
        &self.server
    }

    /// Sends `request` and waits for the answer (at most 30 s, then it panics).
    pub fn call(&self, request: TestRequest) -> Response {
        let mut found = None;
        let mut path_exists = false;
        for entry in &self.routes.entries {
            let Some(params) = match_pattern(&entry.pattern, &request.path) else {
                continue;
            };
            path_exists = true;
            let method_fits = entry.method == request.method
                || entry.method == "*"
                || (request.method == "HEAD" && entry.method == "GET");
            let rank = specificity(&entry.pattern);
            if method_fits && found.as_ref().is_none_or(|(r, _, _)| rank > *r) {
                found = Some((rank, &entry.handler, params));
            }
        }
        let (handler, params) = match (found, &self.routes.fallback) {
            (Some((_, handler, params)), _) => (handler, params),
            (None, _) if path_exists => {
                let message = format!("{} is not allowed for {}", request.method, request.path);
                return Error::new(405, message).into_response_for_test();
            }
            (None, Some(fallback)) => (fallback, Vec::new()),
            (None, None) => {
                let message = format!("no route for {} {}", request.method, request.path);
                return Error::not_found(message).into_response_for_test();
            }
        };
        let request = Record::lend(request, params);
        run(|cx, out| handler(self.server.clone(), request, cx, out))
    }

    /// `GET target`.
    pub fn get(&self, target: &str) -> Response {
        self.call(TestRequest::get(target))
    }
}

impl Error {
    fn into_response_for_test(self) -> Response {
        crate::IntoResponse::into_response(self)
    }
}

/// How specific a pattern is, as the host's router ranks them: a static segment beats a
/// named one, which beats a catch-all.
fn specificity(pattern: &str) -> (usize, usize) {
    let segments: Vec<&str> = pattern.split('/').collect();
    let statics = segments.iter().filter(|s| !s.starts_with('{')).count();
    let named = segments
        .iter()
        .filter(|s| s.starts_with('{') && !s.starts_with("{*"))
        .count();
    (statics, named)
}

/// The parameters of `path` if it matches `pattern` (`{name}` is one segment, `{*name}`
/// the rest of the path).
fn match_pattern(pattern: &str, path: &str) -> Option<Vec<(String, String)>> {
    let mut params = Vec::new();
    let mut wanted = pattern.split('/');
    let mut given = path.split('/');
    loop {
        match (wanted.next(), given.next()) {
            (None, None) => return Some(params),
            (Some(w), Some(g)) => {
                if let Some(name) = w.strip_prefix("{*").and_then(|w| w.strip_suffix('}')) {
                    let rest: Vec<&str> = std::iter::once(g).chain(given).collect();
                    params.push((name.to_owned(), rest.join("/")));
                    return Some(params);
                } else if let Some(name) = w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                    if g.is_empty() {
                        return None;
                    }
                    params.push((name.to_owned(), g.to_owned()));
                } else if w != g {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

/// Polls a handler on this thread until it answers, and turns its outcome into a
/// [`Response`].
fn run(
    start: impl FnOnce(&mut Context<'_>, *mut FfiHandleResult) -> crate::ffi::FfiCall,
) -> Response {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
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
    fn lend(request: TestRequest, param_text: Vec<(String, String)>) -> Request {
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

/// # Safety
/// `data` is a live record made by `Record::lend`.
unsafe fn record<'a>(data: FfiRequestData) -> &'a Record {
    // SAFETY: the caller's promise.
    unsafe { &*data.0.cast::<Record>() }
}

unsafe extern "C" fn header(data: FfiRequestData, name: FfiStr) -> ROption<FfiStr> {
    // SAFETY: `FfiRequestFns`' contract: a live record, and a view of the caller's name.
    let (record, name) = unsafe { (record(data), name.get()) };
    record
        .request
        .headers
        .iter()
        .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
        .map(|(_, v)| FfiStr::new(v))
        .into()
}

unsafe extern "C" fn each_header(data: FfiRequestData, context: *mut c_void, each: FfiEachHeader) {
    // SAFETY: `FfiRequestFns`' contract; `each` is the caller's, with its own context.
    let record = unsafe { record(data) };
    for (name, value) in &record.request.headers {
        unsafe { (each.0)(context, FfiStr::new(name.as_bytes()), FfiStr::new(value)) };
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
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
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
                .get(
                    "/files/{name}/meta",
                    |_: Arc<Self>, req: Request| async move {
                        format!("meta of {}", req.param("name").unwrap_or_default())
                    },
                )
                .get("/files/readme", |_, _| async { "the readme" })
                .post("/upload", |_: Arc<Self>, req: Request| async move {
                    let kind = req.header("X-Kind").unwrap_or("none").to_owned();
                    format!("{} bytes of {kind}", req.body().len())
                })
                .get("/panic", |_, _| async { panic!("on purpose") as Response });
        }
    }

    #[test]
    fn routes_match_as_the_host_ranks_them() {
        let server = TestServer::<Files>::start(serde_json::Value::Null).unwrap();
        let body = |path: &str| String::from_utf8(server.get(path).body().to_vec()).unwrap();
        assert_eq!(body("/files/readme"), "the readme");
        assert_eq!(body("/files/a/meta"), "meta of a");
        assert_eq!(body("/files/a/b/c"), "rest=a/b/c");
        assert_eq!(
            server
                .call(TestRequest::new("HEAD", "/files/readme"))
                .status(),
            200
        );
    }

    #[test]
    fn headers_and_body_arrive_and_a_panic_is_a_500_with_its_message() {
        let server = TestServer::<Files>::start(serde_json::Value::Null).unwrap();
        let r = server.call(
            TestRequest::post("/upload")
                .header("x-kind", "photo")
                .body(vec![0u8; 10]),
        );
        assert_eq!(r.body(), b"10 bytes of photo");
        let r = server.get("/panic");
        assert_eq!(r.status(), 500);
        let text = String::from_utf8(r.body().to_vec()).unwrap();
        assert!(text.contains("handler panicked: on purpose"), "{text}");
    }
}
