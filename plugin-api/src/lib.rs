//! Write a microserver for the plugin host.
//!
//! This is the only crate a plugin depends on. A plugin is a `cdylib` crate that
//! implements [`Microserver`] for one type and declares it with [`export_plugin!`]:
//!
//! ```
//! use std::sync::Arc;
//! use plugin_api::{export_plugin, Error, InitContext, Microserver, Request, Response, Routes};
//!
//! struct Hello {
//!     greeting: String,
//! }
//!
//! #[derive(serde::Deserialize)]
//! struct Config {
//!     greeting: String,
//! }
//!
//! impl Microserver for Hello {
//!     fn init(ctx: &InitContext<'_>) -> Result<Self, Error> {
//!         let config: Config = ctx.config()?;
//!         Ok(Hello { greeting: config.greeting })
//!     }
//!
//!     fn routes(routes: &mut Routes<Self>) {
//!         routes.get("/hello/{name}", Self::greet);
//!     }
//! }
//!
//! impl Hello {
//!     async fn greet(self: Arc<Self>, req: Request) -> Response {
//!         let name = req.param("name").unwrap_or_default();
//!         Response::text(format!("{}, {name}!", self.greeting))
//!     }
//! }
//!
//! export_plugin!(Hello);
//! ```
//!
//! # What works inside a plugin
//! - Plain Rust, std, serde, `std::sync` and `tokio::sync` primitives (they need no
//!   runtime), and any crate that does not need a tokio runtime of its own.
//! - Async handlers that await [`sleep`] or other futures the host provides.
//! - Logging with [`tracing`] (re-exported here): events land in the host's log output
//!   tagged with the plugin's name.
//! - With `export_plugin!(MyServer, tokio)`, everything tokio: see below.
//!
//! # Tokio inside a plugin
//! A plugin library has its own copy of tokio, so without a runtime of its own
//! `tokio::spawn`, `tokio::time` and tokio I/O panic ("there is no reactor running").
//! Declare the plugin with `export_plugin!(MyServer, tokio)` (plugin-api's `tokio`
//! feature, on by default, must be on) and add `tokio` to the plugin's dependencies; then
//! ordinary tokio code and crates built on it (sqlx, hyper's client, reqwest, redis...)
//! work in [`Microserver::init`], in handlers, in `export_state`, in `shutdown`, and in
//! the tasks they spawn:
//!
//! - Each instance (each generation of each server running the plugin) gets a
//!   multi-thread tokio runtime with 2 worker threads (`tokio(worker_threads = N)` for
//!   another number), named `<plugin>-rt`, started before `init`.
//! - Handlers are still polled on the host's threads, with the plugin's runtime entered
//!   (no thread hop per request); `tokio::spawn` puts a task on the runtime's workers,
//!   which also drive its timers and sockets.
//! - Background tasks (a cache refresher, a queue consumer) spawned in `init` run until
//!   the generation ends. A panic in a task is logged with the plugin's name; the task
//!   ends and nothing else does.
//! - `init`, `export_state` and `shutdown` are not async: use [`block_on`] there to wait
//!   for a future (opening a pool, flushing a queue). Never block in a handler: await.
//! - When the generation is replaced (or the host stops), the order is: its last request
//!   finishes (or the drain deadline passes), `shutdown` runs, the instance is dropped,
//!   then the runtime's remaining tasks are cancelled (dropped) and its threads joined,
//!   waiting at most the reload's `drain_timeout_ms` (the shutdown deadline when the
//!   host stops). So a reload leaves no threads behind.
//! - Leave out tokio's `signal` feature (`full` includes it): the host handles signals,
//!   and with it each build of the plugin the host loads keeps a pipe open.
//! - `tokio::task::block_in_place` does not work in a handler (the host's thread is not
//!   one of the runtime's workers): use `spawn_blocking`.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use plugin_api::{export_plugin, Error, InitContext, Microserver, Request, Routes};
//!
//! struct Counter {
//!     ticks: Arc<AtomicU64>,
//! }
//!
//! impl Microserver for Counter {
//!     fn init(_: &InitContext<'_>) -> Result<Self, Error> {
//!         let ticks = Arc::new(AtomicU64::new(0));
//!         let counting = ticks.clone();
//!         // A background task: it runs until this generation ends.
//!         tokio::spawn(async move {
//!             let mut every = tokio::time::interval(Duration::from_secs(1));
//!             loop {
//!                 every.tick().await;
//!                 counting.fetch_add(1, Ordering::Relaxed);
//!             }
//!         });
//!         Ok(Counter { ticks })
//!     }
//!
//!     fn routes(routes: &mut Routes<Self>) {
//!         routes.get("/ticks", |s: Arc<Self>, _: Request| async move {
//!             tokio::time::sleep(Duration::from_millis(5)).await; // a tokio timer, in a handler
//!             s.ticks.load(Ordering::Relaxed).to_string()
//!         });
//!     }
//! }
//!
//! export_plugin!(Counter, tokio);
//! ```
//!
//! A plugin declared without `tokio` pays nothing for it: no runtime, no threads, and
//! no extra work per request.
//!
//! # What does not work
//! - Blocking the thread for long (a busy loop, `std::thread::sleep`): a handler runs on
//!   one of the host's worker threads, and the host cannot interrupt code that does not
//!   yield. The host's request timeout answers the client, but the thread stays busy.
//!
//! Panics are fine: a panicking handler answers 500, the host logs the message (with its
//! location, the route and the request id) once, and every other request carries on.
//! A panic in `init` leaves the server waiting with the message; one in `export_state`,
//! `shutdown` or your type's `Drop` is logged. Panics are caught wherever plugin-api runs
//! your code for the host, even one whose payload panics again when dropped, and one in
//! a waker you made and passed to a host future such as [`sleep`] (the task it should
//! have woken may then wait until the request times out).
//!
//! What no catch can stop, and so ends the whole host process: `std::process::abort`, a
//! stack overflow, running out of memory, and a panic that starts while your code is
//! already unwinding from another panic (for example a `Drop` that panics while a panic
//! unwinds through it: Rust aborts on a double panic).

