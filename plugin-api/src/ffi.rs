//! The stable ABI between the host and a plugin library.
//!
//! Everything here is `#[repr(C)]` and derives `StableAbi`, so abi_stable can check at
//! load time that the host and the plugin agree on every layout. Plugin authors never
//! use this module: it is public only so the host (and the `export_plugin!` macro) can.
//!
//! Ownership rule: a value that owns memory carries the code that frees it (abi_stable's
//! `RVec`/`RString` vtables, [`FfiBytes::drop`]). That code lives in the library that made
//! the value, so such a value must be dropped while that library is still mapped.
//!
//! Soundness rule: safe code cannot make a value that a safe method here trusts. A
//! field that points somewhere is private and set only by a constructor that either
//! takes `'static` data or is an `unsafe fn` with its contract written down, and every
//! function pointer that takes a raw pointer is an `unsafe extern "C" fn`. Each of these
//! fails to compile:
//!
//! ```compile_fail,E0451
//! # use plugin_api::ffi::*;
//! // Only the host makes a request (`FfiRequest::from_raw` is `unsafe`).
//! fn forge(fns: &'static FfiRequestFns) -> FfiRequest {
//!     FfiRequest { data: FfiRequestData(std::ptr::null_mut()), fns }
//! }
//! ```
//!
//! ```compile_fail,E0616
//! # use plugin_api::ffi::*;
//! // The parameters `params()` reads cannot be pointed elsewhere.
//! fn repoint(head: &mut FfiRequestHead) { head.params_len = 1000; }
//! ```
//!
//! ```compile_fail,E0599
//! # use plugin_api::ffi::*;
//! // The head of a request cannot be rewritten (only its body taken).
//! fn rewrite(request: &mut FfiRequest) { let _ = request.head_mut(); }
//! ```
//!
//! ```compile_fail,E0616
//! # use plugin_api::ffi::*;
//! // A stream's state is set only by the `unsafe` `FfiStream::from_raw`.
//! fn repoint(stream: &mut FfiStream) { stream.state = std::ptr::null_mut(); }
//! ```
//!
//! ```compile_fail,E0133
//! # use plugin_api::ffi::*;
//! // A head that views memory is made only with a promise about that memory.
//! fn dangling(bytes: &[u8]) -> FfiRequestHead {
//!     let s = FfiStr::new(bytes);
//!     FfiRequestHead::new(s, s, s, s, s, s, &[], 0, FfiBytes::empty(), None)
//! }
//! ```
//!
//! ```compile_fail,E0451
//! # use plugin_api::ffi::*;
//! // A response's content type is `'static` bytes, through `FfiResponse::new` only.
//! fn temporary(text: &[u8]) -> FfiResponse {
//!     FfiResponse { status: 200, content_type: FfiStr::new(text), headers: FfiHeaders::default(), body: FfiBytes::empty(), stream: FfiStream::empty() }
//! }
//! ```
//!
//! ```compile_fail,E0521
//! # use plugin_api::ffi::*;
//! fn temporary(text: &[u8]) -> FfiResponse {
//!     FfiResponse::new(200, text, FfiHeaders::default(), FfiBytes::empty(), FfiStream::empty())
//! }
//! ```
//!
//! ```compile_fail,E0133
//! # use plugin_api::ffi::*;
//! // The host's request functions and a plugin's instance functions take raw pointers.
//! fn free_anything(fns: &FfiRequestFns) { (fns.drop)(FfiRequestData(std::ptr::null_mut())); }
//! ```
//!
//! ```compile_fail,E0133
//! # use plugin_api::ffi::*;
//! fn free_any_instance(module: PluginModRef) {
//!     (module.drop_instance())(FfiInstance(std::ptr::null()), 0);
//! }
//! ```
//!
//! ```compile_fail,E0133
//! # use plugin_api::ffi::*;
//! fn poll_anything(call: &FfiCall) { (call.drop)(std::ptr::null_mut()); }
//! ```
#![allow(unsafe_code)]

use std::ffi::c_void;

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;
use async_ffi::{FfiContext, FfiFuture};

/// Response headers other than a static `content-type` (see [`FfiResponse`]), packed
/// into one buffer: per header, the name's length and the value's length (`u32`, little
/// endian), then the name and the value. A response with none allocates nothing; the
/// first header allocates once.
#[repr(C)]
#[derive(StableAbi, Default)]
pub struct FfiHeaders {
    buf: RVec<u8>,
    len: u32,
}

impl FfiHeaders {
    /// Appends a header.
    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        let mut buf = std::mem::take(&mut self.buf).into_vec();
        buf.reserve(8 + name.len() + value.len());
        buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(name);
        buf.extend_from_slice(value);
        self.buf = RVec::from(buf);
        self.len += 1;
    }

    /// Removes every header named `name` (compared case-insensitively).
    pub fn remove(&mut self, name: &[u8]) {
        if !self.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return;
        }
        let mut kept = FfiHeaders::default();
        for (n, v) in self.iter().filter(|(n, _)| !n.eq_ignore_ascii_case(name)) {
            kept.push(n, v);
        }
        *self = kept;
    }

    /// How many headers there are.
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// (name, value) pairs, in the order they were pushed. A malformed buffer (which
    /// `push` cannot make) ends the iteration early.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut rest: &[u8] = &self.buf;
        std::iter::from_fn(move || {
            let (lens, after) = rest.split_first_chunk::<8>()?;
            let name_len = u32::from_le_bytes([lens[0], lens[1], lens[2], lens[3]]) as usize;
            let value_len = u32::from_le_bytes([lens[4], lens[5], lens[6], lens[7]]) as usize;
            let (name, after) = after.split_at_checked(name_len)?;
            let (value, after) = after.split_at_checked(value_len)?;
            rest = after;
            Some((name, value))
        })
    }
}

