//! One request across the plugin boundary: the request record the host lends to a
//! plugin, and the call that answers it.
//!
//! Nothing about the request is copied for the plugin. The parsed request (hyper's
//! `Parts`) is boxed once, and the `FfiRequest` the plugin receives holds views of it
//! plus the host functions that read headers and free the box. Whoever drops the
//! `FfiRequest` last (usually the plugin's handler, when it finishes with its `Request`)
//! frees it through the host's own code, so the record is valid however long a handler
//! keeps it and whatever happens to the library afterwards.
//!
//! Invariant: every `FfiStr` handed out points into the boxed record (or into heap memory
//! the record owns, or into `'static` data), and the record does not move or change
//! after it is handed over.
#![allow(unsafe_code)]

use std::borrow::Cow;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::future::Future;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};

use abi_stable::std_types::ROption;
use async_ffi::{ContextExt, FfiContext};
use bytes::Bytes;
use hyper::body::{Body as _, Incoming};
use hyper::header::HeaderValue;
use hyper::http::request::Parts;
use plugin_api::ffi::{
    FfiBusEvent, FfiBytes, FfiCall, FfiEachHeader, FfiHandleResult, FfiParam, FfiRequest,
    FfiRequestData, FfiRequestFns, FfiRequestHead, FfiSocket, FfiSocketEvent, FfiStr, FfiStream,
    FfiStreamFns, FfiStreamPoll,
};
use smallvec::SmallVec;

use crate::boundary::plugin::Instance;
use crate::boundary::request_id::RequestId;

/// A client's socket address as text, made once per connection and copied into each
/// request record (no allocation, no reference count), and whether the connection is
/// TLS.
#[derive(Clone, Copy)]
pub struct ClientAddr {
    len: u8,
    tls: bool,
    buf: [u8; 64],
}

impl ClientAddr {
    pub fn new(addr: SocketAddr) -> Self {
        let mut out = ClientAddr {
            len: 0,
            tls: false,
            buf: [0; 64],
        };
        // The longest, `[v6%scope]:port`, is 58 bytes.
        let _ = write!(out, "{addr}");
        out
    }

    /// The address of a service call's request, which comes from no socket.
    pub fn internal() -> Self {
        let mut out = ClientAddr {
            len: 0,
            tls: false,
            buf: [0; 64],
        };
        let _ = out.write_str("internal");
        out
    }

    /// The same client, on a TLS connection.
    pub fn over_tls(self) -> Self {
        ClientAddr { tls: true, ..self }
    }

    /// The text's bytes (ASCII: an address and a port, or `internal`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    /// The client's IP address, read back from the text (`None` for `internal`). Only
    /// what needs it pays for it: a per-client-IP rate limit.
    pub fn ip(&self) -> Option<IpAddr> {
        let text = std::str::from_utf8(self.as_bytes()).ok()?;
        let host = match text.strip_prefix('[') {
            Some(v6) => v6.split(']').next()?,
            None => text.rsplit_once(':')?.0,
        };
        // `[fe80::1%2]:80`: the scope is no part of the address.
        host.split('%').next()?.parse().ok()
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }
}

impl std::fmt::Write for ClientAddr {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let start = self.len as usize;
        let end = start + s.len();
        let slot = self.buf.get_mut(start..end).ok_or(std::fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end as u8;
        Ok(())
    }
}

/// The host's record of one request, as lent to a plugin. It begins with the fields the
/// plugin reads (the `FfiRequest` points at the record), followed by what they view.
#[repr(C)]
struct Record {
    head: FfiRequestHead,
    parts: Parts,
    client: ClientAddr,
    request_id: RequestId,
    /// The normalised domain, when it differs from the bytes the client sent.
    domain: Option<Box<[u8]>>,
    params: Params,
    /// Headers whose values the host decides, whatever the client sent. Boxed: most
    /// requests have none, and the record stays small.
    header: Option<Box<HostHeaders>>,
}

/// A request header the host sets for the plugin (the tenant, `x-tenant`; a verified
/// token's claims, `x-jwt-claims`): under `name` the plugin reads `value`, or no header
/// at all for `None`, whatever the client sent under that name. The client's headers
/// themselves are left as they are; the host's functions that read headers answer for
/// this one.
pub struct HostHeader {
    /// Lower case.
    pub name: &'static str,
    pub value: Option<HeaderValue>,
}

