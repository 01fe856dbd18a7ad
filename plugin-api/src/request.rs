//! The request a handler receives.
#![allow(unsafe_code)] // FfiStr views of the host's request record (see ffi.rs)

use std::borrow::Cow;

use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;

use crate::ffi::{FfiRequest, FfiStr};
use crate::Error;

/// An HTTP request routed to this microserver.
///
/// ```
/// # use plugin_api::{Request, Response};
/// async fn greet(req: Request) -> Response {
///     let name = req.param("name").unwrap_or_default();
///     Response::text(format!("hello {name} from {}", req.domain()))
/// }
/// ```
pub struct Request {
    raw: FfiRequest,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("path", &self.path())
            .field("query", &self.query())
            .field("domain", &self.domain())
            .field("request_id", &self.request_id())
            .finish_non_exhaustive()
    }
}

impl Request {
    #[doc(hidden)]
    #[inline]
    pub fn from_ffi(raw: FfiRequest) -> Self {
        Request { raw }
    }

    /// The connection of a WebSocket route's upgrade request (taken once).
    pub(crate) fn take_socket(&mut self) -> Option<crate::socket::Socket> {
        crate::socket::Socket::from_ffi(self.raw.take_socket())
    }

    #[inline]
    fn bytes(&self, s: FfiStr) -> &[u8] {
        // SAFETY: every `FfiStr` the host puts in a request (its fields, its parameters,
        // the headers it hands out) lives as long as the request, which `self` owns.
        unsafe { s.get() }
    }

    #[inline]
    fn text(&self, s: FfiStr) -> &str {
        std::str::from_utf8(self.bytes(s)).unwrap_or_default()
    }

    /// The method in upper case, such as `GET`.
    #[inline]
    pub fn method(&self) -> &str {
        self.text(self.raw.head().method)
    }

    /// The path, still percent-encoded, such as `/users/42`.
    #[inline]
    pub fn path(&self) -> &str {
        self.text(self.raw.head().path)
    }

    /// The query string without the `?`, still percent-encoded; empty if there is none.
    #[inline]
    pub fn query(&self) -> &str {
        self.text(self.raw.head().query)
    }

    /// The first value of a query parameter, percent-decoded (`+` counts as a space).
    pub fn query_param(&self, name: &str) -> Option<Cow<'_, str>> {
        self.query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value)
    }

    /// Every query parameter in order, percent-decoded.
    pub fn query_pairs(&self) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
        self.query()
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode_form(key), decode_form(value))
            })
    }

    /// A path parameter from the route pattern (`{id}` in `/users/{id}`), percent-decoded.
    pub fn param(&self, name: &str) -> Option<Cow<'_, str>> {
        self.raw
            .head()
            .params()
            .iter()
            .find(|p| self.bytes(p.name) == name.as_bytes())
            .map(|p| percent_decode_str(self.text(p.value)).decode_utf8_lossy())
    }

    /// The domain this request was routed by: lower case, without port or trailing dot.
    #[inline]
    pub fn domain(&self) -> &str {
        self.text(self.raw.head().domain)
    }

    /// The client's socket address, such as `127.0.0.1:50412`.
    pub fn client_addr(&self) -> &str {
        self.text(self.raw.head().client_addr)
    }

    /// The request's id: the `X-Request-Id` the client (or the proxy in front) sent, if
    /// it is 1 to 64 letters, digits or `-_.:+/=`, else one the host made. It is also
    /// sent back as `x-request-id` and written in the host's access log.
    #[inline]
    pub fn request_id(&self) -> &str {
        self.text(self.raw.head().request_id)
    }

    /// The first value of a header (names compare case-insensitively), if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.raw.header(name.as_bytes())?).ok()
    }

    /// Every header as `(lower-case name, raw value)`: names in the order the client first
    /// sent them, and the values of a repeated name together, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let mut list: Vec<(&str, &[u8])> = Vec::new();
        self.raw.each_header(|name, value| {
            list.push((std::str::from_utf8(name).unwrap_or_default(), value));
        });
        list.into_iter()
    }

    /// The whole request body.
    #[inline]
    pub fn body(&self) -> &[u8] {
        self.raw.head().body.as_slice()
    }

    /// Takes the body out of the request (leaving it empty), for example to send it back
    /// without copying it.
    ///
    /// ```
    /// # use plugin_api::{Request, Response};
    /// async fn echo(mut req: Request) -> Response {
    ///     Response::new(200).with_body(req.take_body())
    /// }
    /// ```
    pub fn take_body(&mut self) -> crate::Body {
        crate::Body(self.raw.take_body())
    }

    /// Takes the body as a stream, chunk by chunk, on a route declared with
    /// [`Routes::streaming`](crate::Routes::streaming) (`None` on other routes, whose
    /// body is read whole first: see [`body`](Self::body), and after the first call).
    /// The host reads from the client only as the handler asks for chunks, and ends the
    /// stream with [`BodyError::TooLarge`](crate::stream::BodyError) past the route's
    /// limit.
    pub fn body_stream(&mut self) -> Option<crate::stream::BodyStream> {
        self.raw
            .take_body_stream()
            .map(crate::stream::BodyStream::new)
    }

    /// The body parsed as JSON. A parse error becomes a 400 response if returned.
    ///
    /// ```
    /// # use plugin_api::{Error, Json, Request};
    /// #[derive(serde::Deserialize, serde::Serialize)]
    /// struct Note { text: String }
    /// async fn create(req: Request) -> Result<Json<Note>, Error> {
    ///     let note: Note = req.json()?;
    ///     Ok(Json(note))
    /// }
    /// ```
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(self.body())
            .map_err(|e| Error::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn decode_form(s: &str) -> Cow<'_, str> {
    if s.contains('+') {
        let spaced = s.replace('+', " ");
        Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
    } else {
        percent_decode_str(s).decode_utf8_lossy()
    }
}