use std::future::Future;
use std::sync::Arc;

#[doc(hidden)]
pub mod bus;
mod error;
mod export;
pub mod ffi;
mod host;
mod request;
mod response;
pub mod route_table;
mod runtime;
pub mod service;
pub mod socket;
pub mod stream;
pub mod testing;

pub use error::Error;
pub use host::sleep;
pub use request::Request;
pub use response::{Body, IntoResponse, Json, Response};
#[cfg(feature = "tokio")]
pub use runtime::block_on;
pub use socket::{Close, Message, Socket, Sockets};
pub use tracing;

/// A microserver: one type per plugin library, one instance per configured server.
///
/// The host calls [`init`](Microserver::init) once per server that runs this plugin, then
/// [`routes`](Microserver::routes) to learn the route table, then handlers for requests
/// on any thread, concurrently. Handlers take `self: Arc<Self>`, so state that changes
/// lives behind a `Mutex` or atomics.
pub trait Microserver: Send + Sync + Sized + 'static {
    /// Builds the instance from the server's `config` object. An error here keeps the
    /// server from serving, and the host shows the message.
    fn init(ctx: &InitContext<'_>) -> Result<Self, Error>;

    /// Declares the routes. Called once per instance, right after `init`.
    fn routes(routes: &mut Routes<Self>);

    /// Called when this instance is about to be replaced by a new generation (a new build
    /// of the library, or a changed config). Bytes returned here are handed to the next
    /// generation's [`InitContext::previous_state`], so in-memory data can survive.
    ///
    /// It is a snapshot taken while this instance still serves: the new instance is
    /// initialised from it and then takes new requests, while requests already running
    /// here finish here. A change such a request makes after the snapshot is not handed
    /// over, and the two instances exist side by side for the time of one init (so do not
    /// hold a resource only one of them can have, such as a listening port, across it).
    /// Keep what must never be lost in a store outside the process.
    fn export_state(&self) -> Option<Vec<u8>> {
        None
    }

    /// Called once, after the last request this instance was serving has finished (or
    /// the host's drain deadline passed), before the instance is dropped.
    fn shutdown(&self) {}

    /// Whether this instance can serve, as the host's readiness check sees it: `Err`
    /// with a reason makes its server "not ready" (`/health/ready` answers 503 naming
    /// it) and shows in `/health/servers`. The default is always healthy.
    ///
    /// The host calls it only when its health is asked on the admin listener
    /// (`/health/ready`, `/health/servers`, `/api/servers`, `/metrics`), on a thread of
    /// its own, never on the request path, and gives it 1 second: a hook that takes
    /// longer counts as unhealthy (and is not asked again until it has returned). So
    /// keep it quick and synchronous: a plugin that must do I/O to know (a database
    /// round trip) keeps the answer fresh in a background task and returns the last one
    /// here. A panic here counts as unhealthy with the panic's message.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use plugin_api::{Error, InitContext, Microserver, Routes};
    ///
    /// struct Orders {
    ///     /// Set by a background task that queries the database every few seconds.
    ///     database_up: AtomicBool,
    /// }
    ///
    /// impl Microserver for Orders {
    ///     fn init(_: &InitContext<'_>) -> Result<Self, Error> {
    ///         Ok(Orders { database_up: AtomicBool::new(true) })
    ///     }
    ///     fn routes(_: &mut Routes<Self>) {}
    ///     fn health(&self) -> Result<(), String> {
    ///         if self.database_up.load(Ordering::Relaxed) {
    ///             Ok(())
    ///         } else {
    ///             Err("the database does not answer".to_owned())
    ///         }
    ///     }
    /// }
    /// ```
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What `init` gets: the server's name, its config, and any state handed over.
#[derive(Debug)]
pub struct InitContext<'a> {
    server_name: &'a str,
    config_json: &'a str,
    previous_state: Option<&'a [u8]>,
    sockets: &'a ffi::FfiSockets,
}