/// The headers the host sets for one request (names differ).
pub type HostHeaders = SmallVec<[HostHeader; 2]>;

/// `headers` with `header` added (boxed when it is the first).
pub fn add_host_header(headers: &mut Option<Box<HostHeaders>>, header: HostHeader) {
    headers.get_or_insert_with(Box::default).push(header);
}

/// Path parameters: views of the path (names are `'static`). A few live in the record
/// itself, so a route with parameters costs no allocation of its own.
pub type Params = SmallVec<[FfiParam; 4]>;

/// A request record not yet handed to a plugin; freed if it never is.
pub struct PendingRequest(NonNull<Record>);

// SAFETY: it owns a `Record`, which is `Send + Sync`.
unsafe impl Send for PendingRequest {}
unsafe impl Sync for PendingRequest {}

/// Path parameters being filled in by [`PendingRequest::lend`]'s caller: names are
/// `'static`, values must be views of the request's own `Parts` (`'p`), so that every
/// view handed to the plugin points into the record.
pub struct ParamSink<'r, 'p> {
    params: &'r mut Params,
    _parts: std::marker::PhantomData<&'p Parts>,
}

impl<'p> ParamSink<'_, 'p> {
    pub fn push(&mut self, name: &'static str, value: &'p str) {
        self.params.push(FfiParam {
            name: FfiStr::new(name.as_bytes()),
            value: FfiStr::new(value.as_bytes()),
        });
    }
}

/// What a request is lent with: its domain (a view of the request's `Host` or
/// `:authority`, or a normalised copy), its route, and whether the route takes its body
/// as a stream (with its limit).
pub struct Lending<'p> {
    pub domain: Cow<'p, [u8]>,
    pub route: u32,
    pub stream_body_limit: Option<u64>,
    /// For a WebSocket route's upgrade request: the connection it would open.
    pub socket: Option<FfiSocket>,
    /// Headers the host decides (see [`HostHeader`]).
    pub header: Option<Box<HostHeaders>>,
}

/// A request's body as it is lent: read whole, or still arriving (for a route that takes
/// its body as a stream; boxed, as it is the rare case).
pub enum LentBody {
    Bytes(Bytes),
    Stream(Box<Incoming>),
}

impl PendingRequest {
    pub fn new(parts: Parts, client: &ClientAddr, request_id: RequestId) -> Self {
        // Written in place: `Box::new` would build the record (half a kilobyte) on the
        // stack and then copy it.
        let mut record = Box::<Record>::new_uninit();
        let p = record.as_mut_ptr();
        // SAFETY: every field is written once, in place, before `assume_init`.
        let record = unsafe {
            (&raw mut (*p).head).write(FfiRequestHead::empty());
            (&raw mut (*p).parts).write(parts);
            (&raw mut (*p).client).write(*client);
            (&raw mut (*p).request_id).write(request_id);
            (&raw mut (*p).domain).write(None);
            (&raw mut (*p).params).write(Params::new());
            (&raw mut (*p).header).write(None);
            record.assume_init()
        };
        PendingRequest(NonNull::from(Box::leak(record)))
    }

    /// Whether the request came over TLS.
    pub fn is_tls(&self) -> bool {
        // SAFETY: the record is alive and only read until it is lent or dropped.
        unsafe { self.0.as_ref().client.is_tls() }
    }

    /// The request as hyper parsed it.
    pub fn parts(&self) -> &Parts {
        // SAFETY: the record is alive and only read until it is lent or dropped.
        unsafe { &self.0.as_ref().parts }
    }

    /// The client's address.
    pub fn client(&self) -> &ClientAddr {
        // SAFETY: as in `parts`.
        unsafe { &self.0.as_ref().client }
    }

    /// The request as hyper parsed it, for a request no plugin will see (one that static
    /// files answer). Frees the record.
    pub fn into_parts(self) -> Parts {
        let record = self.0.as_ptr();
        std::mem::forget(self);
        // SAFETY: made by `Box::leak` in `new` and never handed over; `self` is
        // forgotten, so this is the only free.
        unsafe { Box::from_raw(record) }.parts
    }