/// Bytes borrowed from the host's side of a request: valid for as long as the
/// [`FfiRequest`] that carries them (the host frees them when it is dropped).
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct FfiStr {
    ptr: *const u8,
    len: usize,
}

// SAFETY: an `FfiStr` is a shared view of immutable bytes; the request that owns them is
// `Send + Sync`.
unsafe impl Send for FfiStr {}
unsafe impl Sync for FfiStr {}

impl FfiStr {
    /// A view of `bytes`. The caller keeps them alive while the view is used.
    #[inline]
    pub fn new(bytes: &[u8]) -> Self {
        FfiStr {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// The bytes.
    ///
    /// # Safety
    /// The memory this view was made from must still be alive for `'a`: for the fields of
    /// an [`FfiRequest`], as long as that request.
    #[inline]
    pub unsafe fn get<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller's promise; `new` took `ptr..ptr+len` from a slice.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// One path parameter: its name and its raw (still percent-encoded) value.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct FfiParam {
    pub name: FfiStr,
    pub value: FfiStr,
}

/// The host's request object, opaque to the plugin.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct FfiRequestData(pub *mut c_void);

// SAFETY: the pointee is the host's request record, which is `Send + Sync`.
unsafe impl Send for FfiRequestData {}
unsafe impl Sync for FfiRequestData {}

/// The callback [`FfiRequestFns::each_header`] calls with `(context, name, value)`.
///
/// `unsafe`: it is called with the `context` pointer its caller passed along, which only
/// that caller knows how to read.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy)]
pub struct FfiEachHeader(pub unsafe extern "C" fn(*mut c_void, FfiStr, FfiStr));

/// What a plugin can ask of the host about a request. Every function is the host's, so a
/// request stays valid whatever happens to the library that received it.
///
/// Every function is `unsafe`: it must be called with the `data` of a live
/// [`FfiRequest`] that these functions came with (and `name` must view live bytes).
/// Plugins call them only through the safe methods of [`FfiRequest`].
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiRequestFns {
    /// The first value of a header (the name compares case-insensitively), if present.
    pub header: unsafe extern "C" fn(FfiRequestData, name: FfiStr) -> ROption<FfiStr>,
    /// Calls `each(context, name, value)` for every header, grouped by name in the order
    /// their names first appeared.
    pub each_header:
        unsafe extern "C" fn(FfiRequestData, context: *mut c_void, each: FfiEachHeader),
    /// Frees the request. Called once, by `FfiRequest`'s drop.
    pub drop: unsafe extern "C" fn(FfiRequestData),
}

/// An immutable byte buffer owned by either side, freed by the side that made it.
///
/// The host hands a request body over without copying it, and a plugin hands its
/// response body back the same way.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiBytes {
    ptr: *const u8,
    len: usize,
    /// What `drop` needs besides `ptr` and `len`: null for bytes nothing owns.
    owner: *mut c_void,
    /// `unsafe`: only with this value's own `ptr`, `len` and `owner`, once.
    drop: unsafe extern "C" fn(*const u8, usize, *mut c_void),
}

// SAFETY: an `FfiBytes` is only built from owners that are `Send + Sync` (see the
// constructors), and it gives out shared access only.
unsafe impl Send for FfiBytes {}
unsafe impl Sync for FfiBytes {}

unsafe extern "C" fn drop_nothing(_: *const u8, _: usize, _: *mut c_void) {}

unsafe extern "C" fn drop_vec(ptr: *const u8, len: usize, capacity: *mut c_void) {
    // SAFETY: made by `FfiBytes::from_vec` from a `Vec<u8>` of this pointer, length and
    // capacity, which it forgot.
    drop(unsafe { Vec::from_raw_parts(ptr.cast_mut(), len, capacity as usize) });
}

unsafe extern "C" fn drop_boxed<T>(_: *const u8, _: usize, owner: *mut c_void) {
    // SAFETY: `owner` came from `Box::into_raw(Box<T>)` in `FfiBytes::from_owner::<T>`.
    let owner = unsafe { Box::from_raw(owner.cast::<T>()) };
    // The owner is any type a plugin chose (`Body::from_owner`), and its drop may panic:
    // that must not unwind out of this `extern "C"` fn.
    let dropped = crate::export::catch(move || drop(owner));
    if let Err(message) = dropped {
        crate::host::log_panic(&format!(
            "a response body's owner panicked while it was dropped: {message}"
        ));
    }
}

impl FfiBytes {
    /// An empty buffer that owns nothing.
    #[inline]
    pub fn empty() -> Self {
        FfiBytes {
            ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(),
            len: 0,
            owner: std::ptr::null_mut(),
            drop: drop_nothing,
        }
    }

    /// Borrows bytes that live for the whole program: no allocation, nothing to free.
    #[inline]
    pub fn from_static(bytes: &'static [u8]) -> Self {
        FfiBytes {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            owner: std::ptr::null_mut(),
            drop: drop_nothing,
        }
    }

    /// Takes ownership of a vector without copying it or allocating (its capacity
    /// travels in place of an owner).
    #[inline]
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        if bytes.is_empty() {
            return Self::empty();
        }
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        FfiBytes {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            // Not null: a non-empty vector has a non-zero capacity.
            owner: bytes.capacity() as *mut c_void,
            drop: drop_vec,
        }
    }

    /// Takes ownership of any byte container without copying its contents (the
    /// container is boxed; a `Vec<u8>` is cheaper through [`from_vec`](Self::from_vec)).
    #[inline]
    pub fn from_owner<T: AsRef<[u8]> + Send + Sync + 'static>(owner: T) -> Self {
        if owner.as_ref().is_empty() {
            return Self::empty();
        }
        let boxed = Box::new(owner);
        let (ptr, len) = {
            let bytes = (*boxed).as_ref();
            (bytes.as_ptr(), bytes.len())
        };
        FfiBytes {
            ptr,
            len,
            owner: Box::into_raw(boxed).cast::<c_void>(),
            drop: drop_boxed::<T>,
        }
    }

    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` points into the owner, which lives as long as `self`
        // and is never mutated; an empty buffer uses a dangling, aligned pointer.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, if they live for the whole program (made by [`FfiBytes::from_static`]):
    /// nothing owns them, so they can be used without keeping this value.
    #[inline]
    pub fn as_static(&self) -> Option<&'static [u8]> {
        // SAFETY: a null owner means `from_static` or `empty` made this value, from a
        // `&'static [u8]`. (A plugin library stays mapped for the life of the process, so
        // its statics are `'static` for the host too.)
        self.owner
            .is_null()
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }
}