impl<'a> InitContext<'a> {
    /// The `name` of the server entry in `servers.config.json` (or the plugin's name when
    /// the library is served without an entry).
    pub fn server_name(&self) -> &'a str {
        self.server_name
    }

    /// The server's `config` object, deserialized. A server with no `config` (or
    /// `"config": null`, or a library served at `<name>.localhost` without an entry) is
    /// read as `null` if `T` takes it (an `Option`), else as an empty object, so a
    /// `#[serde(default)]` struct gets its defaults; a struct with required fields gets
    /// an error that names the missing field and says to add a `config`.
    ///
    /// ```
    /// # fn f(ctx: &plugin_api::InitContext<'_>) -> Result<(), plugin_api::Error> {
    /// #[derive(serde::Deserialize, Default)]
    /// #[serde(default)]
    /// struct Config { greeting: String }
    /// let config: Config = ctx.config()?;
    /// # Ok(()) }
    /// ```
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        let invalid = |e| Error::bad_request(format!("invalid config: {e}"));
        if self.config_json.trim() != "null" {
            return serde_json::from_str(self.config_json).map_err(invalid);
        }
        serde_json::from_str("null")
            .or_else(|_| serde_json::from_str("{}"))
            .map_err(|e| {
                Error::bad_request(format!(
                    "server {:?} has no \"config\" in servers.config.json, and this plugin needs one: {e}",
                    self.server_name
                ))
            })
    }

    /// The server's `config` as JSON text.
    pub fn config_json(&self) -> &'a str {
        self.config_json
    }

    /// Bytes the previous generation returned from [`Microserver::export_state`].
    pub fn previous_state(&self) -> Option<&'a [u8]> {
        self.previous_state
    }

    /// The server's WebSocket connections: the same set for every generation, so the
    /// connections a previous generation accepted are here too. Keep it in the instance
    /// to broadcast from anywhere (a handler, a background task). Outside the host
    /// ([`testing::TestServer`]) it is always empty.
    pub fn sockets(&self) -> Sockets {
        Sockets::from_ffi(self.sockets.clone())
    }
}

/// The route table a microserver declares in [`Microserver::routes`].
///
/// Patterns: `/users/{id}` names a segment, `/files/{*path}` catches the rest of the path.
/// The host matches paths: an unknown path answers 404 (or goes to the
/// [`fallback`](Routes::fallback)), a known path with another method answers 405 with an
/// `Allow` header. A pattern the host cannot use makes init fail with a message.
pub struct Routes<S> {
    entries: Vec<RouteEntry<S>>,
    fallback: Option<export::ErasedHandler<S>>,
    on_message: Option<export::ErasedEvent<S, Message>>,
    on_close: Option<export::ErasedEvent<S, Close>>,
    /// Bus subscriptions: topic and handler, by subscription index.
    topics: Vec<(String, export::ErasedBusHandler<S>)>,
}