    /// Lends the request to a plugin, if `route` says where: `route` sees the request's
    /// `Parts`, fills in the path parameters and returns the domain and route index
    /// (plus anything of its own, `T`), or refuses with `X` (the request comes back).
    ///
    /// Every view in the `FfiRequest` points into the record, because `route` can only
    /// give views of the `Parts` it was lent (`'p`, chosen here) or `'static` data: this
    /// function is safe however it is called. A view of anything else does not compile:
    ///
    /// ```compile_fail,E0521
    /// # use host::boundary::call::{Lending, LentBody, PendingRequest};
    /// fn lend_a_temporary(pending: PendingRequest, temporary: &[u8]) {
    ///     let _ = pending.lend(LentBody::Bytes(bytes::Bytes::new()), |_, _| {
    ///         let domain = std::borrow::Cow::Borrowed(temporary);
    ///         Ok::<_, ()>((Lending { domain, route: 0, stream_body_limit: None, socket: None, header: None }, ()))
    ///     });
    /// }
    /// ```
    ///
    /// ```compile_fail,E0521
    /// # use host::boundary::call::{Lending, LentBody, PendingRequest};
    /// fn a_parameter_from_elsewhere(pending: PendingRequest, value: &str) {
    ///     let _ = pending.lend(LentBody::Bytes(bytes::Bytes::new()), |_, params| {
    ///         params.push("id", value);
    ///         Ok::<_, ()>((Lending { domain: b"x".into(), route: 0, stream_body_limit: None, socket: None, header: None }, ()))
    ///     });
    /// }
    /// ```
    #[allow(clippy::type_complexity)]
    ///
    /// A body still arriving ([`LentBody::Stream`]) may only be lent to a route that
    /// takes a stream: `route` refuses the others (so that its caller reads the body
    /// first); if it does not, the plugin gets the stream anyway and an empty body.
    pub fn lend<T, X>(
        mut self,
        body: LentBody,
        route: impl for<'r, 'p> FnOnce(&'p Parts, &mut ParamSink<'r, 'p>) -> Result<(Lending<'p>, T), X>,
    ) -> Result<(FfiRequest, T), (Self, LentBody, X)> {
        // SAFETY: the record is alive, and `&mut self` is its only handle; the two
        // borrows are of different fields and end before the record is handed over.
        let record = unsafe { self.0.as_mut() };
        record.params.clear();
        let mut sink = ParamSink {
            params: &mut record.params,
            _parts: std::marker::PhantomData,
        };
        let (lending, extra) = match route(&record.parts, &mut sink) {
            Ok(done) => done,
            Err(refused) => return Err((self, body, refused)),
        };
        let ptr = self.0.as_ptr();
        // Hold on to the normalised domain (when there is one) in the record; a view
        // stays a view (of `parts`, which does not move: it is boxed).
        let domain = match lending.domain {
            Cow::Borrowed(view) => FfiStr::new(view),
            Cow::Owned(owned) => {
                // SAFETY: `ptr` is the live record; nothing borrows its `domain` field.
                let slot = unsafe { &mut (*ptr).domain };
                FfiStr::new(slot.insert(owned.into_boxed_slice()))
            }
        };
        if let Some(header) = lending.header {
            // SAFETY: `ptr` is the live record; nothing borrows its `header` field.
            unsafe { (*ptr).header = Some(header) };
        }
        let route = lending.route;
        debug_assert!(
            lending.stream_body_limit.is_some() || matches!(body, LentBody::Bytes(_)),
            "a body still arriving was lent to a route that reads it whole"
        );
        let (body, body_stream) = match (body, lending.stream_body_limit) {
            (LentBody::Bytes(bytes), None) if bytes.is_empty() => (FfiBytes::empty(), None),
            (LentBody::Bytes(bytes), None) => (FfiBytes::from_owner(bytes), None),
            (LentBody::Bytes(bytes), Some(limit)) => (
                FfiBytes::empty(),
                Some(body_stream(BodySource::Read(Some(bytes)), limit)),
            ),
            (LentBody::Stream(incoming), limit) => (
                FfiBytes::empty(),
                Some(body_stream(
                    BodySource::Arriving(incoming),
                    limit.unwrap_or(u64::MAX),
                )),
            ),
        };
        std::mem::forget(self);
        // SAFETY: `ptr` is the live record this value owned; from here on the
        // `FfiRequest` owns it. The fields the head views are only borrowed shared (a
        // `&mut` to the whole record would invalidate the views `route` made of
        // `parts`), and only the head is written, in place.
        let (parts, client, request_id, params) = unsafe {
            (
                &(*ptr).parts,
                &(*ptr).client,
                &(*ptr).request_id,
                &(*ptr).params,
            )
        };
        let uri = &parts.uri;
        // SAFETY (`FfiRequestHead::new`): every view is of the boxed record (`parts`,
        // which `route` could only lend from, `client`, `request_id`, `domain`,
        // `params`) or `'static`, and the record neither moves nor changes until the
        // `FfiRequest` frees it; the text fields are UTF-8 (hyper's method and URI are
        // ASCII; a domain was checked or normalised to text by the router).
        let mut head = unsafe {
            FfiRequestHead::new(
                FfiStr::new(parts.method.as_str().as_bytes()),
                FfiStr::new(uri.path().as_bytes()),
                FfiStr::new(uri.query().unwrap_or("").as_bytes()),
                domain,
                FfiStr::new(client.as_bytes()),
                FfiStr::new(request_id.as_bytes()),
                params,
                route,
                body,
                body_stream,
            )
        };
        if let Some(socket) = lending.socket {
            head.socket = socket;
        }
        // SAFETY: the head is the record's own field; the empty head it replaces owns
        // nothing, and is dropped here.
        drop(unsafe { std::ptr::replace(&raw mut (*ptr).head, head) });
        // SAFETY (`FfiRequest::from_raw`): the record begins with the head just made,
        // nothing else touches it from now on, and `REQUEST_FNS` read and free exactly
        // this kind of record.
        let request = unsafe { FfiRequest::from_raw(FfiRequestData(ptr.cast()), &REQUEST_FNS) };
        Ok((request, extra))
    }
}