impl AsRef<[u8]> for FfiBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for FfiBytes {
    fn drop(&mut self) {
        // SAFETY: the constructors pair `drop` with this `ptr`, `len` and `owner`; the
        // fields are private, and this runs once.
        unsafe { (self.drop)(self.ptr, self.len, self.owner) };
    }
}

/// What one poll of an [`FfiStream`] gave.
#[repr(u8)]
#[derive(StableAbi)]
pub enum FfiStreamPoll {
    /// Nothing yet: the context's waker is called when there is.
    Pending,
    /// The next chunk.
    Chunk(FfiBytes),
    /// The stream has ended; it is not polled again.
    End,
    /// The stream failed (the message says how); it is not polled again.
    Failed(RString),
    /// A request body went past its route's limit (the limit, in bytes); it is not
    /// polled again.
    TooLarge(u64),
}

/// The functions of an [`FfiStream`], in a `'static` table of the side that made it.
///
/// Both are `unsafe`: only with the state of the stream they came with (see
/// [`FfiStream::from_raw`]).
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiStreamFns {
    pub poll_next:
        for<'a, 'b> unsafe extern "C" fn(*mut c_void, &'a mut FfiContext<'b>) -> FfiStreamPoll,
    pub drop: unsafe extern "C" fn(*mut c_void),
}

/// A stream of body chunks, polled and dropped through the functions of the side that
/// made it: a response body a plugin streams, or a request body the host streams to a
/// route that asked for it. Two pointers; an empty one (no stream) has a null state.
///
/// Its fields are private: a stream is made only by the `unsafe`
/// [`FfiStream::from_raw`] (or empty), and used only through
/// [`poll_next`](Self::poll_next) and its drop.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiStream {
    state: *mut c_void,
    fns: &'static FfiStreamFns,
}

// SAFETY: `from_raw`'s contract: the state may be polled and dropped from any thread.
unsafe impl Send for FfiStream {}

unsafe extern "C" fn poll_no_stream(_: *mut c_void, _: &mut FfiContext<'_>) -> FfiStreamPoll {
    FfiStreamPoll::End
}

unsafe extern "C" fn drop_no_stream(_: *mut c_void) {}

static NO_STREAM: FfiStreamFns = FfiStreamFns {
    poll_next: poll_no_stream,
    drop: drop_no_stream,
};

impl FfiStream {
    /// No stream.
    #[inline]
    pub fn empty() -> Self {
        FfiStream {
            state: std::ptr::null_mut(),
            fns: &NO_STREAM,
        }
    }

    /// A stream made of a state and the functions that poll and free it.
    ///
    /// # Safety
    /// `state` is not null; `fns.poll_next(state, cx)` must be sound to call from any
    /// thread, one call at a time, until it returns `End`, `Failed` or `TooLarge` (it
    /// is not called after that), and `fns.drop(state)` once, after which neither is
    /// called again; neither may unwind.
    #[inline]
    pub unsafe fn from_raw(state: *mut c_void, fns: &'static FfiStreamFns) -> Self {
        FfiStream { state, fns }
    }

    /// Whether there is nothing to poll: [`empty`](Self::empty), or ended. (Told by the
    /// state, not the table: each library has its own copy of the empty one.)
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.state.is_null()
    }

    /// Takes the stream out, leaving an empty one; `None` if it was empty.
    #[inline]
    pub fn take(&mut self) -> Option<FfiStream> {
        if self.is_empty() {
            return None;
        }
        Some(std::mem::replace(self, FfiStream::empty()))
    }

    /// Polls for the next chunk. Once it has returned `End`, `Failed` or `TooLarge`, it
    /// keeps returning `End` without calling the stream again.
    #[inline]
    pub fn poll_next(&mut self, cx: &mut FfiContext<'_>) -> FfiStreamPoll {
        if self.state.is_null() {
            return FfiStreamPoll::End;
        }
        // SAFETY: `from_raw`'s contract; `&mut self` makes calls one at a time.
        let polled = unsafe { (self.fns.poll_next)(self.state, cx) };
        if !matches!(polled, FfiStreamPoll::Pending | FfiStreamPoll::Chunk(_)) {
            self.finish();
        }
        polled
    }

    /// Drops the stream's state now (it ended, or nobody wants the rest).
    #[inline]
    fn finish(&mut self) {
        let state = std::mem::replace(&mut self.state, std::ptr::null_mut());
        if !state.is_null() {
            // SAFETY: `from_raw`'s contract: once, and never polled after.
            unsafe { (self.fns.drop)(state) };
        }
    }
}

