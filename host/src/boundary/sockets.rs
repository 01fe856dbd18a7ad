//! The host's side of WebSockets that plugins see: a server's set of connections (`Hub`:
//! who is connected, the rooms) and one connection's shared half (`Conn`: its send
//! queue, its attachment, its rooms), with the C functions plugins reach them through
//! (`ffi::FfiSocketFns`).
//!
//! The socket itself (framing, pings, reading, writing) belongs to the request path
//! (`request::websocket`), which drains the queue this module fills. A hub belongs to a
//! server, not to a generation: it outlives reloads, which is how connections do.
//!
//! Invariants:
//! - A plugin's handle is a reference count on a `Hub` or a `Conn` (`Arc::into_raw`),
//!   released through the host's own code, so a handle kept by a plugin (even by an old
//!   generation, even after the connection closed) is never dangling.
//! - Sending never blocks and never grows memory without bound: each connection's queue
//!   holds at most `send_queue_bytes` (plus a fixed overhead per message); past it the
//!   message is dropped and the connection is closed with 1008.
//! - A message is turned into a frame payload once, however many connections receive it
//!   (the payload is shared, not copied).
//! - Once closed (`Conn::close_now` or a close queued), a connection accepts no more
//!   messages; once it has ended (`Hub::remove`) it is in no room.
#![allow(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::task::Poll;

use abi_stable::std_types::RVec;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use plugin_api::ffi::{
    FfiBytes, FfiMessageKind, FfiSendOutcome, FfiSocket, FfiSocketFns, FfiSockets, FfiStr,
};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// What a message costs in a send queue beyond its payload (the queue's node, the
/// frame's header): so that a flood of empty messages is bounded too.
const MESSAGE_OVERHEAD: usize = 64;

/// Largest attachment a connection may carry.
pub const MAX_ATTACHMENT: usize = 16 * 1024;

/// Ids are unique for the life of the process (0 means "none" to plugins).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What the writer of a connection sends next.
#[derive(Debug)]
pub enum Outgoing {
    Message(Message),
    /// Close after what was queued before.
    Close(CloseFrame),
    /// Look at the urgent close (`Conn::close_now`), ahead of anything still queued.
    Wake,
}

/// A connection's send queue: plugins and broadcasts push, its socket task takes.
///
/// Not a tokio channel, for one reason: a push wakes the socket task unless the task is
/// handing an event over at that moment (`quiet`), because it looks at the queue right
/// after (a plugin's answer to a message, sent from inside the hand-over, would
/// otherwise wake the very task that is running it, for one more poll).
#[derive(Debug, Default)]
struct Outbox {
    items: Mutex<VecDeque<Outgoing>>,
    /// How many items there are (read without the lock: an empty queue, the common
    /// case when the socket task looks, costs no lock).
    len: AtomicUsize,
    waker: AtomicWaker,
    quiet: AtomicBool,
    /// The socket task is gone: pushes fail.
    ended: AtomicBool,
}

impl Outbox {
    fn push(&self, item: Outgoing) -> bool {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        // Under the lock: the socket task's end sets it and empties the queue under it.
        if self.ended.load(Ordering::SeqCst) {
            return false;
        }
        items.push_back(item);
        self.len.store(items.len(), Ordering::SeqCst);
        drop(items);
        if !self.quiet.load(Ordering::SeqCst) {
            self.waker.wake();
        }
        true
    }

    fn pop(&self) -> Option<Outgoing> {
        if self.len.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let item = items.pop_front();
        self.len.store(items.len(), Ordering::SeqCst);
        item
    }
}

/// The socket task's end of a connection's queue.
#[derive(Debug)]
pub struct Outgoings {
    outbox: Arc<Outbox>,
}

impl Outgoings {
    /// The next item, without waiting.
    pub fn try_recv(&self) -> Option<Outgoing> {
        self.outbox.pop()
    }