/// Where a streamed request body comes from.
enum BodySource {
    /// Already read whole (the route changed to a streaming one meanwhile): one chunk.
    Read(Option<Bytes>),
    /// Still arriving from the client.
    Arriving(Box<Incoming>),
}

/// A request body streamed to a plugin: polled through the host's own functions, from
/// whatever thread the plugin polls it on, and never past `limit` bytes.
struct HostBodyStream {
    source: BodySource,
    limit: u64,
    seen: u64,
}

fn body_stream(source: BodySource, limit: u64) -> FfiStream {
    let state = Box::into_raw(Box::new(HostBodyStream {
        source,
        limit,
        seen: 0,
    }));
    // SAFETY (`FfiStream::from_raw`): the state is a boxed `Send` value (hyper's body
    // is `Send`), polled one call at a time by `poll_body` and freed once by
    // `drop_body`; neither unwinds.
    unsafe { FfiStream::from_raw(state.cast(), &BODY_FNS) }
}

static BODY_FNS: FfiStreamFns = FfiStreamFns {
    poll_next: poll_body,
    drop: drop_body,
};

unsafe extern "C" fn poll_body(state: *mut c_void, cx: &mut FfiContext<'_>) -> FfiStreamPoll {
    // SAFETY: made by `body_stream`, alive until `drop_body`, polled one call at a time.
    let stream = unsafe { &mut *state.cast::<HostBodyStream>() };
    // Nothing here should panic; if hyper did, the panic must not unwind into the
    // plugin's `extern "C"` caller.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cx.with_context(|cx| stream.poll(cx))
    }))
    .unwrap_or_else(|_| FfiStreamPoll::Failed("the host failed to read the body".into()))
}

