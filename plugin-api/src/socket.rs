//! WebSockets: the host owns each connection (its socket, framing, pings, limits) and
//! hands its events to whichever generation of the server is current, so connections
//! stay open while the plugin is reloaded.
//!
//! A microserver declares a WebSocket route with [`Routes::websocket`](crate::Routes::websocket)
//! (its handler sees the upgrade request and accepts or refuses it), and receives every
//! connection's messages and close through [`Routes::on_message`](crate::Routes::on_message)
//! and [`Routes::on_close`](crate::Routes::on_close). It talks back through a [`Socket`]
//! (send, close, rooms, an attachment) and reaches all of its server's connections
//! through [`Sockets`] ([`InitContext::sockets`](crate::InitContext::sockets)).
//!
//! What a connection keeps across a reload lives in the host: its rooms and its
//! attachment (bytes the plugin sets, JSON through [`Socket::set_attachment`]). A new
//! generation gets the next event of every open connection, with both.
#![allow(unsafe_code)] // the host's handles (see ffi.rs)

use std::ffi::c_void;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ffi::{
    FfiBytes, FfiMessageKind, FfiSendOutcome, FfiSocket, FfiSocketEvent, FfiSocketEventKind,
    FfiSocketFns, FfiSockets, FfiStr,
};
use crate::Error;

/// A WebSocket message: text or binary.
///
/// A message the host hands over is not copied: [`as_text`](Self::as_text) and
/// [`as_bytes`](Self::as_bytes) view the host's buffer, and sending it on (an echo)
/// hands the same buffer back.
pub struct Message {
    kind: FfiMessageKind,
    data: FfiBytes,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.as_text() {
            Some(text) => f.debug_tuple("Text").field(&text).finish(),
            None => f.debug_tuple("Binary").field(&self.data.len()).finish(),
        }
    }
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<String>) -> Self {
        Message {
            kind: FfiMessageKind::Text,
            data: FfiBytes::from_vec(text.into().into_bytes()),
        }
    }

    /// A binary message.
    pub fn binary(bytes: impl Into<Vec<u8>>) -> Self {
        Message {
            kind: FfiMessageKind::Binary,
            data: FfiBytes::from_vec(bytes.into()),
        }
    }

    /// A text message of `'static` text, which costs no allocation.
    pub fn static_text(text: &'static str) -> Self {
        Message {
            kind: FfiMessageKind::Text,
            data: FfiBytes::from_static(text.as_bytes()),
        }
    }

    /// A message of this value as JSON text.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        serde_json::to_vec(value)
            .map(|json| Message {
                kind: FfiMessageKind::Text,
                data: FfiBytes::from_vec(json),
            })
            .map_err(|e| Error::internal(format!("cannot serialize a message: {e}")))
    }

    /// Whether it is a text message.
    pub fn is_text(&self) -> bool {
        self.kind == FfiMessageKind::Text
    }

    /// The text of a text message (`None` for a binary one).
    pub fn as_text(&self) -> Option<&str> {
        if !self.is_text() {
            return None;
        }
        // The host checks that the text it hands over is UTF-8, and this crate makes
        // text messages only from `str`s; the check stays (it is cheap) so that nothing
        // here rests on the other side's word.
        std::str::from_utf8(self.data.as_slice()).ok()
    }

    /// The payload, text or binary.
    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The payload, text or binary, as an owned vector (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.as_slice().to_vec()
    }

    /// Parses a text or binary message as JSON.
    pub fn json_value<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(self.as_bytes())
            .map_err(|e| Error::bad_request(format!("invalid JSON message: {e}")))
    }

    fn into_ffi(self) -> (FfiMessageKind, FfiBytes) {
        (self.kind, self.data)
    }
}

impl From<&'static str> for Message {
    fn from(text: &'static str) -> Self {
        Message::static_text(text)
    }
}

impl From<String> for Message {
    fn from(text: String) -> Self {
        Message::text(text)
    }
}

impl From<Vec<u8>> for Message {
    fn from(bytes: Vec<u8>) -> Self {
        Message::binary(bytes)
    }
}

/// How a connection closed: the close code and reason the client sent, or the host's
/// when it closed the connection (1001 when the server was removed or the host stopped,
/// 1006 when the connection was cut without a close frame, 1008 when its send queue
/// overflowed, 1009 for a message over the size limit, 1011 when a handler failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

/// Why a message was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The connection is closed, or closing.
    Closed,
    /// The client reads too slowly: its send queue was full, so the message was dropped
    /// and the host is closing the connection (1008).
    QueueFull,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendError::Closed => "the WebSocket connection is closed",
            SendError::QueueFull => "the WebSocket connection's send queue is full",
        })
    }
}