impl<S> std::fmt::Debug for Routes<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (&e.method, &e.pattern)))
            .finish()
    }
}

struct RouteEntry<S> {
    method: String,
    pattern: String,
    handler: export::ErasedHandler<S>,
    /// `Some(limit)` for a route that takes its body as a stream.
    stream_body_limit: Option<u64>,
    /// A WebSocket route.
    websocket: bool,
}

macro_rules! method_fns {
    ($($fn_name:ident => $method:literal),*) => {$(
        #[doc = concat!("Routes `", $method, "` requests for `pattern` to `handler`.")]
        pub fn $fn_name<H, Fut, R>(&mut self, pattern: &str, handler: H) -> &mut Self
        where
            H: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoResponse,
        {
            self.route($method, pattern, handler)
        }
    )*};
}

impl<S: Microserver> Routes<S> {
    fn new() -> Self {
        Routes {
            entries: Vec::new(),
            fallback: None,
            on_message: None,
            on_close: None,
            topics: Vec::new(),
        }
    }

    method_fns!(get => "GET", post => "POST", put => "PUT", patch => "PATCH", delete => "DELETE", any => "*");

    /// Routes requests with `method` (upper case, or `*` for any) for `pattern`.
    pub fn route<H, Fut, R>(&mut self, method: &str, pattern: &str, handler: H) -> &mut Self
    where
        H: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoResponse,
    {
        self.entries.push(RouteEntry {
            method: method.to_ascii_uppercase(),
            pattern: pattern.to_owned(),
            handler: export::erase(handler),
            stream_body_limit: None,
            websocket: false,
        });
        self
    }

    /// Routes `method` requests for `pattern` to `handler`, which takes the request body
    /// as a stream ([`Request::body_stream`]) instead of a buffer read whole first: for
    /// uploads, or bodies bigger than the server's `max_body_bytes`. `max_body_bytes`
    /// here is this route's own limit (a `Content-Length` over it is answered 413 before
    /// the handler runs; a body that grows past it ends the stream with
    /// [`BodyError::TooLarge`](stream::BodyError)).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use plugin_api::{Error, Request, Routes, Microserver};
    /// # struct Files;
    /// # impl Files {
    /// async fn upload(self: Arc<Self>, mut req: Request) -> Result<String, Error> {
    ///     let mut body = req.body_stream().ok_or_else(|| Error::bad_request("no body"))?;
    ///     let mut total = 0;
    ///     while let Some(chunk) = body.next().await {
    ///         total += chunk?.len(); // or write it to a file as it comes
    ///     }
    ///     Ok(format!("{total} bytes"))
    /// }
    /// # }
    /// # fn routes(routes: &mut Routes<impl Microserver>) {}
    /// // In `routes`:
    /// // routes.streaming("PUT", "/files/{name}", 1 << 30, Self::upload);
    /// ```
    pub fn streaming<H, Fut, R>(
        &mut self,
        method: &str,
        pattern: &str,
        max_body_bytes: u64,
        handler: H,
    ) -> &mut Self
    where
        H: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoResponse,
    {
        self.route(method, pattern, handler);
        if let Some(entry) = self.entries.last_mut() {
            entry.stream_body_limit = Some(max_body_bytes);
        }
        self
    }