impl Drop for FfiStream {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The kind of a WebSocket message.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfiMessageKind {
    /// UTF-8 text (the host checks that it is).
    Text,
    Binary,
}

/// What became of a message handed to [`FfiSocketFns::send`].
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfiSendOutcome {
    /// Queued for the client.
    Queued,
    /// The connection is closed or closing: the message was dropped.
    Closed,
    /// The connection's send queue was full: the message was dropped and the connection
    /// is being closed (1008).
    QueueFull,
    /// A text message that is not UTF-8: dropped.
    NotText,
}

/// The host's functions on its WebSocket connections ([`FfiSocket`]) and on a server's
/// set of them ([`FfiSockets`]), in one `'static` table of the host's.
///
/// Every function is `unsafe`: only with a pointer from a live [`FfiSocket`] (the
/// `socket_*` ones and `id`, `send`, `close`, `join`, `leave`, `attachment`,
/// `set_attachment`) or [`FfiSockets`] (`sockets_*`, `broadcast`, `socket`, `count`,
/// `members`), and each `FfiStr` must be valid for the call. None of them blocks.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiSocketFns {
    /// One more reference to the connection (for a clone of the handle).
    pub socket_retain: unsafe extern "C" fn(*const c_void),
    /// One reference fewer.
    pub socket_release: unsafe extern "C" fn(*const c_void),
    /// The connection's id, unique among the host's connections for the life of the
    /// process.
    pub id: unsafe extern "C" fn(*const c_void) -> u64,
    /// Queues a message for the client.
    pub send: unsafe extern "C" fn(*const c_void, FfiMessageKind, FfiBytes) -> FfiSendOutcome,
    /// Closes the connection with a close code (1000-4999) and a reason (at most 123
    /// bytes of UTF-8; cut to fit).
    pub close: unsafe extern "C" fn(*const c_void, u16, FfiStr),
    /// Puts the connection in a room of its server (created on first use).
    pub join: unsafe extern "C" fn(*const c_void, FfiStr),
    /// Takes the connection out of a room (a room with nobody left is gone).
    pub leave: unsafe extern "C" fn(*const c_void, FfiStr),
    /// The bytes attached to the connection (empty if none).
    pub attachment: unsafe extern "C" fn(*const c_void) -> FfiBytes,
    /// Attaches bytes to the connection, in place of the ones before. `false`: larger
    /// than the host allows (nothing changed).
    pub set_attachment: unsafe extern "C" fn(*const c_void, FfiBytes) -> bool,
    /// One more reference to a server's set of connections.
    pub sockets_retain: unsafe extern "C" fn(*const c_void),
    /// One reference fewer.
    pub sockets_release: unsafe extern "C" fn(*const c_void),
    /// Sends one message to every connection of a room (`to_all` false) or of the
    /// server (`to_all` true; `room` is then ignored), except the connection with id
    /// `except` (0: none). The message is made once for all of them. Returns how many
    /// connections it was queued for.
    pub broadcast: unsafe extern "C" fn(
        *const c_void,
        room: FfiStr,
        to_all: bool,
        FfiMessageKind,
        FfiBytes,
        except: u64,
    ) -> u64,
    /// The open connection with this id, if it is one of the server's: its pointer,
    /// holding one reference for the caller (to wrap with [`FfiSocket::from_raw`] and
    /// this table); else null.
    pub socket: unsafe extern "C" fn(*const c_void, id: u64) -> *const c_void,
    /// How many connections a room has (`to_all`: the server).
    pub count: unsafe extern "C" fn(*const c_void, room: FfiStr, to_all: bool) -> u64,
    /// The ids of a room's connections (`to_all`: the server's), in no order.
    pub members: unsafe extern "C" fn(*const c_void, room: FfiStr, to_all: bool) -> RVec<u64>,
}

/// A handle on one of the host's WebSocket connections: its pointer and the host's
/// functions. Cloned and dropped through those functions (a reference count), so a
/// plugin may keep it as long as it likes; once the connection is closed, sending to it
/// does nothing. An empty one (no connection) has a null pointer.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiSocket {
    conn: *const c_void,
    fns: &'static FfiSocketFns,
}

// SAFETY: `from_raw`'s contract: the host's functions may be called from any thread.
unsafe impl Send for FfiSocket {}
unsafe impl Sync for FfiSocket {}

impl FfiSocket {
    /// No connection.
    #[inline]
    pub fn empty() -> Self {
        FfiSocket {
            conn: std::ptr::null(),
            fns: &NO_SOCKETS,
        }
    }

    /// A handle on a connection, holding one reference to it.
    ///
    /// # Safety
    /// `conn` is not null and holds a reference the new handle now owns; every function
    /// of `fns` that takes a connection may be called with `conn` from any thread, at
    /// any time, until `socket_release` has been called once for each reference (the
    /// one passed in, and one per `socket_retain`).
    #[inline]
    pub unsafe fn from_raw(conn: *const c_void, fns: &'static FfiSocketFns) -> Self {
        FfiSocket { conn, fns }
    }

    /// Whether there is no connection.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.conn.is_null()
    }

    /// Takes the handle out, leaving an empty one; `None` if it was empty.
    #[inline]
    pub fn take(&mut self) -> Option<FfiSocket> {
        if self.is_empty() {
            return None;
        }
        Some(std::mem::replace(self, FfiSocket::empty()))
    }

    /// The connection's pointer and functions (null for an empty handle). The pointer is
    /// valid while this handle lives.
    #[inline]
    pub fn raw(&self) -> (*const c_void, &'static FfiSocketFns) {
        (self.conn, self.fns)
    }
}

impl Clone for FfiSocket {
    fn clone(&self) -> Self {
        if !self.conn.is_null() {
            // SAFETY: `from_raw`'s contract; this handle holds a reference.
            unsafe { (self.fns.socket_retain)(self.conn) };
        }
        FfiSocket {
            conn: self.conn,
            fns: self.fns,
        }
    }
}

impl Drop for FfiSocket {
    fn drop(&mut self) {
        if !self.conn.is_null() {
            // SAFETY: `from_raw`'s contract: the reference this handle holds, once.
            unsafe { (self.fns.socket_release)(self.conn) };
        }
    }
}

/// A handle on a server's set of WebSocket connections (its rooms, its broadcasts),
/// given to each instance at init. Reference-counted like [`FfiSocket`].
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiSockets {
    hub: *const c_void,
    fns: &'static FfiSocketFns,
}

impl std::fmt::Debug for FfiSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FfiSockets").finish_non_exhaustive()
    }
}

// SAFETY: `from_raw`'s contract: the host's functions may be called from any thread.
unsafe impl Send for FfiSockets {}
unsafe impl Sync for FfiSockets {}