impl std::error::Error for SendError {}

/// One of the host's WebSocket connections.
///
/// Cheap to clone (a reference count), `Send + Sync`, and valid for as long as it is
/// kept: a plugin may store sockets, or only their [`id`](Self::id)s and look them up
/// again with [`Sockets::get`]. Once the connection is closed, sends fail with
/// [`SendError::Closed`] and the rest does nothing.
///
/// A socket kept across a reload in memory is lost with the old generation's memory;
/// its id is stable and can be handed over in
/// [`export_state`](crate::Microserver::export_state).
pub struct Socket {
    ffi: FfiSocket,
}

impl Clone for Socket {
    fn clone(&self) -> Self {
        Socket {
            ffi: self.ffi.clone(),
        }
    }
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Socket").field(&self.id()).finish()
    }
}

impl Socket {
    pub(crate) fn from_ffi(ffi: FfiSocket) -> Option<Self> {
        (!ffi.is_empty()).then_some(Socket { ffi })
    }

    fn raw(&self) -> (*const c_void, &'static FfiSocketFns) {
        self.ffi.raw()
    }

    /// The connection's id: unique among the host's connections, and the same across
    /// reloads.
    pub fn id(&self) -> u64 {
        let (conn, fns) = self.raw();
        // SAFETY: `FfiSocket::from_raw`'s contract (made by the host), while `self` lives.
        unsafe { (fns.id)(conn) }
    }

    /// Queues a message for the client. It does not wait: a client that reads too
    /// slowly for its send queue is closed with 1008 instead.
    pub fn send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        let (kind, data) = message.into().into_ffi();
        let (conn, fns) = self.raw();
        // SAFETY: as in `id`.
        match unsafe { (fns.send)(conn, kind, data) } {
            FfiSendOutcome::Queued => Ok(()),
            FfiSendOutcome::QueueFull => Err(SendError::QueueFull),
            FfiSendOutcome::Closed | FfiSendOutcome::NotText => Err(SendError::Closed),
        }
    }

    /// Closes the connection with a close code (1000 for a normal close, 4000-4999 for
    /// the application's own; a code a server may not send, such as 1005 or 1006, is
    /// sent as 1000) and a reason (cut to 123 bytes). Messages queued before are sent
    /// first. The close event follows.
    pub fn close(&self, code: u16, reason: &str) {
        let (conn, fns) = self.raw();
        // SAFETY: as in `id`; the reason is valid for the call.
        unsafe { (fns.close)(conn, code, FfiStr::new(reason.as_bytes())) }
    }

    /// Puts the connection in a room of its server (rooms are made on first use).
    pub fn join(&self, room: &str) {
        let (conn, fns) = self.raw();
        // SAFETY: as in `close`.
        unsafe { (fns.join)(conn, FfiStr::new(room.as_bytes())) }
    }

    /// Takes the connection out of a room.
    pub fn leave(&self, room: &str) {
        let (conn, fns) = self.raw();
        // SAFETY: as in `close`.
        unsafe { (fns.leave)(conn, FfiStr::new(room.as_bytes())) }
    }

    /// The bytes attached to the connection (empty if none).
    pub fn attachment_bytes(&self) -> Vec<u8> {
        let (conn, fns) = self.raw();
        // SAFETY: as in `id`.
        let bytes = unsafe { (fns.attachment)(conn) };
        bytes.as_slice().to_vec()
    }

    /// Attaches bytes to the connection, in place of the ones before. They stay with the
    /// connection across reloads. At most 16 KiB.
    pub fn set_attachment_bytes(&self, bytes: impl Into<Vec<u8>>) -> Result<(), Error> {
        let (conn, fns) = self.raw();
        // SAFETY: as in `id`.
        let set = unsafe { (fns.set_attachment)(conn, FfiBytes::from_vec(bytes.into())) };
        if set || self.ffi.is_empty() {
            Ok(())
        } else {
            Err(Error::internal(
                "a WebSocket attachment may be at most 16 KiB",
            ))
        }
    }

    /// The value attached with [`set_attachment`](Self::set_attachment), read back from
    /// its JSON; `None` if nothing is attached.
    pub fn attachment<T: DeserializeOwned>(&self) -> Result<Option<T>, Error> {
        let bytes = self.attachment_bytes();
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::internal(format!("the connection's attachment: {e}")))
    }

    /// Attaches a value to the connection, as JSON (at most 16 KiB of it). It stays with
    /// the connection across reloads: a new build reads it back with
    /// [`attachment`](Self::attachment), so keep its type compatible.
    pub fn set_attachment<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        let json = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("cannot serialize an attachment: {e}")))?;
        self.set_attachment_bytes(json)
    }
}