impl HostBodyStream {
    fn poll(&mut self, cx: &mut Context<'_>) -> FfiStreamPoll {
        let data = match &mut self.source {
            BodySource::Read(bytes) => match bytes.take() {
                Some(bytes) => bytes,
                None => return FfiStreamPoll::End,
            },
            BodySource::Arriving(incoming) => loop {
                match Pin::new(&mut **incoming).poll_frame(cx) {
                    Poll::Pending => return FfiStreamPoll::Pending,
                    Poll::Ready(None) => return FfiStreamPoll::End,
                    Poll::Ready(Some(Err(e))) => {
                        return FfiStreamPoll::Failed(e.to_string().into())
                    }
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if !data.is_empty() => break data,
                        // Trailers, or an empty chunk: nothing for the plugin.
                        _ => continue,
                    },
                }
            },
        };
        self.seen = self.seen.saturating_add(data.len() as u64);
        if self.seen > self.limit {
            return FfiStreamPoll::TooLarge(self.limit);
        }
        if data.is_empty() {
            return FfiStreamPoll::End;
        }
        FfiStreamPoll::Chunk(FfiBytes::from_owner(data))
    }
}

unsafe extern "C" fn drop_body(state: *mut c_void) {
    // SAFETY: made by `Box::into_raw` in `body_stream`, freed once.
    let stream = unsafe { Box::from_raw(state.cast::<HostBodyStream>()) };
    // Dropping hyper's body should not panic (h2 does on a poisoned lock); a panic must
    // not unwind into the plugin's `extern "C"` caller.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(stream))).is_err() {
        tracing::error!("dropping a streamed request body panicked");
    }
}

impl Drop for PendingRequest {
    fn drop(&mut self) {
        // SAFETY: made by `Box::leak` in `new`, and not handed over.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

static REQUEST_FNS: FfiRequestFns = FfiRequestFns {
    header,
    each_header,
    drop: drop_record,
};

/// # Safety
/// `data` is the record of a live `FfiRequest` (the contract of `FfiRequestFns`).
unsafe fn record<'a>(data: FfiRequestData) -> &'a Record {
    // SAFETY: the caller's promise.
    unsafe { &*data.0.cast::<Record>() }
}

// None of these functions can panic (a panic may not unwind out of `extern "C"`). Their
// contract is `FfiRequestFns`': `data` is a live record these functions were lent with.

unsafe extern "C" fn header(data: FfiRequestData, name: FfiStr) -> ROption<FfiStr> {
    // SAFETY: the plugin passes a view of its own string, alive during the call.
    let name = unsafe { name.get() };
    let Ok(name) = std::str::from_utf8(name) else {
        return ROption::RNone;
    };
    // SAFETY: the contract above.
    let record = unsafe { record(data) };
    if let Some(own) = &record.header {
        if let Some(own) = own.iter().find(|h| name.eq_ignore_ascii_case(h.name)) {
            return match &own.value {
                Some(value) => ROption::RSome(FfiStr::new(value.as_bytes())),
                None => ROption::RNone,
            };
        }
    }
    // `HeaderMap::get` compares names case-insensitively, and finds nothing for an
    // invalid name.
    match record.parts.headers.get(name) {
        Some(value) => ROption::RSome(FfiStr::new(value.as_bytes())),
        None => ROption::RNone,
    }
}

unsafe extern "C" fn each_header(data: FfiRequestData, context: *mut c_void, each: FfiEachHeader) {
    // SAFETY: the contract above; `each` is the caller's, called with its own context
    // and views of the record that live as long as the request.
    let record = unsafe { record(data) };
    let own = record.header.as_deref().map_or(&[][..], |h| &h[..]);
    for (name, value) in &record.parts.headers {
        // Names are lower case in a `HeaderMap`.
        if own.iter().any(|own| name.as_str() == own.name) {
            continue;
        }
        unsafe {
            (each.0)(
                context,
                FfiStr::new(name.as_str().as_bytes()),
                FfiStr::new(value.as_bytes()),
            )
        };
    }
    for (name, value) in own.iter().filter_map(|h| Some((h.name, h.value.as_ref()?))) {
        unsafe {
            (each.0)(
                context,
                FfiStr::new(name.as_bytes()),
                FfiStr::new(value.as_bytes()),
            )
        };
    }
}

unsafe extern "C" fn drop_record(data: FfiRequestData) {
    // SAFETY: `FfiRequest::drop` calls this once, with the record `lend` handed over.
    drop(unsafe { Box::from_raw(data.0.cast::<Record>()) });
}

/// `'static` copies of path-parameter names, so a request can point at them whatever
/// becomes of the route table. One copy per distinct name for the life of the process.
pub fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<std::collections::HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    match names.get(name) {
        Some(interned) => interned,
        None => {
            let interned: &'static str = Box::leak(name.into());
            names.insert(interned);
            interned
        }
    }
}

/// Where a plugin writes a handler's outcome. It lives in the request's own future, so
/// the response (a few hundred bytes) is read where it was written, not moved through
/// every layer on its way out.
pub struct OutcomeSlot {
    value: MaybeUninit<FfiHandleResult>,
    full: bool,
}

impl OutcomeSlot {
    pub fn new() -> Self {
        OutcomeSlot {
            value: MaybeUninit::uninit(),
            full: false,
        }
    }