impl FfiSockets {
    /// A set that is always empty (a server run outside the host, in tests).
    #[inline]
    pub fn empty() -> Self {
        FfiSockets {
            hub: std::ptr::null(),
            fns: &NO_SOCKETS,
        }
    }

    /// A handle on a server's set of connections, holding one reference to it.
    ///
    /// # Safety
    /// As [`FfiSocket::from_raw`], for the functions that take a set.
    #[inline]
    pub unsafe fn from_raw(hub: *const c_void, fns: &'static FfiSocketFns) -> Self {
        FfiSockets { hub, fns }
    }

    /// The set's pointer and functions (null for an empty one). The pointer is valid
    /// while this handle lives.
    #[inline]
    pub fn raw(&self) -> (*const c_void, &'static FfiSocketFns) {
        (self.hub, self.fns)
    }
}

impl Clone for FfiSockets {
    fn clone(&self) -> Self {
        if !self.hub.is_null() {
            // SAFETY: `from_raw`'s contract; this handle holds a reference.
            unsafe { (self.fns.sockets_retain)(self.hub) };
        }
        FfiSockets {
            hub: self.hub,
            fns: self.fns,
        }
    }
}

impl Drop for FfiSockets {
    fn drop(&mut self) {
        if !self.hub.is_null() {
            // SAFETY: `from_raw`'s contract: the reference this handle holds, once.
            unsafe { (self.fns.sockets_release)(self.hub) };
        }
    }
}

unsafe extern "C" fn no_op(_: *const c_void) {}
unsafe extern "C" fn no_id(_: *const c_void) -> u64 {
    0
}
unsafe extern "C" fn no_send(_: *const c_void, _: FfiMessageKind, _: FfiBytes) -> FfiSendOutcome {
    FfiSendOutcome::Closed
}
unsafe extern "C" fn no_close(_: *const c_void, _: u16, _: FfiStr) {}
unsafe extern "C" fn no_room(_: *const c_void, _: FfiStr) {}
unsafe extern "C" fn no_attachment(_: *const c_void) -> FfiBytes {
    FfiBytes::empty()
}
unsafe extern "C" fn no_set_attachment(_: *const c_void, _: FfiBytes) -> bool {
    false
}
unsafe extern "C" fn no_broadcast(
    _: *const c_void,
    _: FfiStr,
    _: bool,
    _: FfiMessageKind,
    _: FfiBytes,
    _: u64,
) -> u64 {
    0
}
unsafe extern "C" fn no_socket(_: *const c_void, _: u64) -> *const c_void {
    std::ptr::null()
}
unsafe extern "C" fn no_count(_: *const c_void, _: FfiStr, _: bool) -> u64 {
    0
}
unsafe extern "C" fn no_members(_: *const c_void, _: FfiStr, _: bool) -> RVec<u64> {
    RVec::new()
}

/// The table of empty handles: nothing to send to, nobody in any room.
static NO_SOCKETS: FfiSocketFns = FfiSocketFns {
    socket_retain: no_op,
    socket_release: no_op,
    id: no_id,
    send: no_send,
    close: no_close,
    join: no_room,
    leave: no_room,
    attachment: no_attachment,
    set_attachment: no_set_attachment,
    sockets_retain: no_op,
    sockets_release: no_op,
    broadcast: no_broadcast,
    socket: no_socket,
    count: no_count,
    members: no_members,
};

/// What happened on a WebSocket connection.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfiSocketEventKind {
    /// A message: `data` is its payload (UTF-8 for text).
    Text,
    Binary,
    /// The connection closed: `code` and `data` (the reason, UTF-8) are the client's,
    /// or the host's when it closed the connection (1006: it was cut without a close
    /// frame). No event follows.
    Close,
}

/// One event of a WebSocket connection, handed to the current generation of its server.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiSocketEvent {
    pub socket: FfiSocket,
    pub kind: FfiSocketEventKind,
    pub code: u16,
    pub data: FfiBytes,
}

/// One event of the bus, handed to the current generation of a server that subscribed
/// to its topic.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiBusEvent {
    /// The index of the subscription (in [`FfiInit::topics`]) it matched.
    pub subscription: u32,
    /// The topic (UTF-8).
    pub topic: FfiBytes,
    pub payload: FfiBytes,
}

/// A request a plugin sends to another server of the host ([`HostFns::call`]).
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiServiceRequest {
    /// An HTTP method, such as `GET`.
    pub method: RString,
    /// The path, with its query if any (`/users/1?full=true`).
    pub path: RString,
    pub headers: FfiHeaders,
    pub body: FfiBytes,
    /// How long the caller waits for the answer, in milliseconds (0: the host's request
    /// timeout, which also bounds any other value).
    pub timeout_ms: u64,
}

/// The fields of a request, at the start of the host's request record.
///
/// Nothing is copied to make them: the text fields are views of the host's own parsed
/// request, in the same record, and hold valid UTF-8. The fields that point somewhere
/// are private, so only [`FfiRequestHead::new`] (an `unsafe fn` with a written contract)
/// can make a head that [`params`](Self::params) trusts.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiRequestHead {
    pub method: FfiStr,
    pub path: FfiStr,
    pub query: FfiStr,
    pub domain: FfiStr,
    pub client_addr: FfiStr,
    pub request_id: FfiStr,
    /// `params_len` path parameters, in the order of the pattern.
    params: *const FfiParam,
    params_len: usize,
    /// Index into the route table the plugin returned from init.
    pub route: u32,
    /// The body. The plugin may take it (leaving an empty one in its place).
    pub body: FfiBytes,
    /// The body as a stream, for a route that asked for one (`body` is then empty),
    /// else an empty stream. The plugin may take it.
    pub body_stream: FfiStream,
    /// For a WebSocket route's upgrade request: the connection the host will open if
    /// the handler accepts (answers 101), else empty. The plugin may take it.
    pub socket: FfiSocket,
}