/// All the WebSocket connections of one server (every domain, every generation): rooms
/// and broadcasts. From [`InitContext::sockets`](crate::InitContext::sockets); cheap to
/// clone, `Send + Sync`, so background tasks can keep one.
pub struct Sockets {
    ffi: FfiSockets,
}

impl Clone for Sockets {
    fn clone(&self) -> Self {
        Sockets {
            ffi: self.ffi.clone(),
        }
    }
}

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockets")
            .field("count", &self.count())
            .finish()
    }
}

impl Sockets {
    pub(crate) fn from_ffi(ffi: FfiSockets) -> Self {
        Sockets { ffi }
    }

    fn send_to(&self, room: &str, to_all: bool, message: Message, except: u64) -> usize {
        let (kind, data) = message.into_ffi();
        let (hub, fns) = self.ffi.raw();
        // SAFETY: `FfiSockets::from_raw`'s contract (made by the host), while `self`
        // lives; the room is valid for the call.
        let sent = unsafe {
            (fns.broadcast)(
                hub,
                FfiStr::new(room.as_bytes()),
                to_all,
                kind,
                data,
                except,
            )
        };
        sent as usize
    }

    /// Sends one message to every connection in `room`. The message is made once however
    /// many receive it; a receiver whose send queue is full is closed (1008) and the
    /// others are not held up. Returns how many it was queued for.
    pub fn broadcast(&self, room: &str, message: impl Into<Message>) -> usize {
        self.send_to(room, false, message.into(), 0)
    }

    /// [`broadcast`](Self::broadcast), to everyone in the room but `except` (usually the
    /// sender).
    pub fn broadcast_except(
        &self,
        room: &str,
        except: &Socket,
        message: impl Into<Message>,
    ) -> usize {
        self.send_to(room, false, message.into(), except.id())
    }

    /// Sends one message to every connection of the server.
    pub fn broadcast_all(&self, message: impl Into<Message>) -> usize {
        self.send_to("", true, message.into(), 0)
    }

    /// The open connection with this id, if it is one of this server's.
    pub fn get(&self, id: u64) -> Option<Socket> {
        let (hub, fns) = self.ffi.raw();
        // SAFETY: as in `send_to`.
        let conn = unsafe { (fns.socket)(hub, id) };
        if conn.is_null() {
            return None;
        }
        // SAFETY: the host returned a connection pointer holding a reference for us,
        // served by the same table.
        Socket::from_ffi(unsafe { FfiSocket::from_raw(conn, fns) })
    }

    /// How many connections the server has open.
    pub fn count(&self) -> usize {
        let (hub, fns) = self.ffi.raw();
        // SAFETY: as in `send_to`.
        unsafe { (fns.count)(hub, FfiStr::new(&[]), true) as usize }
    }

    /// How many connections are in `room`.
    pub fn room_count(&self, room: &str) -> usize {
        let (hub, fns) = self.ffi.raw();
        // SAFETY: as in `send_to`.
        unsafe { (fns.count)(hub, FfiStr::new(room.as_bytes()), false) as usize }
    }

    /// The ids of the connections in `room`, in no order.
    pub fn members(&self, room: &str) -> Vec<u64> {
        let (hub, fns) = self.ffi.raw();
        // SAFETY: as in `send_to`.
        unsafe { (fns.members)(hub, FfiStr::new(room.as_bytes()), false) }.into_vec()
    }
}

/// A connection's event, as the glue hands it to the plugin's handlers.
pub(crate) enum Event {
    Message(Socket, Message),
    Close(Socket, Close),
}

impl Event {
    /// `None` for an event without a connection (the host never sends one).
    pub(crate) fn from_ffi(event: FfiSocketEvent) -> Option<Self> {
        let FfiSocketEvent {
            socket,
            kind,
            code,
            data,
        } = event;
        let socket = Socket::from_ffi(socket)?;
        Some(match kind {
            FfiSocketEventKind::Text => Event::Message(
                socket,
                Message {
                    kind: FfiMessageKind::Text,
                    data,
                },
            ),
            FfiSocketEventKind::Binary => Event::Message(
                socket,
                Message {
                    kind: FfiMessageKind::Binary,
                    data,
                },
            ),
            FfiSocketEventKind::Close => Event::Close(
                socket,
                Close {
                    code,
                    reason: String::from_utf8_lossy(data.as_slice()).into_owned(),
                },
            ),
        })
    }
}