    /// A WebSocket route: `GET` requests for `pattern` that ask to upgrade to a
    /// WebSocket go to `open`, with the connection the host will open. `open` sees the
    /// whole request (path parameters, query, headers: to authenticate), may join the
    /// socket to rooms, attach a value to it and queue messages, and answers `Ok(())` to
    /// accept (the host then answers 101 and opens the connection) or an error (any
    /// [`IntoResponse`], such as [`Error`]) to refuse with that response. A request
    /// that is not an upgrade gets 426.
    ///
    /// The connection's messages and its close then go to [`on_message`](Self::on_message)
    /// and [`on_close`](Self::on_close), on whichever generation of the server is
    /// current: connections stay open across reloads.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use plugin_api::{Error, InitContext, Microserver, Request, Routes};
    /// use plugin_api::socket::{Close, Message, Socket};
    /// struct Echo;
    /// impl Microserver for Echo {
    ///     fn init(_: &InitContext<'_>) -> Result<Self, Error> { Ok(Echo) }
    ///     fn routes(routes: &mut Routes<Self>) {
    ///         routes
    ///             .websocket("/echo", Self::open)
    ///             .on_message(Self::message)
    ///             .on_close(Self::closed);
    ///     }
    /// }
    /// impl Echo {
    ///     async fn open(self: Arc<Self>, req: Request, _socket: Socket) -> Result<(), Error> {
    ///         match req.query_param("token").as_deref() {
    ///             Some("let-me-in") => Ok(()),
    ///             _ => Err(Error::new(401, "a token is needed")),
    ///         }
    ///     }
    ///     async fn message(self: Arc<Self>, socket: Socket, message: Message) {
    ///         let _ = socket.send(message); // the same buffer goes back: no copy
    ///     }
    ///     async fn closed(self: Arc<Self>, socket: Socket, close: Close) {
    ///         plugin_api::tracing::info!(id = socket.id(), code = close.code, "closed");
    ///     }
    /// }
    /// ```
    pub fn websocket<H, Fut, E>(&mut self, pattern: &str, open: H) -> &mut Self
    where
        H: Fn(Arc<S>, Request, Socket) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: IntoResponse,
    {
        let handler = move |server: Arc<S>, mut req: Request| {
            let opened = req.take_socket().map(|socket| open(server, req, socket));
            async move {
                match opened {
                    None => {
                        Response::text("this route takes WebSocket connections: ask for an upgrade")
                            .with_status(426)
                            .with_header("upgrade", "websocket")
                    }
                    Some(opened) => match opened.await {
                        Ok(()) => Response::new(101),
                        Err(refused) => refused.into_response(),
                    },
                }
            }
        };
        self.route("GET", pattern, handler);
        if let Some(entry) = self.entries.last_mut() {
            entry.websocket = true;
        }
        self
    }

    /// Handles a message on any of the server's WebSocket connections. A connection's
    /// messages come one at a time, in order: the next waits until this handler is done
    /// (so keep it short, or hand long work to a task). A handler that panics, or runs
    /// past the server's `request_timeout_ms`, has its connection closed (1011).
    /// Without one, messages are dropped.
    pub fn on_message<H, Fut>(&mut self, handler: H) -> &mut Self
    where
        H: Fn(Arc<S>, Socket, Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_message = Some(export::erase_event(handler));
        self
    }

    /// Handles the close of a WebSocket connection (by either side, or cut), once per
    /// connection, after its last message. The connection has already left its rooms.
    pub fn on_close<H, Fut>(&mut self, handler: H) -> &mut Self
    where
        H: Fn(Arc<S>, Socket, Close) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_close = Some(export::erase_event(handler));
        self
    }

    /// Subscribes to a bus topic (exact: `orders.created`): every event published under
    /// it, by any server of the host, comes to `handler`, on whichever generation is
    /// current. A server's events come one at a time, in the order they were
    /// published. Subscribing twice to one topic keeps the last handler. See
    /// [`bus`].
    pub fn on_event<H, Fut>(&mut self, topic: &str, handler: H) -> &mut Self
    where
        H: Fn(Arc<S>, bus::Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler = export::erase_bus(handler);
        match self.topics.iter_mut().find(|(t, _)| t == topic) {
            Some(entry) => entry.1 = handler,
            None => self.topics.push((topic.to_owned(), handler)),
        }
        self
    }

    /// Answers every request whose path no route matches (instead of the host's 404).
    pub fn fallback<H, Fut, R>(&mut self, handler: H) -> &mut Self
    where
        H: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoResponse,
    {
        self.fallback = Some(export::erase(handler));
        self
    }
}