impl FfiRequestHead {
    /// Fields that view nothing, to be filled in when the request is handed over.
    pub fn empty() -> Self {
        FfiRequestHead {
            method: FfiStr::new(&[]),
            path: FfiStr::new(&[]),
            query: FfiStr::new(&[]),
            domain: FfiStr::new(&[]),
            client_addr: FfiStr::new(&[]),
            request_id: FfiStr::new(&[]),
            params: std::ptr::null(),
            params_len: 0,
            route: 0,
            body: FfiBytes::empty(),
            body_stream: FfiStream::empty(),
            socket: FfiSocket::empty(),
        }
    }

    /// A head whose text fields and parameters view the caller's memory.
    ///
    /// # Safety
    /// Every `FfiStr` given (the fields and each parameter's name and value) and the
    /// `params` slice itself must stay valid, unmoved and unchanged for as long as this
    /// head (and the [`FfiRequest`] it is part of) lives; the text fields must be UTF-8.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn new(
        method: FfiStr,
        path: FfiStr,
        query: FfiStr,
        domain: FfiStr,
        client_addr: FfiStr,
        request_id: FfiStr,
        params: &[FfiParam],
        route: u32,
        body: FfiBytes,
        body_stream: Option<FfiStream>,
    ) -> Self {
        FfiRequestHead {
            method,
            path,
            query,
            domain,
            client_addr,
            request_id,
            params: params.as_ptr(),
            params_len: params.len(),
            route,
            body,
            body_stream: body_stream.unwrap_or_else(FfiStream::empty),
            socket: FfiSocket::empty(),
        }
    }

    /// The path parameters.
    #[inline]
    pub fn params(&self) -> &[FfiParam] {
        if self.params_len == 0 {
            return &[];
        }
        // SAFETY: only `new` sets `params` (the fields are private), and its caller
        // promised that they live as long as this head.
        unsafe { std::slice::from_raw_parts(self.params, self.params_len) }
    }
}

/// A request as the host hands it to a plugin: two pointers, so that handing it on (into
/// a handler, into the handler's future) moves next to nothing.
///
/// `data` is the host's request record, which begins with an [`FfiRequestHead`]; the
/// host frees the record when this value is dropped. Headers are looked up through the
/// host's functions when a handler asks. The fields are private: only the host makes a
/// request, through the `unsafe` [`FfiRequest::from_raw`].
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiRequest {
    data: FfiRequestData,
    fns: &'static FfiRequestFns,
}

// SAFETY: every pointer in a request points into the host's request record, which is
// `Send + Sync` and lives until the request is dropped.
unsafe impl Send for FfiRequest {}
unsafe impl Sync for FfiRequest {}

impl Drop for FfiRequest {
    fn drop(&mut self) {
        // SAFETY: `from_raw`'s contract: `drop` frees this record, once (here).
        unsafe { (self.fns.drop)(self.data) };
    }
}

impl FfiRequest {
    /// A request made of the host's record and functions.
    ///
    /// # Safety
    /// `data` must point at a live record that begins with an [`FfiRequestHead`] made
    /// by [`FfiRequestHead::new`] (whose contract holds for the record's whole life),
    /// that nothing else reads or writes while this value lives, and that `fns` can
    /// read (`header`, `each_header`) and free once (`drop`, called when this value is
    /// dropped).
    pub unsafe fn from_raw(data: FfiRequestData, fns: &'static FfiRequestFns) -> Self {
        FfiRequest { data, fns }
    }

    /// The request's fields.
    #[inline]
    pub fn head(&self) -> &FfiRequestHead {
        // SAFETY: `from_raw`'s contract: `data` points at the live record, which begins
        // with the head.
        unsafe { &*self.data.0.cast::<FfiRequestHead>() }
    }

    /// Takes the body out of the request, leaving an empty one.
    #[inline]
    pub fn take_body(&mut self) -> FfiBytes {
        // SAFETY: as in `head`; `&mut self` is the only handle to the record.
        let head = unsafe { &mut *self.data.0.cast::<FfiRequestHead>() };
        std::mem::replace(&mut head.body, FfiBytes::empty())
    }

    /// Takes the body stream out of the request, if it has one.
    #[inline]
    pub fn take_body_stream(&mut self) -> Option<FfiStream> {
        // SAFETY: as in `take_body`.
        let head = unsafe { &mut *self.data.0.cast::<FfiRequestHead>() };
        head.body_stream.take()
    }

    /// Takes the WebSocket connection out of the request (empty if it has none).
    #[inline]
    pub fn take_socket(&mut self) -> FfiSocket {
        // SAFETY: as in `take_body`.
        let head = unsafe { &mut *self.data.0.cast::<FfiRequestHead>() };
        head.socket.take().unwrap_or_else(FfiSocket::empty)
    }

    /// The first value of a header (names compare case-insensitively), if present. The
    /// bytes live as long as this request.
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        // SAFETY: `from_raw`'s contract; `name` is alive during the call. The value the
        // host returns views the record, which lives as long as `self`.
        unsafe {
            (self.fns.header)(self.data, FfiStr::new(name))
                .into_option()
                .map(|v| v.get())
        }
    }

    /// Calls `each(name, value)` for every header, names grouped in the order they first
    /// appeared.
    pub fn each_header<'a, F: FnMut(&'a [u8], &'a [u8])>(&'a self, each: F) {
        /// The closure, and the payload of its panic, if it panicked.
        struct Visit<F> {
            each: F,
            panicked: Option<Box<dyn std::any::Any + Send>>,
        }
        unsafe extern "C" fn call<'a, F: FnMut(&'a [u8], &'a [u8])>(
            context: *mut c_void,
            name: FfiStr,
            value: FfiStr,
        ) {
            // SAFETY: `context` is the `Visit` below, borrowed for the duration of the
            // host's call; the views live as long as the request (`'a`).
            let visit = unsafe { &mut *context.cast::<Visit<F>>() };
            if visit.panicked.is_some() {
                return;
            }
            // A panic must not unwind into the host's function: it is caught here and
            // resumed once the host's function has returned.
            let each = &mut visit.each;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                each(name.get(), value.get())
            }));
            visit.panicked = outcome.err();
        }
        let mut visit = Visit {
            each,
            panicked: None,
        };
        // SAFETY: `from_raw`'s contract; `call::<F>` reads `context` as a `Visit<F>`.
        unsafe {
            (self.fns.each_header)(
                self.data,
                (&raw mut visit).cast::<c_void>(),
                FfiEachHeader(call::<'a, F>),
            )
        }
        if let Some(payload) = visit.panicked {
            std::panic::resume_unwind(payload);
        }
    }
}

