//! Responses, and the conversions handlers may return instead of building one.

use serde::Serialize;

use crate::ffi::{FfiBytes, FfiHeaders, FfiResponse, FfiStream};

/// An HTTP response.
///
/// ```
/// # use plugin_api::Response;
/// let r = Response::text("created")
///     .with_status(201)
///     .with_header("location", "/notes/1");
/// assert_eq!(r.status(), 201);
/// ```
///
/// A response has one `content-type`: the last one set wins.
pub struct Response {
    status: u16,
    /// A `content-type` known at compile time; empty when none is, or when it is among
    /// `headers`.
    content_type: &'static str,
    headers: FfiHeaders,
    body: FfiBytes,
    /// A body sent as it is produced (see [`Response::stream`]), instead of `body`.
    stream: FfiStream,
}

const CONTENT_TYPE: &str = "content-type";

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .field("streamed", &!self.stream.is_empty())
            .finish_non_exhaustive()
    }
}

impl Default for Response {
    fn default() -> Self {
        Response::new(200)
    }
}

impl Response {
    /// An empty response with the given status.
    #[inline]
    pub fn new(status: u16) -> Self {
        Response {
            status,
            content_type: "",
            headers: FfiHeaders::default(),
            body: FfiBytes::empty(),
            stream: FfiStream::empty(),
        }
    }

    /// A `200 OK` with a `text/plain; charset=utf-8` body (a `String`, or a
    /// `&'static str`, which costs no allocation).
    #[inline]
    pub fn text(body: impl Into<Body>) -> Self {
        Response::new(200)
            .with_content_type("text/plain; charset=utf-8")
            .with_body(body)
    }

    /// A `200 OK` with `value` serialized as the JSON body.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(bytes) => Response::new(200)
                .with_content_type("application/json")
                .with_body(bytes),
            Err(e) => {
                crate::Error::internal(format!("cannot serialize response: {e}")).into_response()
            }
        }
    }

    /// Replaces the status.
    #[inline]
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Sets the `content-type`, replacing any. A `&'static str` costs nothing to hand
    /// over; for one made at run time, use [`with_header`](Self::with_header).
    #[inline]
    pub fn with_content_type(mut self, value: &'static str) -> Self {
        self.headers.remove(CONTENT_TYPE.as_bytes());
        self.content_type = value;
        self
    }

    /// Adds a header (a `content-type` replaces the one set before). Names and values
    /// the host cannot send turn the response into a 500.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if name.eq_ignore_ascii_case(CONTENT_TYPE) {
            self.content_type = "";
            self.headers.remove(CONTENT_TYPE.as_bytes());
        }
        self.headers.push(name.as_bytes(), value.as_bytes());
        self
    }

    /// Replaces the body without copying it: a `Vec<u8>` or `String` is handed over as
    /// it is, a `&'static str` or `&'static [u8]` is not even allocated, and a request's
    /// [`Body`] (from [`Request::take_body`](crate::Request::take_body)) goes back out
    /// untouched.
    #[inline]
    pub fn with_body(mut self, body: impl Into<Body>) -> Self {
        self.body = body.into().0;
        if !self.stream.is_empty() {
            self.stream = FfiStream::empty();
        }
        self
    }

    pub(crate) fn set_stream(&mut self, stream: FfiStream) {
        self.body = FfiBytes::empty();
        self.stream = stream;
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// The body (empty for a streamed one: see [`is_streamed`](Self::is_streamed)).
    pub fn body(&self) -> &[u8] {
        self.body.as_slice()
    }

    /// Whether the body is a stream (made by [`Response::stream`] or [`Response::sse`]).
    pub fn is_streamed(&self) -> bool {
        !self.stream.is_empty()
    }

    /// Takes the body's stream out (for tests that read it: see
    /// [`TestServer::read_stream`](crate::testing::TestServer::read_stream)).
    pub(crate) fn take_stream(&mut self) -> Option<FfiStream> {
        self.stream.take()
    }

    /// The first value of a header, if any (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        if !self.content_type.is_empty() && name.eq_ignore_ascii_case(CONTENT_TYPE) {
            return Some(self.content_type);
        }
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// A response a handler made, back from the boundary (see `testing`).
    pub(crate) fn from_ffi(response: FfiResponse) -> Self {
        // Set only from a `&'static str` (`into_ffi`), so it is UTF-8.
        let content_type = std::str::from_utf8(response.static_content_type()).unwrap_or("");
        Response {
            status: response.status,
            content_type,
            headers: response.headers,
            body: response.body,
            stream: response.stream,
        }
    }

    #[doc(hidden)]
    #[inline]
    pub fn into_ffi(self) -> FfiResponse {
        FfiResponse::new(
            self.status,
            self.content_type.as_bytes(),
            self.headers,
            self.body,
            self.stream,
        )
    }
}