    pub fn get_mut(&mut self) -> Option<&mut FfiHandleResult> {
        // SAFETY: `full` is set only once the value is written.
        self.full.then(|| unsafe { self.value.assume_init_mut() })
    }

    fn take_out(&mut self) {
        if std::mem::take(&mut self.full) {
            // SAFETY: it was full; `full` is now false, so it is dropped once.
            unsafe { self.value.assume_init_drop() };
        }
    }
}

impl Default for OutcomeSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OutcomeSlot {
    fn drop(&mut self) {
        self.take_out();
    }
}

/// Starts a handler: calls into the plugin, which polls it once with this task's context.
/// `None` means it answered at once, into `slot`; otherwise the call is still running.
pub fn start(
    instance: &Instance,
    request: FfiRequest,
    cx: &mut Context<'_>,
    slot: &mut OutcomeSlot,
) -> Option<PluginCall> {
    slot.take_out();
    let out = slot.value.as_mut_ptr();
    // SAFETY: `out` is the slot's room for one outcome.
    let call = cx.with_ffi_context(|cx| unsafe { instance.handle(request, cx, out) });
    slot.started(call)
}

/// Hands a WebSocket event to a plugin, like [`start`].
pub fn start_event(
    instance: &Instance,
    event: FfiSocketEvent,
    cx: &mut Context<'_>,
    slot: &mut OutcomeSlot,
) -> Option<PluginCall> {
    slot.take_out();
    let out = slot.value.as_mut_ptr();
    // SAFETY: `out` is the slot's room for one outcome.
    let call = cx.with_ffi_context(|cx| unsafe { instance.socket_event(event, cx, out) });
    slot.started(call)
}

/// Hands a bus event to a plugin, like [`start`].
pub fn start_bus_event(
    instance: &Instance,
    event: FfiBusEvent,
    cx: &mut Context<'_>,
    slot: &mut OutcomeSlot,
) -> Option<PluginCall> {
    slot.take_out();
    let out = slot.value.as_mut_ptr();
    // SAFETY: `out` is the slot's room for one outcome.
    let call = cx.with_ffi_context(|cx| unsafe { instance.bus_event(event, cx, out) });
    slot.started(call)
}

impl OutcomeSlot {
    /// A call just started with this slot's room: answered into it, or still running.
    #[inline]
    fn started(&mut self, call: FfiCall) -> Option<PluginCall> {
        if call.future.is_null() {
            // A call with a null future means the plugin wrote the outcome.
            self.full = true;
            None
        } else {
            Some(PluginCall(call))
        }
    }
}

/// A handler still running inside a plugin. Dropping it drops the handler's future (in
/// the plugin's code, which catches its panics).
pub struct PluginCall(FfiCall);

impl Future for PluginCall {
    type Output = FfiHandleResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<FfiHandleResult> {
        let call = &self.0;
        let mut out = MaybeUninit::<FfiHandleResult>::uninit();
        // SAFETY: the plugin made this call for this future; it is polled from one task
        // at a time (`&mut self`), with room for one outcome.
        let ready =
            cx.with_ffi_context(|cx| unsafe { (call.poll)(call.future, cx, out.as_mut_ptr()) });
        if ready {
            // SAFETY: `true` means the plugin wrote the outcome.
            Poll::Ready(unsafe { out.assume_init() })
        } else {
            Poll::Pending
        }
    }
}

impl Drop for PluginCall {
    fn drop(&mut self) {
        // SAFETY: the call's own future, dropped once (here).
        unsafe { (self.0.drop)(self.0.future) };
    }
}