/// A handler call that did not finish on its first poll: the handler's future, boxed in
/// the plugin, polled and dropped through the plugin's functions.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiCall {
    /// The future; null when the handler answered at once (nothing left to poll or drop).
    pub future: *mut c_void,
    /// Polls the future. On `true` the outcome has been written to the last argument.
    ///
    /// `unsafe`: only with this call's `future`, from one thread at a time, and with
    /// room for one outcome behind the last argument.
    pub poll: for<'a, 'b> unsafe extern "C" fn(
        *mut c_void,
        &'a mut FfiContext<'b>,
        *mut FfiHandleResult,
    ) -> bool,
    /// Drops the future (the host drops a call early when it times out or the client
    /// goes away). `unsafe`: once, with this call's `future`.
    pub drop: unsafe extern "C" fn(*mut c_void),
}

// SAFETY: the future is a handler's future, which `export_plugin!` requires to be `Send`.
unsafe impl Send for FfiCall {}

/// A response as a plugin hands it back. Small (about 100 bytes), because it is moved
/// from the handler to the host on every request.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiResponse {
    pub status: u16,
    /// The `content-type`, when it is known at compile time (set by `Response::text`,
    /// `json` and the like): `'static` bytes of the plugin, or empty for none. Empty
    /// whenever a `content-type` is among `headers` (plugin-api keeps one of the two).
    /// Private: only [`FfiResponse::new`] sets it, from `'static` bytes.
    content_type: FfiStr,
    pub headers: FfiHeaders,
    pub body: FfiBytes,
    /// A body sent as it is produced, instead of `body` (which is then empty); else an
    /// empty stream.
    pub stream: FfiStream,
}

impl FfiResponse {
    /// A response with a `content-type` known at compile time (empty for none).
    #[inline]
    pub fn new(
        status: u16,
        content_type: &'static [u8],
        headers: FfiHeaders,
        body: FfiBytes,
        stream: FfiStream,
    ) -> Self {
        FfiResponse {
            status,
            content_type: FfiStr::new(content_type),
            headers,
            body,
            stream,
        }
    }

    /// The static `content-type`, as the `'static` bytes it is.
    pub(crate) fn static_content_type(&self) -> &'static [u8] {
        // SAFETY: as in `content_type`: only `new` sets it, from `'static` bytes.
        unsafe { self.content_type.get() }
    }

    /// The bytes of the static `content-type` (empty for none).
    #[inline]
    pub fn content_type(&self) -> &[u8] {
        // SAFETY: only `new` sets it, from `'static` bytes (a plugin library stays mapped
        // for the life of the process, so its statics are `'static` for the host too).
        unsafe { self.content_type.get() }
    }
}

/// One entry of a microserver's route table.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiRoute {
    /// An HTTP method in upper case, or `*` for any method.
    pub method: RString,
    /// A path pattern: `/users/{id}` for a named segment, `/{*rest}` for a catch-all.
    pub pattern: RString,
    /// `Some(limit)`: the route takes its request body as a stream
    /// ([`FfiRequestHead::body_stream`]) of at most `limit` bytes, instead of the whole
    /// body read first under the server's `max_body_bytes`.
    pub stream_body_limit: ROption<u64>,
    /// A WebSocket route: its handler gets upgrade requests with a connection in
    /// [`FfiRequestHead::socket`], and accepts by answering 101.
    pub websocket: bool,
}

/// An opaque pointer to a microserver instance living inside the plugin.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct FfiInstance(pub *const c_void);

// SAFETY: the pointee is a `Microserver`, which is `Send + Sync` by its trait bounds.
unsafe impl Send for FfiInstance {}
unsafe impl Sync for FfiInstance {}

/// What init returns on success.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiInit {
    pub instance: FfiInstance,
    pub routes: RVec<FfiRoute>,
    /// Route index that answers any path no route matched, if the plugin set one.
    pub fallback: ROption<u32>,
    /// The bus topics the instance subscribes to (events come to `bus_event` with their
    /// index here).
    pub topics: RVec<RString>,
}

/// What the host passes to init.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiInitArgs<'a> {
    pub server_name: RStr<'a>,
    /// The server's `config` object from `servers.config.json`, as JSON text.
    pub config_json: RStr<'a>,
    /// State exported by the previous generation of this server, if any.
    pub previous_state: ROption<RSlice<'a, u8>>,
    pub host: HostFnsRef,
    /// The server's set of WebSocket connections (the same set for every generation).
    pub sockets: FfiSockets,
}

/// The outcome of one request: a response, or the message of a panic in the handler.
pub type FfiHandleResult = RResult<FfiResponse, RString>;

/// A log event forwarded from a plugin to the host's subscriber.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiLogRecord<'a> {
    /// 1 = error, 2 = warn, 3 = info, 4 = debug, 5 = trace.
    pub level: u8,
    pub plugin: RStr<'a>,
    pub target: RStr<'a>,
    pub message: RStr<'a>,
    /// Other fields, already formatted as `key=value` pairs separated by spaces.
    pub fields: RStr<'a>,
}

