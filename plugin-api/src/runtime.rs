//! The async runtime a plugin's code runs in: none (the default), or a tokio runtime of
//! the plugin's own, one per instance (`export_plugin!(T, tokio)`).
//!
//! A plugin library has its own copy of tokio, whose thread-local "current runtime" is
//! empty on the host's threads. With a runtime, plugin-api enters it (sets that
//! thread-local) around every piece of plugin code it runs for the host: `init`, each
//! poll and drop of a handler's future or a response stream, `export_state`, `shutdown`
//! and the instance's drop. So `tokio::spawn`, `tokio::time`, `tokio::net` and crates
//! built on them work there unchanged, while the handler itself is still polled on the
//! host's thread (no thread hop per request). Spawned tasks, timers and I/O are driven
//! by the runtime's own worker threads.
//!
//! Without a runtime, none of this code is instantiated: a plugin that does not opt in
//! pays nothing on its request path.

use std::time::Duration;

/// What plugin-api needs of a runtime (hidden: the two kinds below are the only ones).
#[doc(hidden)]
pub trait PluginRuntime: Send + Sync + Sized + 'static {
    /// Whether anything needs entering; `false` lets the glue skip wrapping.
    const ENTERS: bool;
    /// What [`enter`](Self::enter) returns: keeps the runtime entered until dropped.
    type Guard<'a>
    where
        Self: 'a;
    /// What a handle to it costs to keep in a future (cloned per pending call).
    type Handle: Clone + Send + Sync + 'static;

    fn start(plugin: &str) -> Result<Self, String>;
    fn enter(&self) -> Self::Guard<'_>;
    fn handle(&self) -> Self::Handle;
    fn enter_handle(handle: &Self::Handle) -> impl Sized;
    /// Cancels what is left of its tasks and joins its threads, waiting at most `wait`.
    fn stop(self, wait: Duration);
}

/// No runtime: the plugin only awaits futures the host makes.
#[doc(hidden)]
#[derive(Debug)]
pub struct NoRuntime;

impl PluginRuntime for NoRuntime {
    const ENTERS: bool = false;
    type Guard<'a> = ();
    type Handle = ();

    #[inline(always)]
    fn start(_: &str) -> Result<Self, String> {
        Ok(NoRuntime)
    }
    #[inline(always)]
    fn enter(&self) {}
    #[inline(always)]
    fn handle(&self) {}
    #[inline(always)]
    fn enter_handle(_: &()) -> impl Sized {}
    #[inline(always)]
    fn stop(self, _: Duration) {}
}

#[cfg(feature = "tokio")]
pub use with_tokio::*;

#[cfg(feature = "tokio")]
mod with_tokio {
    use std::future::Future;

    use super::*;

    /// A multi-thread tokio runtime with `WORKERS` worker threads, named after the
    /// plugin, with every driver (I/O and time) enabled.
    #[doc(hidden)]
    #[derive(Debug)]
    pub struct TokioRuntime<const WORKERS: usize>(tokio::runtime::Runtime);

    impl<const WORKERS: usize> PluginRuntime for TokioRuntime<WORKERS> {
        const ENTERS: bool = true;
        type Guard<'a> = tokio::runtime::EnterGuard<'a>;
        type Handle = tokio::runtime::Handle;

        fn start(plugin: &str) -> Result<Self, String> {
            // Linux keeps 15 bytes of a thread's name.
            let name: String = plugin.chars().take(11).collect();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(WORKERS.max(1))
                .thread_name(format!("{name}-rt"))
                .enable_all()
                .build()
                .map(TokioRuntime)
                .map_err(|e| format!("could not start the plugin's tokio runtime: {e}"))
        }

        #[inline]
        fn enter(&self) -> Self::Guard<'_> {
            self.0.enter()
        }

        #[inline]
        fn handle(&self) -> Self::Handle {
            self.0.handle().clone()
        }

        #[inline]
        fn enter_handle(handle: &Self::Handle) -> impl Sized {
            handle.enter()
        }

        fn stop(self, wait: Duration) {
            self.0.shutdown_timeout(wait);
        }
    }

    /// Runs a future to its end on the plugin's tokio runtime, blocking this thread.
    ///
    /// For `init`, `export_state` and `shutdown`, which are not async (opening a
    /// database pool in `init`, closing it in `shutdown`). Never in a handler: a handler
    /// is polled on one of the host's threads, and blocking it holds up other requests;
    /// await the future instead.
    ///
    /// ```no_run
    /// # async fn open() -> Result<u32, std::io::Error> { Ok(1) }
    /// # fn f() -> Result<(), std::io::Error> {
    /// // In `init`, with `export_plugin!(MyServer, tokio)`:
    /// let pool = plugin_api::block_on(open())?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    /// Outside the plugin's code, or in a plugin declared without `tokio`
    /// (`export_plugin!(MyServer)`): there is no runtime to run it on.
    pub fn block_on<F: Future>(future: F) -> F::Output {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.block_on(future),
            Err(_) => panic!(
                "plugin_api::block_on needs the plugin's tokio runtime: declare the plugin with export_plugin!(MyServer, tokio) (in unit tests, start it with TestServer::start_tokio)"
            ),
        }
    }
}