/// Declares the type that implements [`Microserver`] as this library's plugin.
///
/// Use it once, at the root of a `cdylib` crate. The plugin's name and version are the
/// crate's name and version from its `Cargo.toml`.
///
/// - `export_plugin!(MyServer)`: the plugin's code awaits only futures the host makes
///   ([`sleep`]) and plain Rust; nothing else runs for it.
/// - `export_plugin!(MyServer, tokio)`: each instance (each generation of each server
///   running this plugin) gets a tokio runtime of its own, with 2 worker threads, so
///   `tokio::spawn`, `tokio::time`, `tokio::net`, `spawn_blocking` and crates built on
///   them (database drivers, HTTP clients) work in `init`, handlers, `export_state`,
///   `shutdown` and the tasks they spawn. See [the crate docs](crate#tokio-inside-a-plugin).
/// - `export_plugin!(MyServer, tokio(worker_threads = 4))`: the same, with that many
///   worker threads.
#[macro_export]
macro_rules! export_plugin {
    ($server:ty) => {
        $crate::export_plugin!(@with $server, $crate::__private::NoRuntime);
    };
    ($server:ty, tokio) => {
        $crate::export_plugin!(@with $server, $crate::__tokio_runtime!(2));
    };
    ($server:ty, tokio(worker_threads = $workers:literal)) => {
        $crate::export_plugin!(@with $server, $crate::__tokio_runtime!($workers));
    };
    (@with $server:ty, $runtime:ty) => {
        #[doc(hidden)]
        #[allow(unsafe_code)]
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static __PLUGIN_HOST_ROOT_MODULE: $crate::__private::LibHeader = {
            extern "C" fn __init(
                args: $crate::ffi::FfiInitArgs<'_>,
            ) -> $crate::__private::RResult<$crate::ffi::FfiInit, $crate::__private::RString> {
                $crate::__private::init::<$server, $runtime>(args, env!("CARGO_PKG_NAME"))
            }
            extern "C" fn __constructor() -> $crate::__private::RootModuleResult {
                $crate::__private::__call_root_module_loader(|| {
                    $crate::__private::root_module::<$server, $runtime>(
                        env!("CARGO_PKG_NAME"),
                        env!("CARGO_PKG_VERSION"),
                        __init,
                    )
                })
            }
            // SAFETY: the constructor returns the root module of type `PluginModRef`.
            unsafe {
                $crate::__private::LibHeader::from_constructor::<$crate::ffi::PluginModRef>(
                    __constructor,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            }
        };

        $crate::__export_health!($server, $runtime);
    };
}

/// Exports the health hook beside the root module (see `plugin_api::ffi::FfiHealth`).
#[cfg(not(plugin_api_0_6_0_layout))]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_health {
    ($server:ty, $runtime:ty) => {
        #[doc(hidden)]
        #[allow(unsafe_code)]
        #[export_name = "plugin_host_health_v1"]
        pub unsafe extern "C" fn __plugin_host_health(
            instance: $crate::ffi::FfiInstance,
        ) -> $crate::__private::RResult<(), $crate::__private::RString> {
            // SAFETY: the caller keeps the contract of `FfiHealth`.
            unsafe { $crate::__private::health::<$server, $runtime>(instance) }
        }
    };
}

/// `--cfg plugin_api_0_6_0_layout`: a plugin as plugin-api 0.6.0 built it, without the
/// health hook (the tests load one to show that such a library still loads).
#[cfg(plugin_api_0_6_0_layout)]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_health {
    ($server:ty, $runtime:ty) => {};
}

/// The runtime type of `export_plugin!(T, tokio)`, or a message saying what is missing.
#[cfg(feature = "tokio")]
#[doc(hidden)]
#[macro_export]
macro_rules! __tokio_runtime {
    ($workers:literal) => {
        $crate::__private::TokioRuntime<$workers>
    };
}

#[cfg(not(feature = "tokio"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __tokio_runtime {
    ($workers:literal) => {
        ::core::compile_error!("export_plugin!(.., tokio) needs plugin-api's \"tokio\" feature, which is on by default: remove `default-features = false` from the plugin-api dependency, or add `features = [\"tokio\"]`")
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::export::{health, init, root_module};
    pub use crate::runtime::NoRuntime;
    #[cfg(feature = "tokio")]
    pub use crate::runtime::TokioRuntime;
    pub use abi_stable::library::{
        __call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult,
    };
    pub use abi_stable::std_types::{RResult, RString};
}

#[cfg(test)]
mod tests {
    use crate::{InitContext, Response};