/// Functions the host offers to plugins. Futures they return are built by the host and
/// run on the host's runtime, which is why plugins can await them.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostFnsRef)))]
// Functions after `last_prefix_field` are read as `Option`s: under the version promise
// a plugin is never built against a newer plugin-api than its host's, so they are
// always there, but a missing one must be a `None` rather than a panic.
#[sabi(missing_field(option))]
pub struct HostFns {
    /// The most verbose level the host will record (same numbering as `FfiLogRecord`;
    /// 0 = off).
    pub max_log_level: extern "C" fn() -> u8,
    pub log: for<'a> extern "C" fn(FfiLogRecord<'a>),
    #[sabi(last_prefix_field)]
    pub sleep: extern "C" fn(nanos: u64) -> FfiFuture<()>,
    /// Whether the calling thread is one of the host's (added in 0.4.0). Plugin code runs
    /// on a host thread only inside plugin-api's entry points, which catch every panic
    /// and report it once; the panic hook asks this to log by itself only the panics on
    /// the plugin's own threads.
    pub on_host_thread: extern "C" fn() -> bool,
    /// Publishes `payload` on the bus under `topic`: queued for every server that
    /// subscribes to it (and other hosts, with a shared backend). Never blocks. Returns
    /// how many servers of this host it was queued for.
    pub publish: for<'a> extern "C" fn(topic: RStr<'a>, payload: FfiBytes) -> u64,
    /// Sends a request to a server of this host by name, with no socket, to whatever
    /// generation is current. The response is the host's (its body read whole): a
    /// missing or waiting server answers 503, a panic 500, a slow one 504, as for any
    /// client.
    pub call: for<'a> extern "C" fn(server: RStr<'a>, FfiServiceRequest) -> FfiFuture<FfiResponse>,
}

/// A plugin's health hook (added in 0.6.1), exported beside the root module under the
/// name [`HEALTH_SYMBOL`]: `ROk` if the instance can serve, else why not (a panic in the
/// hook is caught and comes back as an error too). It blocks for as long as the plugin's
/// hook does, so the host calls it on a thread of its own.
///
/// Not a field of [`PluginMod`]: abi_stable's layout check refuses a library whose root
/// module has fewer fields than the host's, so a field appended in a patch release would
/// turn away every plugin built against the earlier one. A library built against 0.6.0
/// has no such symbol, and the host counts it as healthy.
///
/// `unsafe`: as [`PluginMod::export_state`], only with an instance this library's `init`
/// returned and `drop_instance` has not freed.
pub type FfiHealth = unsafe extern "C" fn(FfiInstance) -> RResult<(), RString>;

/// The exported name of a library's [`FfiHealth`] hook, with its terminating NUL.
pub const HEALTH_SYMBOL: &[u8] = b"plugin_host_health_v1\0";

/// The root module every plugin library exports.
///
/// A prefix type, but abi_stable's check refuses a library whose root module has fewer
/// fields than the host's, so a field appended here would refuse every plugin built
/// before it: anything a patch release adds travels beside it instead (see
/// [`FfiHealth`]; the version promise in ARCHITECTURE.md).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin's name (its crate name).
    pub name: RStr<'static>,
    /// The plugin's own version (its crate version).
    pub version: RStr<'static>,
    pub init: for<'a> extern "C" fn(FfiInitArgs<'a>) -> RResult<FfiInit, RString>,
    /// Starts a handler and polls it once. If it answers at once, the outcome is written
    /// to the last argument and the returned call has a null future; otherwise the host
    /// polls the call until it answers.
    ///
    /// `unsafe` (like every function here that takes an [`FfiInstance`]): only with an
    /// instance this module's `init` returned and `drop_instance` has not freed, and with
    /// room for one outcome behind the last argument.
    pub handle: for<'a, 'b> unsafe extern "C" fn(
        FfiInstance,
        FfiRequest,
        &'a mut FfiContext<'b>,
        *mut FfiHandleResult,
    ) -> FfiCall,
    /// Called once when the instance is being replaced: its state to hand to the next
    /// generation's init, if it has any.
    pub export_state: unsafe extern "C" fn(FfiInstance) -> ROption<RVec<u8>>,
    pub shutdown: unsafe extern "C" fn(FfiInstance),
    /// Hands a WebSocket event to the instance, like `handle` (the outcome's response is
    /// not used; an error is a panic's message).
    pub socket_event: for<'a, 'b> unsafe extern "C" fn(
        FfiInstance,
        FfiSocketEvent,
        &'a mut FfiContext<'b>,
        *mut FfiHandleResult,
    ) -> FfiCall,
    /// Hands a bus event to the instance, like `handle`.
    pub bus_event: for<'a, 'b> unsafe extern "C" fn(
        FfiInstance,
        FfiBusEvent,
        &'a mut FfiContext<'b>,
        *mut FfiHandleResult,
    ) -> FfiCall,
    /// Frees the instance; it is not used again. A plugin with a runtime of its own
    /// then cancels the runtime's tasks and joins its threads, waiting at most
    /// `wait_millis` for them.
    #[sabi(last_prefix_field)]
    pub drop_instance: unsafe extern "C" fn(FfiInstance, wait_millis: u64),
}

impl RootModule for PluginModRef {
    abi_stable::declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "plugin_host_plugin";
    const NAME: &'static str = "plugin-api";
    #[cfg(not(plugin_api_0_6_0_layout))]
    const VERSION_STRINGS: VersionStrings = abi_stable::package_version_strings!();
    /// `--cfg plugin_api_0_6_0_layout` builds a plugin as plugin-api 0.6.0 did (no
    /// health hook): the tests load one to show that such a library still loads.
    #[cfg(plugin_api_0_6_0_layout)]
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("0.6.0");
}

/// The exported symbol that holds a library's header. It must equal
/// `abi_stable::library::ROOT_MODULE_LOADER_NAME`; a unit test checks that.
#[doc(hidden)]
#[macro_export]
macro_rules! __root_module_symbol {
    () => {
        "_1as_0lib_1header_0root_bmodule_bloader"
    };
}
