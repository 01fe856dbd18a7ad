//! The glue `export_plugin!` instantiates: C-ABI entry points that drive a `Microserver`.
//!
//! Invariant: no panic unwinds out of any function here. Each entry point catches panics
//! (through [`catch`], which also drops the panic's payload inside a catch: a payload
//! whose own drop panics must not unwind either) and turns them into an error value or
//! a log line (since Rust 1.81 an unwinding `extern "C"` fn aborts the whole host
//! process).
#![allow(unsafe_code)]

use std::any::Any;
use std::ffi::c_void;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{RErr, ROk, ROption, RResult, RStr, RString, RVec};
use async_ffi::FfiContext;

use crate::ffi::{
    FfiBusEvent, FfiCall, FfiHandleResult, FfiInit, FfiInitArgs, FfiInstance, FfiRequest, FfiRoute,
    FfiSocketEvent, FfiStream, FfiStreamFns, FfiStreamPoll, PluginMod, PluginModRef,
};
use crate::host::{self, panic_message};
use crate::runtime::PluginRuntime;
use crate::socket::{Close, Event, Message, Socket};

/// Runs `f`, catching a panic. A panic's message (with its location, which the panic
/// hook notes instead of logging it) comes back as the error, and its payload is dropped
/// safely. Nothing is logged here: the caller reports the message once.
pub(crate) fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = host::take_caught().unwrap_or_else(|| panic_message(&*payload));
        forget_payload(payload);
        message
    })
}

/// Drops a panic's payload. A payload whose drop panics in turn (a type with a
/// panicking `Drop` thrown with `panic_any`) is caught, and that second payload is leaked
/// rather than dropped: dropping it could panic again, and a panic that reaches an
/// `extern "C"` function aborts the process.
pub(crate) fn forget_payload(payload: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
        // The hook noted this second panic; nobody reports it, and a later catch must
        // not take it for its own.
        let _ = host::take_caught();
    }
}
use crate::{InitContext, IntoResponse, Microserver, Request, Routes};

