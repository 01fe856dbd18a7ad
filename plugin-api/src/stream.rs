//! Bodies sent and received as streams: a response sent as it is produced
//! ([`Response::with_stream`], server-sent events with [`Response::sse`]), and a request
//! body read chunk by chunk ([`BodyStream`], for routes declared with
//! [`Routes::streaming`](crate::Routes::streaming)).
//!
//! Both are pull-based: the host polls a response stream only when the client's
//! connection can take more (a client that stops reading stops the producer, and memory
//! stays bounded by the socket buffers), and reads a request body from the client only
//! as the handler asks for chunks.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fmt::Write as _;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::task::{Context, Poll};

use abi_stable::std_types::RString;
use async_ffi::{ContextExt, FfiContext};
pub use futures_core::Stream;

use crate::export::catch;
use crate::ffi::{FfiStream, FfiStreamFns, FfiStreamPoll};
use crate::{Body, Error, Response};

/// One chunk of a streamed response: what a [`Response::with_stream`] stream may yield.
///
/// Bytes (`Vec<u8>`, `String`, `&'static str`, `&'static [u8]`, a [`Body`]) are sent as
/// they are. A `Result` sends its `Ok` value, and an `Err` ends the response as failed:
/// the host logs the error with the request id and aborts the response (HTTP/1 closes the
/// connection before the final chunk, HTTP/2 resets the stream), so the client can tell
/// it is incomplete.
pub trait IntoChunk {
    /// The bytes, or the message of a failure.
    fn into_chunk(self) -> Result<Body, String>;
}

impl IntoChunk for Body {
    fn into_chunk(self) -> Result<Body, String> {
        Ok(self)
    }
}

macro_rules! chunk_from_body {
    ($($t:ty),*) => {$(
        impl IntoChunk for $t {
            fn into_chunk(self) -> Result<Body, String> {
                Ok(Body::from(self))
            }
        }
    )*};
}
chunk_from_body!(Vec<u8>, String, &'static str, &'static [u8]);

impl<T: IntoChunk, E: std::fmt::Display> IntoChunk for Result<T, E> {
    fn into_chunk(self) -> Result<Body, String> {
        match self {
            Ok(chunk) => chunk.into_chunk(),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A server-sent event (`text/event-stream`), for [`Response::sse`].
///
/// ```
/// # use plugin_api::stream::Event;
/// let e = Event::data("line one\nline two").event("tick").id("7");
/// assert_eq!(e.to_string(), "event: tick\nid: 7\ndata: line one\ndata: line two\n\n");
/// assert_eq!(Event::comment("keep-alive").to_string(), ": keep-alive\n\n");
/// // A line break of any kind starts a new `data:` line, never a field of its own.
/// assert_eq!(Event::data("a\rid: 9").to_string(), "data: a\ndata: id: 9\n\n");
/// assert_eq!(Event::data("").to_string(), "data:\n\n");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Event {
    event: Option<String>,
    id: Option<String>,
    retry_ms: Option<u64>,
    data: Option<String>,
    comment: Option<String>,
}

impl Event {
    /// An event carrying `data` (sent as one `data:` line per line of it).
    pub fn data(data: impl Into<String>) -> Self {
        Event {
            data: Some(data.into()),
            ..Event::default()
        }
    }

    /// An event whose data is `value` as JSON.
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        serde_json::to_string(value)
            .map(Event::data)
            .map_err(|e| Error::internal(format!("cannot serialize the event: {e}")))
    }

    /// A comment line, which clients ignore (handy as a keep-alive).
    pub fn comment(text: impl Into<String>) -> Self {
        Event {
            comment: Some(text.into()),
            ..Event::default()
        }
    }

    /// The event's type (`event:`); clients listen for it by name.
    pub fn event(mut self, name: impl Into<String>) -> Self {
        self.event = Some(name.into());
        self
    }

    /// The event's id (`id:`), which a reconnecting client sends back as `Last-Event-ID`.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// How long a client waits before reconnecting (`retry:`).
    pub fn retry(mut self, millis: u64) -> Self {
        self.retry_ms = Some(millis);
        self
    }
}

/// The event in the wire format. Line breaks in the name and id (which the format cannot
/// carry) are replaced by spaces.
impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let one_line = |s: &str| s.replace(['\r', '\n'], " ");
        if let Some(comment) = &self.comment {
            for line in lines(comment) {
                writeln!(f, ": {line}")?;
            }
        }
        if let Some(event) = &self.event {
            writeln!(f, "event: {}", one_line(event))?;
        }
        if let Some(id) = &self.id {
            writeln!(f, "id: {}", one_line(id))?;
        }
        if let Some(retry) = self.retry_ms {
            writeln!(f, "retry: {retry}")?;
        }
        if let Some(data) = &self.data {
            for line in lines(data) {
                if line.is_empty() {
                    writeln!(f, "data:")?;
                } else {
                    writeln!(f, "data: {line}")?;
                }
            }
        }
        writeln!(f)
    }
}

