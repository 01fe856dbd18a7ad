//! Microserver instances and generations.
//!
//! A [`Generation`] is one instance of a plugin serving one server, built from one
//! library and one config. Requests hold it through an [`InFlight`] guard, so a
//! generation that has been replaced keeps serving the requests it already started and
//! can tell when the last one is done.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use abi_stable::std_types::{RResult, RSlice};
use async_ffi::FfiContext;
use plugin_api::ffi::{FfiCall, FfiHandleResult, FfiInitArgs, FfiInstance, FfiRequest};
use tokio::sync::Notify;

use crate::loader::PluginLibrary;
use crate::routes::RouteTable;
use crate::services::host_fns;

/// One live microserver instance inside a plugin library. Dropping it drops the
/// plugin's object (in the plugin's own code).
pub struct Instance {
    library: Arc<PluginLibrary>,
    ptr: FfiInstance,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("plugin", &self.library.name)
            .finish()
    }
}

impl Instance {
    /// Calls the plugin's init and builds the route table it declares.
    pub fn create(
        library: Arc<PluginLibrary>,
        server_name: &str,
        config_json: &str,
        previous_state: Option<&[u8]>,
    ) -> Result<(Instance, RouteTable), String> {
        let args = FfiInitArgs {
            server_name: server_name.into(),
            config_json: config_json.into(),
            previous_state: previous_state.map(RSlice::from_slice).into(),
            host: host_fns(),
        };
        let init = match (library.module.init())(args) {
            RResult::ROk(init) => init,
            RResult::RErr(message) => return Err(message.to_string()),
        };
        let instance = Instance {
            library,
            ptr: init.instance,
        };
        let routes = RouteTable::new(
            init.routes
                .iter()
                .map(|r| (r.method.as_str(), r.pattern.as_str())),
            init.fallback.into_option(),
        );
        match routes {
            Ok(routes) => Ok((instance, routes)),
            Err(e) => {
                // It never served, but init may have started things; let it stop them.
                instance.shutdown();
                Err(format!("its route table is invalid: {e}"))
            }
        }
    }

    pub fn library(&self) -> &Arc<PluginLibrary> {
        &self.library
    }

    /// Starts handling a request and polls the handler once (see `call::start`, which
    /// is the only caller). The plugin catches the handler's panics itself.
    pub fn handle(
        &self,
        request: FfiRequest,
        cx: &mut FfiContext<'_>,
        out: *mut FfiHandleResult,
    ) -> FfiCall {
        (self.library.module.handle())(self.ptr, request, cx, out)
    }

    /// The state this instance hands to its successor, copied into host memory.
    pub fn export_state(&self) -> Option<Vec<u8>> {
        (self.library.module.export_state())(self.ptr)
            .into_option()
            .map(|bytes| bytes.into_vec())
    }

    pub fn shutdown(&self) {
        (self.library.module.shutdown())(self.ptr);
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        (self.library.module.drop_instance())(self.ptr);
    }
}

/// One instance serving one server, numbered per server from 1.
#[derive(Debug)]
pub struct Generation {
    pub server: Arc<str>,
    pub number: u64,
    pub instance: Instance,
    pub routes: RouteTable,
    in_flight: AtomicUsize,
    idle: Notify,
    /// Set when the generation is replaced; no request may enter after that.
    retired: AtomicBool,
    shut_down: AtomicBool,
}

impl Generation {
    pub fn new(server: Arc<str>, number: u64, instance: Instance, routes: RouteTable) -> Arc<Self> {
        Arc::new(Generation {
            server,
            number,
            instance,
            routes,
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            retired: AtomicBool::new(false),
            shut_down: AtomicBool::new(false),
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
    pub fn enter(self: &Arc<Self>) -> Option<InFlight> {
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

    /// Calls the plugin's shutdown hook, once.
    pub fn shutdown(&self) {
        if !self.shut_down.swap(true, Ordering::AcqRel) {
            self.instance.shutdown();
        }
    }
}

/// Marks a request in flight on a generation, and keeps the generation alive.
#[derive(Debug)]
pub struct InFlight {
    generation: Arc<Generation>,
}

impl InFlight {
    pub fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }
}

impl Drop for InFlight {
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