    fn no_config() -> InitContext<'static> {
        static NO_SOCKETS: std::sync::OnceLock<crate::ffi::FfiSockets> = std::sync::OnceLock::new();
        InitContext {
            server_name: "greeter",
            config_json: "null",
            previous_state: None,
            sockets: NO_SOCKETS.get_or_init(crate::ffi::FfiSockets::empty),
        }
    }

    #[test]
    fn a_missing_config_is_none_or_the_defaults_or_a_clear_error() {
        #[derive(serde::Deserialize, Default, Debug, PartialEq)]
        #[serde(default)]
        struct Defaults {
            greeting: String,
            times: u32,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Required {
            greeting: String,
        }
        let ctx = no_config();
        assert_eq!(ctx.config::<Option<Defaults>>().unwrap(), None);
        assert_eq!(ctx.config::<Defaults>().unwrap(), Defaults::default());
        let error = ctx.config::<Required>().unwrap_err().to_string();
        assert!(
            error.contains("server \"greeter\" has no \"config\" in servers.config.json")
                && error.contains("missing field `greeting`"),
            "{error}"
        );
        let given = InitContext {
            config_json: r#"{"greeting": "Hi"}"#,
            ..no_config()
        };
        assert_eq!(given.config::<Defaults>().unwrap().greeting, "Hi");
    }

    #[test]
    fn headers_keep_their_order_and_any_length() {
        let long = "v".repeat(70_000);
        let mut r = Response::new(200)
            .with_header("a", "1")
            .with_header("b", "2");
        assert_eq!((r.header("A"), r.header("b")), (Some("1"), Some("2")));
        for i in 0..10 {
            r = r.with_header(&format!("x-{i}"), &i.to_string());
        }
        r = r.with_header("long", &long).with_header("empty", "");
        assert_eq!(r.header("a"), Some("1"));
        assert_eq!(r.header("x-9"), Some("9"));
        assert_eq!(r.header("long"), Some(long.as_str()));
        assert_eq!(r.header("empty"), Some(""));
        let ffi = r.into_ffi();
        assert_eq!(ffi.headers.len(), 14);
        let all: Vec<(&[u8], &[u8])> = ffi.headers.iter().collect();
        assert_eq!(all.len(), 14);
        assert_eq!(all[0], (&b"a"[..], &b"1"[..]));
        assert_eq!(all[12], (&b"long"[..], long.as_bytes()));
        assert_eq!(all[13], (&b"empty"[..], &b""[..]));
    }

    #[test]
    fn a_response_has_one_content_type_the_last_set() {
        let r = Response::text("x");
        assert_eq!(r.header("Content-Type"), Some("text/plain; charset=utf-8"));
        let r = r
            .with_header("x-a", "1")
            .with_header("content-type", "text/html");
        assert_eq!(r.header("content-type"), Some("text/html"));
        let ffi = r.with_header("x-b", "2").into_ffi();
        assert_eq!(ffi.content_type(), b"");
        let names: Vec<&[u8]> = ffi.headers.iter().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"x-a"[..], b"content-type", b"x-b"]);

        let r = Response::new(200)
            .with_header("Content-Type", "text/html")
            .with_header("x-a", "1")
            .with_content_type("application/json");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let ffi = r.into_ffi();
        assert_eq!(ffi.content_type(), b"application/json");
        let names: Vec<&[u8]> = ffi.headers.iter().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"x-a"[..]]);
    }

    #[test]
    fn a_vector_body_is_handed_over_as_it_is() {
        use crate::ffi::FfiBytes;
        let mut v = Vec::with_capacity(100);
        v.extend_from_slice(b"abc");
        let at = v.as_ptr();
        let bytes = FfiBytes::from_vec(v);
        assert_eq!(
            (bytes.as_slice(), bytes.as_slice().as_ptr()),
            (&b"abc"[..], at)
        );
        assert!(bytes.as_static().is_none());
        drop(bytes);
        assert!(FfiBytes::from_vec(Vec::new()).is_empty());
        let r = Response::text(String::from("made at run time")).into_ffi();
        assert_eq!(r.body.as_slice(), b"made at run time");
    }

    #[test]
    fn exported_symbol_is_the_one_abi_stable_looks_up() {
        assert_eq!(
            crate::__root_module_symbol!(),
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }
}