/// The lines of `text` as the event-stream format reads them: ended by `\r\n`, `\r` or
/// `\n` (so none of them can start a field of its own). An empty text is one empty line.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            Some(at) => {
                let after = if current[at..].starts_with("\r\n") {
                    at + 2
                } else {
                    at + 1
                };
                rest = Some(&current[after..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

impl IntoChunk for Event {
    fn into_chunk(self) -> Result<Body, String> {
        let mut text = String::new();
        let _ = write!(text, "{self}");
        Ok(Body::from(text))
    }
}

impl Response {
    /// A `200 OK` whose body is sent as `stream` produces it, chunk by chunk (HTTP/1.1
    /// chunked encoding, HTTP/2 data frames). Set the `content-type` as usual.
    ///
    /// The host polls the stream only when the client can take more, so a slow client
    /// slows the producer; when the client goes away, the stream is dropped. A reload
    /// lets a stream finish on its own generation, up to the reload's
    /// `drain_timeout_ms`, after which the host ends the response cleanly (the client
    /// sees a complete, shorter body) and drops the stream.
    ///
    /// ```
    /// # use plugin_api::Response;
    /// # use plugin_api::stream::Stream;
    /// fn numbers(stream: impl Stream<Item = String> + Send + 'static) -> Response {
    ///     Response::stream(stream).with_content_type("text/plain; charset=utf-8")
    /// }
    /// ```
    pub fn stream<S>(stream: S) -> Self
    where
        S: Stream + Send + 'static,
        S::Item: IntoChunk,
    {
        Response::new(200).with_stream(stream)
    }

    /// Replaces the body with a stream (see [`Response::stream`]).
    pub fn with_stream<S>(mut self, stream: S) -> Self
    where
        S: Stream + Send + 'static,
        S::Item: IntoChunk,
    {
        self.set_stream(ffi_stream(stream));
        self
    }

    /// A `200 OK` stream of server-sent events (`text/event-stream`, not cached, not
    /// buffered by proxies that honour `x-accel-buffering`).
    ///
    /// ```
    /// # use plugin_api::{Response, stream::{Event, Stream}};
    /// fn ticks(events: impl Stream<Item = Event> + Send + 'static) -> Response {
    ///     Response::sse(events)
    /// }
    /// ```
    pub fn sse<S>(events: S) -> Self
    where
        S: Stream + Send + 'static,
        S::Item: IntoChunk,
    {
        Response::stream(events)
            .with_content_type("text/event-stream")
            .with_header("cache-control", "no-cache")
            .with_header("x-accel-buffering", "no")
    }
}

/// Wraps a stream so that it can be polled and dropped through the C ABI, panics caught.
pub(crate) fn ffi_stream<S>(stream: S) -> FfiStream
where
    S: Stream + Send + 'static,
    S::Item: IntoChunk,
{
    let state = Box::into_raw(Box::new(CatchStream(ManuallyDrop::new(stream))));
    // SAFETY (`FfiStream::from_raw`): the state is a boxed `Send` stream, polled in place
    // (it never moves: boxed) by `poll_stream` and freed once by `drop_stream`; both
    // catch every panic.
    unsafe { FfiStream::from_raw(state.cast(), &CatchStream::<S>::FNS) }
}

impl<S> CatchStream<S>
where
    S: Stream,
    S::Item: IntoChunk,
{
    const FNS: FfiStreamFns = FfiStreamFns {
        poll_next: poll_stream::<S>,
        drop: drop_stream::<S>,
    };
}

struct CatchStream<S>(ManuallyDrop<S>);

impl<S> Drop for CatchStream<S> {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, in place.
        let dropped = catch(|| unsafe { ManuallyDrop::drop(&mut self.0) });
        if let Err(message) = dropped {
            crate::host::log_panic(&format!(
                "a response stream panicked while it was dropped: {message}"
            ));
        }
    }
}

unsafe extern "C" fn poll_stream<S>(state: *mut c_void, cx: &mut FfiContext<'_>) -> FfiStreamPoll
where
    S: Stream,
    S::Item: IntoChunk,
{
    // SAFETY: the boxed `CatchStream<S>` made by `ffi_stream`; boxed, so never moved.
    let stream = unsafe { Pin::new_unchecked(&mut *(*state.cast::<CatchStream<S>>()).0) };
    let polled = catch(|| cx.with_context(|cx| stream.poll_next(cx)));
    match polled {
        Ok(Poll::Pending) => FfiStreamPoll::Pending,
        Ok(Poll::Ready(None)) => FfiStreamPoll::End,
        Ok(Poll::Ready(Some(item))) => match catch(|| item.into_chunk()) {
            Ok(Ok(chunk)) => FfiStreamPoll::Chunk(chunk.0),
            Ok(Err(message)) => FfiStreamPoll::Failed(RString::from(message)),
            Err(panic) => FfiStreamPoll::Failed(RString::from(format!("panicked: {panic}"))),
        },
        Err(panic) => FfiStreamPoll::Failed(RString::from(format!("panicked: {panic}"))),
    }
}

unsafe extern "C" fn drop_stream<S>(state: *mut c_void) {
    // SAFETY: made by `Box::into_raw` in `ffi_stream`, freed once; `CatchStream`'s drop
    // catches the stream's panics.
    drop(unsafe { Box::from_raw(state.cast::<CatchStream<S>>()) });
}

/// A stream made from a state and an async step: `step(state)` gives the next item and
/// the next state, or `None` to end. The same as `futures::stream::unfold`, here so
/// that a plugin needs no other crate for a simple stream (any [`Stream`] works, from
/// `futures`, `tokio-stream` or `async-stream`).
///
/// ```
/// # use std::time::Duration;
/// # use plugin_api::stream::{unfold, Event};
/// # use plugin_api::Response;
/// // A tick every second, numbered.
/// let ticks = unfold(0u64, |n| async move {
///     plugin_api::sleep(Duration::from_secs(1)).await;
///     Some((Event::data(n.to_string()).event("tick"), n + 1))
/// });
/// let response = Response::sse(ticks);
/// ```
pub fn unfold<T, F, Fut, Item>(state: T, step: F) -> Unfold<T, F, Fut>
where
    F: FnMut(T) -> Fut,
    Fut: std::future::Future<Output = Option<(Item, T)>>,
{
    Unfold {
        state: Some(state),
        step,
        pending: None,
    }
}

/// The stream [`unfold`] makes.
pub struct Unfold<T, F, Fut> {
    state: Option<T>,
    step: F,
    pending: Option<Pin<Box<Fut>>>,
}

impl<T, F, Fut> std::fmt::Debug for Unfold<T, F, Fut> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unfold").finish_non_exhaustive()
    }
}