    /// The next item.
    pub async fn recv(&self) -> Outgoing {
        std::future::poll_fn(|cx| {
            if let Some(item) = self.outbox.pop() {
                return Poll::Ready(item);
            }
            self.outbox.waker.register(cx.waker());
            match self.outbox.pop() {
                Some(item) => Poll::Ready(item),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Runs `f` (which must not wait for the queue) with pushes not waking this task:
    /// the caller takes from the queue right after.
    pub async fn quietly<F: std::future::Future>(&self, f: F) -> F::Output {
        self.outbox.quiet.store(true, Ordering::SeqCst);
        let out = f.await;
        self.outbox.quiet.store(false, Ordering::SeqCst);
        out
    }
}

impl Drop for Outgoings {
    fn drop(&mut self) {
        // What was never sent goes now, not when the last handle to the connection does.
        let mut items = self.outbox.items.lock().unwrap_or_else(|p| p.into_inner());
        self.outbox.ended.store(true, Ordering::SeqCst);
        items.clear();
        self.outbox.len.store(0, Ordering::SeqCst);
    }
}

/// The half of a connection that plugins and broadcasts reach; the socket task holds
/// the other end of its queue.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    hub: Arc<Hub>,
    queue: Arc<Outbox>,
    /// Bytes queued and not yet written (payloads plus `MESSAGE_OVERHEAD` each).
    queued: AtomicUsize,
    max_queued: usize,
    /// Set once a close was asked for (queued or urgent): no more messages are taken.
    closing: AtomicBool,
    /// A close that skips the queue (overflow, server removed, host stopping), and
    /// whether there is one (read for every message the socket task takes).
    urgent: Mutex<Option<CloseFrame>>,
    has_urgent: AtomicBool,
    /// `ws-<id>`: how the connection is named where a request id would be.
    label: Arc<str>,
    state: Mutex<ConnState>,
}

#[derive(Debug, Default)]
struct ConnState {
    attachment: Bytes,
    rooms: Vec<Arc<str>>,
    /// Taken out of the hub: joins do nothing any more.
    ended: bool,
}

/// A server's WebSocket connections and rooms. One per server, for all its generations.
#[derive(Debug)]
pub struct Hub {
    pub server: Arc<str>,
    inner: RwLock<HubInner>,
    /// The server was removed or disabled, or the host is stopping: no new connections.
    closed: AtomicBool,
    /// Wakes whoever waits for the last connection to end.
    emptied: Notify,
    /// Messages received from clients, and written to them, ever (for the metrics).
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
}

#[derive(Debug, Default)]
struct HubInner {
    conns: HashMap<u64, Arc<Conn>>,
    rooms: HashMap<Arc<str>, HashMap<u64, Arc<Conn>>>,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The server has `max` connections open.
    Full { max: usize },
    /// The server no longer takes connections (removed, disabled, host stopping).
    Closed,
}

/// Every server's hub, by the server's name (the newest, if a name was used twice).
fn hubs() -> &'static Mutex<HashMap<Arc<str>, Weak<Hub>>> {
    static HUBS: OnceLock<Mutex<HashMap<Arc<str>, Weak<Hub>>>> = OnceLock::new();
    HUBS.get_or_init(Mutex::default)
}

/// The hub of the server named `server`, if it exists.
pub fn hub_named(server: &str) -> Option<Arc<Hub>> {
    let hubs = hubs().lock().unwrap_or_else(|p| p.into_inner());
    hubs.get(server).and_then(Weak::upgrade)
}

impl Hub {
    pub fn new(server: Arc<str>) -> Arc<Self> {
        let hub = Arc::new(Hub {
            server: server.clone(),
            inner: RwLock::default(),
            closed: AtomicBool::new(false),
            emptied: Notify::new(),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
        });
        let mut hubs = hubs().lock().unwrap_or_else(|p| p.into_inner());
        hubs.retain(|_, hub| hub.strong_count() > 0);
        hubs.insert(server, Arc::downgrade(&hub));
        hub
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HubInner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HubInner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection, counted at once (so that `max` holds while its upgrade is
    /// decided), and the receiving end of its queue.
    pub fn admit(
        self: &Arc<Self>,
        max: usize,
        send_queue_bytes: usize,
    ) -> Result<(Arc<Conn>, Outgoings), Refusal> {
        let queue = Arc::new(Outbox::default());
        let rx = Outgoings {
            outbox: queue.clone(),
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            hub: self.clone(),
            queue,
            queued: AtomicUsize::new(0),
            max_queued: send_queue_bytes,
            closing: AtomicBool::new(false),
            urgent: Mutex::new(None),
            has_urgent: AtomicBool::new(false),
            label: format!("ws-{id}").into(),
            state: Mutex::default(),
        });
        let mut inner = self.write();
        if self.closed.load(Ordering::SeqCst) {
            return Err(Refusal::Closed);
        }
        if inner.conns.len() >= max {
            return Err(Refusal::Full { max });
        }
        inner.conns.insert(conn.id, conn.clone());
        Ok((conn, rx))
    }

    /// Takes a connection out: of the server's set and of its rooms. Its handles stay
    /// valid; sends to it fail.
    pub fn remove(&self, conn: &Conn) {
        conn.closing.store(true, Ordering::SeqCst);
        let rooms = {
            let mut state = conn.state();
            state.ended = true;
            std::mem::take(&mut state.rooms)
        };
        let mut inner = self.write();
        inner.conns.remove(&conn.id);
        for room in rooms {
            if let Some(members) = inner.rooms.get_mut(&room) {
                members.remove(&conn.id);
                if members.is_empty() {
                    inner.rooms.remove(&room);
                }
            }
        }
        let empty = inner.conns.is_empty();
        drop(inner);
        if empty {
            self.emptied.notify_waiters();
        }
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.read().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every connection now (1001 with `reason`) and, if `for_good`, takes no
    /// new ones (the server was removed or disabled, or the host is stopping).
    pub fn close_all(&self, reason: &str, for_good: bool) {
        if for_good {
            self.closed.store(true, Ordering::SeqCst);
        }
        let conns: Vec<Arc<Conn>> = self.read().conns.values().cloned().collect();
        for conn in conns {
            conn.close_now(CloseCode::Away, reason);
        }
    }

    /// Takes connections again (a server removed and then added back).
    pub fn reopen(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }

    /// Waits until no connection is open.
    pub async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }

    /// Queues one message for every connection of `room` (or of the server), except
    /// `except`. The payload is shared by all of them.
    pub fn broadcast(&self, room: Option<&str>, message: Message, except: u64) -> u64 {
        let inner = self.read();
        let members = match room {
            None => &inner.conns,
            Some(room) => match inner.rooms.get(room) {
                Some(members) => members,
                None => return 0,
            },
        };
        let mut sent = 0;
        for conn in members.values().filter(|c| c.id != except) {
            if conn.send(message.clone()) == FfiSendOutcome::Queued {
                sent += 1;
            }
        }
        sent
    }

    fn join(&self, conn: &Arc<Conn>, room: &str) {
        let room: Arc<str> = {
            let mut state = conn.state();
            if state.ended || state.rooms.iter().any(|r| &**r == room) {
                return;
            }
            let room: Arc<str> = room.into();
            state.rooms.push(room.clone());
            room
        };
        self.write()
            .rooms
            .entry(room)
            .or_default()
            .insert(conn.id, conn.clone());
    }

    fn leave(&self, conn: &Conn, room: &str) {
        {
            let mut state = conn.state();
            let Some(at) = state.rooms.iter().position(|r| &**r == room) else {
                return;
            };
            state.rooms.swap_remove(at);
        }
        let mut inner = self.write();
        if let Some(members) = inner.rooms.get_mut(room) {
            members.remove(&conn.id);
            if members.is_empty() {
                inner.rooms.remove(room);
            }
        }
    }

    /// A handle for a plugin's init.
    pub fn ffi(self: &Arc<Self>) -> FfiSockets {
        let raw = Arc::into_raw(self.clone()).cast::<c_void>();
        // SAFETY: `raw` holds the reference the handle owns; `SOCKET_FNS` treats a set's
        // pointer as an `Arc<Hub>` (retained and released as one) and may be called from
        // any thread.
        unsafe { FfiSockets::from_raw(raw, &SOCKET_FNS) }
    }
}

impl Conn {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// How the connection is named where a request id would be (panic reports).
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message, within the queue's budget.
    pub fn send(&self, message: Message) -> FfiSendOutcome {
        if self.closing.load(Ordering::Relaxed) {
            return FfiSendOutcome::Closed;
        }
        let cost = message.len() + MESSAGE_OVERHEAD;
        let before = self.queued.fetch_add(cost, Ordering::Relaxed);
        if before + cost > self.max_queued {
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            tracing::warn!(
                server = %self.hub.server,
                connection = self.id,
                send_queue_bytes = self.max_queued,
                "closing a WebSocket connection that reads too slowly: its send queue is full"
            );
            self.close_now(CloseCode::Policy, "send queue full");
            return FfiSendOutcome::QueueFull;
        }
        if !self.queue.push(Outgoing::Message(message)) {
            return FfiSendOutcome::Closed;
        }
        FfiSendOutcome::Queued
    }

    /// The socket task wrote a message of `len` payload bytes.
    pub fn sent(&self, len: usize) {
        self.queued
            .fetch_sub(len + MESSAGE_OVERHEAD, Ordering::Relaxed);
        self.hub.messages_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Closes after what is queued (a plugin's close).
    pub fn close(&self, code: u16, reason: &str) {
        if self.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        self.queue
            .push(Outgoing::Close(close_frame(sendable(code), reason)));
    }

    /// Closes at once, dropping what is queued.
    pub fn close_now(&self, code: CloseCode, reason: &str) {
        self.closing.store(true, Ordering::SeqCst);
        let mut urgent = self.urgent.lock().unwrap_or_else(|p| p.into_inner());
        if urgent.is_none() {
            *urgent = Some(close_frame(code, reason));
        }
        drop(urgent);
        self.has_urgent.store(true, Ordering::SeqCst);
        // Wakes the socket task, which looks at the urgent close before it writes
        // anything else it takes from the queue.
        self.queue.push(Outgoing::Wake);
    }

    /// An urgent close, if one was asked for.
    pub fn urgent_close(&self) -> Option<CloseFrame> {
        if !self.has_urgent.load(Ordering::SeqCst) {
            return None;
        }
        self.urgent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// A handle for the plugin (one more reference).
    pub fn ffi(self: &Arc<Self>) -> FfiSocket {
        let raw = Arc::into_raw(self.clone()).cast::<c_void>();
        // SAFETY: as in `Hub::ffi`, for a connection's pointer (an `Arc<Conn>`).
        unsafe { FfiSocket::from_raw(raw, &SOCKET_FNS) }
    }
}

/// A close code a server may send: the plugin's, or 1000 for one reserved for other
/// uses (1004-1006, 1015) or outside 1000-4999.
fn sendable(code: u16) -> CloseCode {
    match code {
        1004..=1006 | 1015 => CloseCode::Normal,
        1000..=4999 => CloseCode::from(code),
        _ => CloseCode::Normal,
    }
}

/// A close frame, its reason cut (at a character boundary) to the 123 bytes a control
/// frame leaves for it.
pub fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    }
}

/// A plugin's message as a frame payload, without a copy (the plugin's buffer is freed
/// by the plugin's code, which stays mapped for the life of the process); `None` for
/// text that is not UTF-8.
fn message(kind: FfiMessageKind, data: FfiBytes) -> Option<Message> {
    let bytes = match data.as_static() {
        Some(bytes) => Bytes::from_static(bytes),
        None => Bytes::from_owner(data),
    };
    match kind {
        FfiMessageKind::Binary => Some(Message::Binary(bytes)),
        FfiMessageKind::Text => Utf8Bytes::try_from(bytes).ok().map(Message::Text),
    }
}

// The C functions. Each pointer is an `Arc<Conn>` or an `Arc<Hub>` from `ffi()` (the
// contract of `FfiSocket::from_raw` / `FfiSockets::from_raw`), so borrowing it for the
// call is sound while the caller's handle lives.

/// The connection behind a handle's pointer, borrowed: the count is not touched (the
/// handle's own reference keeps it alive, and `ManuallyDrop` never releases it).
///
/// # Safety
/// `ptr` comes from `Conn::ffi` (or `sockets_socket`) and its handle is alive.
unsafe fn conn(ptr: *const c_void) -> ManuallyDrop<Arc<Conn>> {
    // SAFETY: the caller's promise: an `Arc<Conn>`'s raw pointer with a live reference.
    ManuallyDrop::new(unsafe { Arc::from_raw(ptr.cast::<Conn>()) })
}

/// # Safety
/// `ptr` comes from `Hub::ffi` and its handle is alive.
unsafe fn hub(ptr: *const c_void) -> ManuallyDrop<Arc<Hub>> {
    // SAFETY: as in `conn`.
    ManuallyDrop::new(unsafe { Arc::from_raw(ptr.cast::<Hub>()) })
}

/// # Safety
/// `s` is valid for the call (the contract of the functions below).
unsafe fn text<'a>(s: FfiStr) -> Option<&'a str> {
    // SAFETY: the caller's promise.
    std::str::from_utf8(unsafe { s.get() }).ok()
}

unsafe extern "C" fn socket_retain(ptr: *const c_void) {
    // SAFETY: an `Arc<Conn>` pointer from `Conn::ffi`, still holding a reference.
    unsafe { Arc::increment_strong_count(ptr.cast::<Conn>()) }
}

unsafe extern "C" fn socket_release(ptr: *const c_void) {
    // SAFETY: as in `socket_retain`; the handle's own reference, released once.
    unsafe { Arc::decrement_strong_count(ptr.cast::<Conn>()) }
}

unsafe extern "C" fn socket_id(ptr: *const c_void) -> u64 {
    // SAFETY: the table's contract.
    unsafe { conn(ptr) }.id
}

unsafe extern "C" fn socket_send(
    ptr: *const c_void,
    kind: FfiMessageKind,
    data: FfiBytes,
) -> FfiSendOutcome {
    // SAFETY: the table's contract.
    let conn = unsafe { conn(ptr) };
    match message(kind, data) {
        Some(message) => conn.send(message),
        None => FfiSendOutcome::NotText,
    }
}

unsafe extern "C" fn socket_close(ptr: *const c_void, code: u16, reason: FfiStr) {
    // SAFETY: the table's contract.
    let conn = unsafe { conn(ptr) };
    // SAFETY: as in `text`.
    let reason = unsafe { text(reason) }.unwrap_or("");
    conn.close(code, reason);
}

unsafe extern "C" fn socket_join(ptr: *const c_void, room: FfiStr) {
    // SAFETY: the table's contract.
    let conn = unsafe { conn(ptr) };
    // SAFETY: as in `text`.
    if let Some(room) = unsafe { text(room) } {
        conn.hub.join(&conn, room);
    }
}

unsafe extern "C" fn socket_leave(ptr: *const c_void, room: FfiStr) {
    // SAFETY: the table's contract.
    let conn = unsafe { conn(ptr) };
    // SAFETY: as in `text`.
    if let Some(room) = unsafe { text(room) } {
        conn.hub.leave(&conn, room);
    }
}

unsafe extern "C" fn socket_attachment(ptr: *const c_void) -> FfiBytes {
    // SAFETY: the table's contract.
    let conn = unsafe { conn(ptr) };
    let attachment = conn.state().attachment.clone();
    if attachment.is_empty() {
        FfiBytes::empty()
    } else {
        FfiBytes::from_owner(attachment)
    }
}

unsafe extern "C" fn socket_set_attachment(ptr: *const c_void, data: FfiBytes) -> bool {
    // SAFETY: the table's contract.
    let conn = unsafe { conn(ptr) };
    if data.len() > MAX_ATTACHMENT {
        return false;
    }
    // Copied: the plugin's buffer would be freed by the code of the generation that
    // made it, and an attachment outlives generations by design.
    conn.state().attachment = Bytes::copy_from_slice(data.as_slice());
    true
}

unsafe extern "C" fn sockets_retain(ptr: *const c_void) {
    // SAFETY: an `Arc<Hub>` pointer from `Hub::ffi`, still holding a reference.
    unsafe { Arc::increment_strong_count(ptr.cast::<Hub>()) }
}

unsafe extern "C" fn sockets_release(ptr: *const c_void) {
    // SAFETY: as in `sockets_retain`; released once.
    unsafe { Arc::decrement_strong_count(ptr.cast::<Hub>()) }
}

unsafe extern "C" fn sockets_broadcast(
    ptr: *const c_void,
    room: FfiStr,
    to_all: bool,
    kind: FfiMessageKind,
    data: FfiBytes,
    except: u64,
) -> u64 {
    // SAFETY: the table's contract.
    let hub = unsafe { hub(ptr) };
    let room = if to_all {
        None
    } else {
        // SAFETY: as in `text`.
        match unsafe { text(room) } {
            Some(room) => Some(room),
            None => return 0,
        }
    };
    match message(kind, data) {
        Some(message) => {
            // The other hosts' connections, when the bus runs over Redis.
            crate::boundary::relay::forward_broadcast(&hub.server, room, &message);
            hub.broadcast(room, message, except)
        }
        None => 0,
    }
}

unsafe extern "C" fn sockets_socket(ptr: *const c_void, id: u64) -> *const c_void {
    // SAFETY: the table's contract.
    let hub = unsafe { hub(ptr) };
    let found = hub.read().conns.get(&id).cloned();
    match found {
        Some(conn) => Arc::into_raw(conn).cast(),
        None => std::ptr::null(),
    }
}

unsafe extern "C" fn sockets_count(ptr: *const c_void, room: FfiStr, to_all: bool) -> u64 {
    // SAFETY: the table's contract.
    let hub = unsafe { hub(ptr) };
    let inner = hub.read();
    if to_all {
        return inner.conns.len() as u64;
    }
    // SAFETY: as in `text`.
    unsafe { text(room) }
        .and_then(|room| inner.rooms.get(room))
        .map_or(0, |members| members.len() as u64)
}

unsafe extern "C" fn sockets_members(ptr: *const c_void, room: FfiStr, to_all: bool) -> RVec<u64> {
    // SAFETY: the table's contract.
    let hub = unsafe { hub(ptr) };
    let inner = hub.read();
    let members = if to_all {
        Some(&inner.conns)
    } else {
        // SAFETY: as in `text`.
        unsafe { text(room) }.and_then(|room| inner.rooms.get(room))
    };
    members
        .map(|m| m.keys().copied().collect())
        .unwrap_or_default()
}

static SOCKET_FNS: FfiSocketFns = FfiSocketFns {
    socket_retain,
    socket_release,
    id: socket_id,
    send: socket_send,
    close: socket_close,
    join: socket_join,
    leave: socket_leave,
    attachment: socket_attachment,
    set_attachment: socket_set_attachment,
    sockets_retain,
    sockets_release,
    broadcast: sockets_broadcast,
    socket: sockets_socket,
    count: sockets_count,
    members: sockets_members,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_closes_the_connection_and_bounds_memory() {
        let hub = Hub::new("t".into());
        let (conn, _rx) = hub.admit(10, 1000).unwrap();
        let payload = Bytes::from(vec![b'x'; 400]);
        assert_eq!(
            conn.send(Message::Binary(payload.clone())),
            FfiSendOutcome::Queued
        );
        assert_eq!(
            conn.send(Message::Binary(payload.clone())),
            FfiSendOutcome::Queued
        );
        assert_eq!(
            conn.send(Message::Binary(payload.clone())),
            FfiSendOutcome::QueueFull
        );
        assert_eq!(conn.send(Message::Binary(payload)), FfiSendOutcome::Closed);
        let urgent = conn.urgent_close().expect("an urgent close");
        assert_eq!(urgent.code, CloseCode::Policy);
    }

    #[test]
    fn rooms_hold_members_until_they_leave_or_end() {
        let hub = Hub::new("t".into());
        let (a, _ra) = hub.admit(10, 1 << 20).unwrap();
        let (b, _rb) = hub.admit(10, 1 << 20).unwrap();
        hub.join(&a, "r");
        hub.join(&b, "r");
        hub.join(&b, "r");
        assert_eq!(hub.broadcast(Some("r"), Message::text("hi"), 0), 2);
        assert_eq!(hub.broadcast(Some("r"), Message::text("hi"), a.id()), 1);
        hub.leave(&b, "r");
        assert_eq!(hub.broadcast(Some("r"), Message::text("hi"), 0), 1);
        hub.remove(&a);
        assert!(hub.read().rooms.is_empty());
        hub.join(&a, "r");
        assert!(
            hub.read().rooms.is_empty(),
            "an ended connection joins nothing"
        );
        assert_eq!(hub.len(), 1);
    }

    #[test]
    fn the_connection_limit_and_a_closed_hub_refuse() {
        let hub = Hub::new("t".into());
        let (_a, _ra) = hub.admit(1, 1 << 20).unwrap();
        assert_eq!(hub.admit(1, 1 << 20).unwrap_err(), Refusal::Full { max: 1 });
        hub.close_all("bye", true);
        assert_eq!(hub.admit(5, 1 << 20).unwrap_err(), Refusal::Closed);
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary_and_reserved_codes_become_1000() {
        let long = "é".repeat(100);
        let frame = close_frame(CloseCode::Normal, &long);
        assert!(frame.reason.len() <= 123);
        assert_eq!(sendable(1006), CloseCode::Normal);
        assert_eq!(sendable(4001), CloseCode::from(4001));
        assert_eq!(sendable(999), CloseCode::Normal);
    }
}