/// A body: bytes owned by either side of the boundary, moved, never copied.
///
/// ```
/// # use plugin_api::{Body, Response};
/// let r = Response::text("static text, no allocation");
/// let r = Response::new(200).with_body(Body::from(vec![1, 2, 3]));
/// assert_eq!(r.body(), &[1, 2, 3]);
/// ```
pub struct Body(pub(crate) FfiBytes);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body").field("len", &self.0.len()).finish()
    }
}

impl Body {
    #[inline]
    pub fn empty() -> Self {
        Body(FfiBytes::empty())
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_slice()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes any byte container as a body without copying its bytes (the container is
    /// boxed, and dropped once the host has sent the body). For a `Vec<u8>` or a
    /// `String`, `Body::from` is cheaper.
    ///
    /// ```
    /// # use plugin_api::{Body, Response};
    /// let shared: std::sync::Arc<[u8]> = std::sync::Arc::from(&b"cached page"[..]);
    /// let r = Response::new(200).with_body(Body::from_owner(shared.clone()));
    /// assert_eq!(r.body(), b"cached page");
    /// ```
    pub fn from_owner<T: AsRef<[u8]> + Send + Sync + 'static>(owner: T) -> Self {
        Body(FfiBytes::from_owner(owner))
    }
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl From<Vec<u8>> for Body {
    #[inline]
    fn from(v: Vec<u8>) -> Self {
        Body(FfiBytes::from_vec(v))
    }
}

impl From<String> for Body {
    #[inline]
    fn from(s: String) -> Self {
        Body::from(s.into_bytes())
    }
}

impl From<&'static [u8]> for Body {
    #[inline]
    fn from(b: &'static [u8]) -> Self {
        Body(FfiBytes::from_static(b))
    }
}

impl From<&'static str> for Body {
    #[inline]
    fn from(s: &'static str) -> Self {
        Body(FfiBytes::from_static(s.as_bytes()))
    }
}

/// Anything a handler may return.
pub trait IntoResponse {
    fn into_response(self) -> Response;
}

impl IntoResponse for Response {
    #[inline]
    fn into_response(self) -> Response {
        self
    }
}

impl IntoResponse for &'static str {
    fn into_response(self) -> Response {
        Response::text(self)
    }
}

impl IntoResponse for String {
    fn into_response(self) -> Response {
        Response::text(self)
    }
}

impl<R: IntoResponse> IntoResponse for (u16, R) {
    fn into_response(self) -> Response {
        self.1.into_response().with_status(self.0)
    }
}

/// `Err` is never a success: an error whose own response would be a 2xx (`Err("text")`,
/// `Err(String)`, a `Json`) answers 500 with that body instead. Any other status (an
/// [`Error`](crate::Error), `(404, "...")`, a redirect returned early with `?`) is kept.
///
/// ```
/// # use plugin_api::IntoResponse;
/// let failed: Result<String, String> = Err("the store is down".to_owned());
/// assert_eq!(failed.into_response().status(), 500);
/// let missing: Result<String, (u16, &str)> = Err((404, "no such note"));
/// assert_eq!(missing.into_response().status(), 404);
/// ```
impl<T: IntoResponse, E: IntoResponse> IntoResponse for Result<T, E> {
    fn into_response(self) -> Response {
        match self {
            Ok(v) => v.into_response(),
            Err(e) => {
                let response = e.into_response();
                if response.status() < 300 {
                    response.with_status(500)
                } else {
                    response
                }
            }
        }
    }
}

/// A value sent as a JSON body with status 200.
///
/// ```
/// # use plugin_api::{IntoResponse, Json};
/// let r = Json(serde_json::json!({"ok": true})).into_response();
/// assert_eq!(r.body(), br#"{"ok":true}"#);
/// ```
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        Response::json(&self.0)
    }
}