impl<T, F, Fut, Item> Stream for Unfold<T, F, Fut>
where
    F: FnMut(T) -> Fut + Unpin,
    T: Unpin,
    Fut: std::future::Future<Output = Option<(Item, T)>>,
{
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = &mut *self;
        if this.pending.is_none() {
            let Some(state) = this.state.take() else {
                return Poll::Ready(None);
            };
            this.pending = Some(Box::pin((this.step)(state)));
        }
        let step = this.pending.as_mut().expect("set above");
        let next = std::task::ready!(step.as_mut().poll(cx));
        this.pending = None;
        Poll::Ready(next.map(|(item, state)| {
            this.state = Some(state);
            item
        }))
    }
}

/// Why a streamed request body stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// The body went past the route's limit (in bytes).
    TooLarge(u64),
    /// The client went away or sent a malformed body.
    Failed(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge(limit) => {
                write!(
                    f,
                    "the request body is larger than the limit of {limit} bytes"
                )
            }
            BodyError::Failed(message) => write!(f, "could not read the request body: {message}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// 413 for a body over the limit, 400 otherwise.
impl From<BodyError> for Error {
    fn from(e: BodyError) -> Self {
        let status = match e {
            BodyError::TooLarge(_) => 413,
            BodyError::Failed(_) => 400,
        };
        Error::new(status, e.to_string())
    }
}

/// A request body read chunk by chunk, from [`Request::body_stream`](crate::Request::body_stream).
///
/// ```
/// # use plugin_api::{Error, Request};
/// async fn count(mut req: Request) -> Result<String, Error> {
///     let mut body = req.body_stream().ok_or_else(|| Error::bad_request("no body stream"))?;
///     let mut total = 0;
///     while let Some(chunk) = body.next().await {
///         total += chunk?.len();
///     }
///     Ok(format!("{total} bytes"))
/// }
/// ```
pub struct BodyStream {
    raw: FfiStream,
}

impl std::fmt::Debug for BodyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyStream").finish_non_exhaustive()
    }
}

impl BodyStream {
    pub(crate) fn new(raw: FfiStream) -> Self {
        BodyStream { raw }
    }

    /// The next chunk; `None` at the end of the body.
    pub async fn next(&mut self) -> Option<Result<Body, BodyError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for BodyStream {
    type Item = Result<Body, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match cx.with_ffi_context(|cx| self.raw.poll_next(cx)) {
            FfiStreamPoll::Pending => Poll::Pending,
            FfiStreamPoll::Chunk(bytes) => Poll::Ready(Some(Ok(Body(bytes)))),
            FfiStreamPoll::End => Poll::Ready(None),
            FfiStreamPoll::Failed(message) => {
                Poll::Ready(Some(Err(BodyError::Failed(message.into_string()))))
            }
            FfiStreamPoll::TooLarge(limit) => Poll::Ready(Some(Err(BodyError::TooLarge(limit)))),
        }
    }
}