/// A route's handler with its types erased: starts the handler and polls it once (see
/// [`start`]).
pub(crate) type ErasedHandler<S> =
    Box<dyn Fn(Arc<S>, Request, &mut Context<'_>, *mut FfiHandleResult) -> FfiCall + Send + Sync>;

/// Wraps a handler so that it runs behind the C ABI and never unwinds.
pub(crate) fn erase<S, H, Fut, R>(handler: H) -> ErasedHandler<S>
where
    S: Microserver,
    H: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoResponse,
{
    Box::new(
        move |server, request, cx, out| match catch(|| handler(server, request)) {
            Ok(fut) => start(fut, cx, out),
            Err(message) => answered(out, RErr(message.into())),
        },
    )
}

/// A WebSocket event handler with its types erased (`A`: a [`Message`] or a [`Close`]):
/// starts the handler and polls it once, like an [`ErasedHandler`].
pub(crate) type ErasedEvent<S, A> =
    Box<dyn Fn(Arc<S>, Socket, A, &mut Context<'_>, *mut FfiHandleResult) -> FfiCall + Send + Sync>;

/// What an event handler's call answers: nothing the host reads (an empty 200, which
/// allocates nothing).
struct Handled;

impl IntoResponse for Handled {
    fn into_response(self) -> crate::Response {
        crate::Response::new(200)
    }
}

/// Wraps a WebSocket event handler so that it runs behind the C ABI and never unwinds.
pub(crate) fn erase_event<S, A, H, Fut>(handler: H) -> ErasedEvent<S, A>
where
    S: Microserver,
    A: 'static,
    H: Fn(Arc<S>, Socket, A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Box::new(
        move |server, socket, arg, cx, out| match catch(|| handler(server, socket, arg)) {
            Ok(fut) => start(
                async move {
                    fut.await;
                    Handled
                },
                cx,
                out,
            ),
            Err(message) => answered(out, RErr(message.into())),
        },
    )
}

/// A bus subscription's handler with its types erased.
pub(crate) type ErasedBusHandler<S> = Box<
    dyn Fn(Arc<S>, crate::bus::Event, &mut Context<'_>, *mut FfiHandleResult) -> FfiCall
        + Send
        + Sync,
>;

/// Wraps a bus event handler so that it runs behind the C ABI and never unwinds.
pub(crate) fn erase_bus<S, H, Fut>(handler: H) -> ErasedBusHandler<S>
where
    S: Microserver,
    H: Fn(Arc<S>, crate::bus::Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Box::new(
        move |server, event, cx, out| match catch(|| handler(server, event)) {
            Ok(fut) => start(
                async move {
                    fut.await;
                    Handled
                },
                cx,
                out,
            ),
            Err(message) => answered(out, RErr(message.into())),
        },
    )
}

/// Boxes a handler's future and polls it once: most handlers answer at once, and then
/// the outcome goes straight to `out` and nothing is left for the host to poll.
fn start<F, R>(fut: F, cx: &mut Context<'_>, out: *mut FfiHandleResult) -> FfiCall
where
    F: Future<Output = R> + Send + 'static,
    R: IntoResponse,
{
    let mut boxed = Box::pin(CatchUnwind(ManuallyDrop::new(fut)));
    match boxed.as_mut().poll(cx) {
        Poll::Ready(outcome) => answered(out, outcome),
        Poll::Pending => FfiCall {
            // SAFETY (for poll_call and drop_call): the pointer comes from a pinned box
            // and is turned back into one exactly once, by drop_call.
            future: Box::into_raw(unsafe { Pin::into_inner_unchecked(boxed) }).cast(),
            poll: poll_call::<F, R>,
            drop: drop_call::<F>,
        },
    }
}

fn answered(out: *mut FfiHandleResult, outcome: FfiHandleResult) -> FfiCall {
    // SAFETY: the host passes a pointer to space for one outcome, which it reads only
    // after this returns a call with a null future.
    unsafe { out.write(outcome) };
    FfiCall {
        future: std::ptr::null_mut(),
        poll: poll_nothing,
        drop: drop_nothing,
    }
}

unsafe extern "C" fn poll_call<F, R>(
    future: *mut c_void,
    cx: &mut FfiContext<'_>,
    out: *mut FfiHandleResult,
) -> bool
where
    F: Future<Output = R>,
    R: IntoResponse,
{
    // SAFETY: `future` is the pinned box made in `start` (never moved since), alive until
    // drop_call; the host polls it from one thread at a time.
    let future = unsafe { Pin::new_unchecked(&mut *future.cast::<CatchUnwind<F>>()) };
    // CatchUnwind catches panics in the handler; the waker glue does not panic.
    match cx.with_context(|cx| future.poll(cx)) {
        Poll::Ready(outcome) => {
            // SAFETY: as in `answered`.
            unsafe { out.write(outcome) };
            true
        }
        Poll::Pending => false,
    }
}

unsafe extern "C" fn drop_call<F>(future: *mut c_void) {
    // SAFETY: made by `Box::into_raw` in `start`; the host drops a call once. Dropping
    // a CatchUnwind catches the handler's panics.
    let future = unsafe { Box::from_raw(future.cast::<CatchUnwind<F>>()) };
    drop(future);
}

unsafe extern "C" fn poll_nothing(
    _: *mut c_void,
    _: &mut FfiContext<'_>,
    _: *mut FfiHandleResult,
) -> bool {
    false
}

unsafe extern "C" fn drop_nothing(_: *mut c_void) {}

/// Polls the handler's future, turning its response into the FFI shape and a panic into
/// an error carrying the panic message. Dropping it catches panics too: the host drops a
/// handler's future early when the request times out or the client goes away, and a
/// panic there would otherwise reach async-ffi's drop, which aborts the process.
struct CatchUnwind<F>(ManuallyDrop<F>);

impl<F> Drop for CatchUnwind<F> {
    fn drop(&mut self) {
        // SAFETY: the inner future is dropped exactly once, here, in place (it may be
        // pinned, and `drop_in_place` does not move it).
        let dropped = catch(|| unsafe { ManuallyDrop::drop(&mut self.0) });
        if let Err(message) = dropped {
            host::log_panic(&format!(
                "a handler's future panicked while it was dropped: {message}"
            ));
        }
    }
}

impl<F, R> Future for CatchUnwind<F>
where
    F: Future<Output = R>,
    R: IntoResponse,
{
    type Output = FfiHandleResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<FfiHandleResult> {
        // SAFETY: structural pinning; the inner future is never moved out of `self`.
        let inner = unsafe { self.map_unchecked_mut(|s| &mut *s.0) };
        match catch(|| inner.poll(cx)) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(r)) => match catch(|| r.into_response().into_ffi()) {
                Ok(response) => Poll::Ready(ROk(response)),
                Err(message) => Poll::Ready(RErr(message.into())),
            },
            Err(message) => Poll::Ready(RErr(message.into())),
        }
    }
}

struct Instance<S, Rt> {
    server: Arc<S>,
    handlers: Vec<ErasedHandler<S>>,
    on_message: Option<ErasedEvent<S, Message>>,
    on_close: Option<ErasedEvent<S, Close>>,
    /// By subscription index.
    on_events: Vec<ErasedBusHandler<S>>,
    /// Started before `init`, stopped after everything else of the instance is dropped.
    runtime: Rt,
}

/// # Safety
/// `ptr` was returned by `init::<S, Rt>` and not yet passed to `drop_instance::<S, Rt>`
/// (the contract of the root module's `unsafe` functions); `'static` never escapes the
/// caller.
unsafe fn instance<S, Rt>(ptr: FfiInstance) -> &'static Instance<S, Rt> {
    // SAFETY: the caller's promise.
    unsafe { &*(ptr.0.cast::<Instance<S, Rt>>()) }
}

/// The init entry point for `S`. The C-ABI wrapper around it is generated by
/// `export_plugin!`, because only the plugin crate knows its own name.
pub fn init<S: Microserver, Rt: PluginRuntime>(
    args: FfiInitArgs<'_>,
    name: &'static str,
) -> RResult<FfiInit, RString> {
    host::connect(args.host, name);
    let runtime = match catch(|| Rt::start(name)) {
        Ok(Ok(runtime)) => runtime,
        Ok(Err(message)) => return RErr(message.into()),
        Err(message) => return RErr(format!("starting the runtime panicked: {message}").into()),
    };
    let entered = runtime.enter();
    let outcome = catch(|| {
        let ctx = InitContext {
            server_name: args.server_name.as_str(),
            config_json: args.config_json.as_str(),
            previous_state: args.previous_state.into_option().map(|s| s.as_slice()),
            sockets: &args.sockets,
        };
        let server = S::init(&ctx).map_err(|e| e.to_string())?;
        let mut routes = Routes::new();
        S::routes(&mut routes);
        Ok::<_, String>((server, routes))
    });
    drop(entered);
    let (server, routes) = match outcome {
        Ok(Ok(built)) => built,
        Ok(Err(message)) => {
            stop_runtime(runtime, INIT_FAILED_WAIT);
            return RErr(message.into());
        }
        Err(message) => {
            stop_runtime(runtime, INIT_FAILED_WAIT);
            return RErr(format!("init panicked: {message}").into());
        }
    };
    let fallback = routes
        .fallback
        .as_ref()
        .map(|_| routes.entries.len() as u32);
    let mut table = RVec::with_capacity(routes.entries.len());
    let mut handlers = Vec::with_capacity(routes.entries.len() + 1);
    for entry in routes.entries {
        table.push(FfiRoute {
            method: entry.method.into(),
            pattern: entry.pattern.into(),
            stream_body_limit: entry.stream_body_limit.into(),
            websocket: entry.websocket,
        });
        handlers.push(entry.handler);
    }
    handlers.extend(routes.fallback);
    let (topics, on_events): (RVec<RString>, Vec<_>) = routes
        .topics
        .into_iter()
        .map(|(topic, handler)| (RString::from(topic), handler))
        .unzip();
    let instance = Box::new(Instance {
        server: Arc::new(server),
        handlers,
        on_message: routes.on_message,
        on_close: routes.on_close,
        on_events,
        runtime,
    });
    ROk(FfiInit {
        instance: FfiInstance(Box::into_raw(instance).cast()),
        routes: table,
        fallback: fallback.into(),
        topics,
    })
}

unsafe extern "C" fn handle<S: Microserver, Rt: PluginRuntime>(
    ptr: FfiInstance,
    request: FfiRequest,
    cx: &mut FfiContext<'_>,
    out: *mut FfiHandleResult,
) -> FfiCall {
    // SAFETY: the contract of `PluginMod::handle`.
    let instance = unsafe { instance::<S, Rt>(ptr) };
    let _entered = instance.runtime.enter();
    let call = match instance.handlers.get(request.head().route as usize) {
        // `erase` catches panics in the handler; the waker glue does not panic.
        Some(handler) => cx.with_context(|cx| {
            handler(instance.server.clone(), Request::from_ffi(request), cx, out)
        }),
        None => {
            let message = format!(
                "the host asked for route {} of {}",
                request.head().route,
                instance.handlers.len()
            );
            answered(out, RErr(message.into()))
        }
    };
    if Rt::ENTERS {
        if !call.future.is_null() {
            return entered_call::<Rt>(instance.runtime.handle(), call);
        }
        // SAFETY: a call with a null future wrote the outcome to `out`.
        unsafe { enter_stream::<Rt>(&instance.runtime.handle(), out) };
    }
    call
}

/// An event nobody handles: answered at once.
fn handled(out: *mut FfiHandleResult) -> FfiCall {
    answered(out, ROk(Handled.into_response().into_ffi()))
}

/// An event handler's call, made to enter the plugin's runtime around its later polls
/// and its drop (as a route handler's is) when it did not finish at once.
fn in_runtime<Rt: PluginRuntime>(runtime: &Rt, call: FfiCall) -> FfiCall {
    if Rt::ENTERS && !call.future.is_null() {
        return entered_call::<Rt>(runtime.handle(), call);
    }
    call
}

unsafe extern "C" fn socket_event<S: Microserver, Rt: PluginRuntime>(
    ptr: FfiInstance,
    event: FfiSocketEvent,
    cx: &mut FfiContext<'_>,
    out: *mut FfiHandleResult,
) -> FfiCall {
    // SAFETY: the contract of `PluginMod::socket_event`.
    let instance = unsafe { instance::<S, Rt>(ptr) };
    let _entered = instance.runtime.enter();
    let server = instance.server.clone();
    // `erase_event` catches panics in the handler; the waker glue does not panic.
    let call = match Event::from_ffi(event) {
        Some(Event::Message(socket, message)) => match &instance.on_message {
            Some(handler) => cx.with_context(|cx| handler(server, socket, message, cx, out)),
            None => handled(out),
        },
        Some(Event::Close(socket, close)) => match &instance.on_close {
            Some(handler) => cx.with_context(|cx| handler(server, socket, close, cx, out)),
            None => handled(out),
        },
        None => handled(out),
    };
    in_runtime(&instance.runtime, call)
}

unsafe extern "C" fn bus_event<S: Microserver, Rt: PluginRuntime>(
    ptr: FfiInstance,
    event: FfiBusEvent,
    cx: &mut FfiContext<'_>,
    out: *mut FfiHandleResult,
) -> FfiCall {
    // SAFETY: the contract of `PluginMod::bus_event`.
    let instance = unsafe { instance::<S, Rt>(ptr) };
    let _entered = instance.runtime.enter();
    let server = instance.server.clone();
    let call = match instance.on_events.get(event.subscription as usize) {
        // `erase_bus` catches panics in the handler; the waker glue does not panic.
        Some(handler) => {
            let event = crate::bus::Event::from_ffi(event);
            cx.with_context(|cx| handler(server, event, cx, out))
        }
        None => handled(out),
    };
    in_runtime(&instance.runtime, call)
}

/// Makes a streamed response body enter the runtime around its polls and its drop, like
/// the handler that returned it.
///
/// # Safety
/// `out` holds an outcome.
unsafe fn enter_stream<Rt: PluginRuntime>(handle: &Rt::Handle, out: *mut FfiHandleResult) {
    // SAFETY: the caller's promise.
    if let ROk(response) = unsafe { &mut *out } {
        if let Some(stream) = response.stream.take() {
            response.stream = entered_stream::<Rt>(handle.clone(), stream);
        }
    }
}

struct EnteredStream<Rt: PluginRuntime> {
    handle: Rt::Handle,
    stream: FfiStream,
}

fn entered_stream<Rt: PluginRuntime>(handle: Rt::Handle, stream: FfiStream) -> FfiStream {
    let state = Box::into_raw(Box::new(EnteredStream::<Rt> { handle, stream }));
    // SAFETY (`FfiStream::from_raw`): the state is boxed and `Send`; `poll_entered_stream`
    // passes each poll on to the inner stream (which keeps its own contract), and
    // `drop_entered_stream` frees it once.
    unsafe { FfiStream::from_raw(state.cast(), &EnteredStream::<Rt>::FNS) }
}

impl<Rt: PluginRuntime> EnteredStream<Rt> {
    const FNS: FfiStreamFns = FfiStreamFns {
        poll_next: poll_entered_stream::<Rt>,
        drop: drop_entered_stream::<Rt>,
    };
}

unsafe extern "C" fn poll_entered_stream<Rt: PluginRuntime>(
    state: *mut c_void,
    cx: &mut FfiContext<'_>,
) -> FfiStreamPoll {
    // SAFETY: made by `entered_stream`, polled one call at a time.
    let entered = unsafe { &mut *state.cast::<EnteredStream<Rt>>() };
    let _entered = Rt::enter_handle(&entered.handle);
    entered.stream.poll_next(cx)
}

unsafe extern "C" fn drop_entered_stream<Rt: PluginRuntime>(state: *mut c_void) {
    // SAFETY: made by `Box::into_raw` in `entered_stream`; freed once.
    let entered = unsafe { Box::from_raw(state.cast::<EnteredStream<Rt>>()) };
    let EnteredStream { handle, stream } = *entered;
    let _entered = Rt::enter_handle(&handle);
    drop(stream);
}

/// A handler's call that enters the plugin's runtime around each poll and the drop.
struct EnteredCall<Rt: PluginRuntime> {
    handle: Rt::Handle,
    call: FfiCall,
}

fn entered_call<Rt: PluginRuntime>(handle: Rt::Handle, call: FfiCall) -> FfiCall {
    FfiCall {
        future: Box::into_raw(Box::new(EnteredCall::<Rt> { handle, call })).cast(),
        poll: poll_entered::<Rt>,
        drop: drop_entered::<Rt>,
    }
}

unsafe extern "C" fn poll_entered<Rt: PluginRuntime>(
    future: *mut c_void,
    cx: &mut FfiContext<'_>,
    out: *mut FfiHandleResult,
) -> bool {
    // SAFETY: made by `entered_call`, alive until `drop_entered`; the inner call's
    // contract is passed on as it came.
    let entered = unsafe { &*future.cast::<EnteredCall<Rt>>() };
    let _entered = Rt::enter_handle(&entered.handle);
    let ready = unsafe { (entered.call.poll)(entered.call.future, cx, out) };
    if ready {
        // SAFETY: `true` means the outcome was written.
        unsafe { enter_stream::<Rt>(&entered.handle, out) };
    }
    ready
}

unsafe extern "C" fn drop_entered<Rt: PluginRuntime>(future: *mut c_void) {
    // SAFETY: made by `Box::into_raw` in `entered_call`; dropped once.
    let entered = unsafe { Box::from_raw(future.cast::<EnteredCall<Rt>>()) };
    let handle = entered.handle.clone();
    let _entered = Rt::enter_handle(&handle);
    // SAFETY: the inner call's own future, dropped once.
    unsafe { (entered.call.drop)(entered.call.future) };
}

unsafe extern "C" fn export_state<S: Microserver, Rt: PluginRuntime>(
    ptr: FfiInstance,
) -> ROption<RVec<u8>> {
    // SAFETY: the contract of `PluginMod::export_state`.
    let instance = unsafe { instance::<S, Rt>(ptr) };
    let _entered = instance.runtime.enter();
    match catch(|| instance.server.export_state().map(RVec::from)) {
        Ok(state) => state.into(),
        Err(message) => {
            host::log_panic(&format!(
                "export_state panicked (no state is handed over): {message}"
            ));
            ROption::RNone
        }
    }
}

unsafe extern "C" fn shutdown<S: Microserver, Rt: PluginRuntime>(ptr: FfiInstance) {
    // SAFETY: the contract of `PluginMod::shutdown`.
    let instance = unsafe { instance::<S, Rt>(ptr) };
    let _entered = instance.runtime.enter();
    if let Err(message) = catch(|| instance.server.shutdown()) {
        host::log_panic(&format!("the shutdown hook panicked: {message}"));
    }
}

/// The health hook for `S`, exported by `export_plugin!` under
/// [`HEALTH_SYMBOL`](crate::ffi::HEALTH_SYMBOL) (it has the type
/// [`FfiHealth`](crate::ffi::FfiHealth)).
///
/// # Safety
/// The contract of [`FfiHealth`](crate::ffi::FfiHealth).
pub unsafe extern "C" fn health<S: Microserver, Rt: PluginRuntime>(
    ptr: FfiInstance,
) -> RResult<(), RString> {
    // SAFETY: the contract of `FfiHealth`.
    let instance = unsafe { instance::<S, Rt>(ptr) };
    let _entered = instance.runtime.enter();
    // Not logged here: the host shows the reason where it is asked for (a host may ask
    // every few seconds, and a log line each time would drown the log).
    match catch(|| instance.server.health()) {
        Ok(Ok(())) => ROk(()),
        Ok(Err(reason)) => RErr(reason.into()),
        Err(message) => RErr(format!("the health hook panicked: {message}").into()),
    }
}

unsafe extern "C" fn drop_instance<S: Microserver, Rt: PluginRuntime>(
    ptr: FfiInstance,
    wait_millis: u64,
) {
    // SAFETY: `ptr` came from `Box::into_raw` in `init::<S, Rt>`; the host calls this once.
    let boxed = unsafe { Box::from_raw(ptr.0.cast::<Instance<S, Rt>>().cast_mut()) };
    let Instance {
        server,
        handlers,
        on_message,
        on_close,
        on_events,
        runtime,
    } = *boxed;
    // The instance goes first, inside its runtime (a database pool may close its
    // connections on the runtime as it is dropped); then what is left of the runtime's
    // tasks (a task may hold the last reference to the instance), and its threads.
    let entered = runtime.enter();
    let handlers = (handlers, on_message, on_close, on_events);
    if let Err(message) = catch(move || drop((handlers, server))) {
        host::log_panic(&format!("dropping the instance panicked: {message}"));
    }
    drop(entered);
    stop_runtime(runtime, Duration::from_millis(wait_millis));
}

/// How long a runtime whose `init` failed gets to stop.
const INIT_FAILED_WAIT: Duration = Duration::from_secs(1);

fn stop_runtime<Rt: PluginRuntime>(runtime: Rt, wait: Duration) {
    if let Err(message) = catch(move || runtime.stop(wait)) {
        host::log_panic(&format!(
            "stopping the plugin's runtime panicked: {message}"
        ));
    }
}

/// Builds the root module for `S`. Called once per library by the exported constructor.
pub fn root_module<S: Microserver, Rt: PluginRuntime>(
    name: &'static str,
    version: &'static str,
    init_fn: for<'a> extern "C" fn(FfiInitArgs<'a>) -> RResult<FfiInit, RString>,
) -> PluginModRef {
    PluginMod {
        name: RStr::from_str(name),
        version: RStr::from_str(version),
        init: init_fn,
        handle: handle::<S, Rt>,
        export_state: export_state::<S, Rt>,
        shutdown: shutdown::<S, Rt>,
        socket_event: socket_event::<S, Rt>,
        bus_event: bus_event::<S, Rt>,
        drop_instance: drop_instance::<S, Rt>,
    }
    .leak_into_prefix()
}
