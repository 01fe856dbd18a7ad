//! What a server adds to its responses (`servers[].headers`, `cors`, `compression`):
//! security headers, CORS (preflights answered here, before the plugin) and compression
//! by `Accept-Encoding`.
//!
//! Control builds a [`ServerHeaders`] from the server's config entry whenever it changes
//! and swaps it into the server. The request path takes a [`Finishing`] for each request
//! it routes to a server ([`Finishing::of`], while it still has the request's head), and
//! applies it to the response once the response is ready ([`Finishing::apply`]).
//!
//! Cost: with the defaults, a request pays one `ArcSwap` load and three header inserts of
//! values made once, from static text (no allocation, no parsing, no reference count);
//! CORS and compression cost nothing unless the server has them.
//!
//! CORS is written here rather than taken from tower-http's `CorsLayer`: that is a tower
//! `Service` around the whole inner service, and the request path is not one (the
//! request is boxed and lent to the plugin, and the server, whose rules apply, is only
//! known once the request is routed). Its rules are short; they follow the Fetch
//! standard. Compression is tower-http's: its `Compression` service is called once per
//! response, with the response already made (see [`Compress::compress`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, ORIGIN, REFERRER_POLICY,
    STRICT_TRANSPORT_SECURITY, VARY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use hyper::http::request::Parts;
use hyper::http::Extensions;
use hyper::{Method, Request, Response, StatusCode, Version};
use tower_http::compression::{Compression, CompressionLevel};
use tower_service::Service;

use super::http::Body;
use crate::control::config::{
    joined, CompressionRules, CorsRules, Hsts, Listed, Origins, ResponseRules, SecurityHeaders,
};

/// A server's rules for its responses, made from its config entry: every header value
/// is made here, once.
#[derive(Debug)]
pub struct ServerHeaders {
    /// What it was made from (a config change that leaves these alone keeps it).
    pub rules: ResponseRules,
    /// Added to every response that does not have them.
    security: Vec<(HeaderName, HeaderValue)>,
    /// Added to every response on a TLS connection, but for names under `localhost`.
    hsts: Option<HeaderValue>,
    cors: Option<Box<Cors>>,
    compression: Option<Box<Compress>>,
}

impl ServerHeaders {
    pub fn new(rules: &ResponseRules) -> ServerHeaders {
        let SecurityHeaders {
            content_type_options,
            referrer_policy,
            frame_options,
            hsts,
            content_security_policy,
        } = &rules.security;
        let mut security = Vec::new();
        if *content_type_options {
            security.push((X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")));
        }
        let optional = [
            (REFERRER_POLICY, referrer_policy),
            (X_FRAME_OPTIONS, frame_options),
            (CONTENT_SECURITY_POLICY, content_security_policy),
        ];
        for (name, value) in optional {
            if let Some(value) = value.as_deref().and_then(made_once) {
                security.push((name, value));
            }
        }
        ServerHeaders {
            rules: rules.clone(),
            security,
            hsts: hsts
                .as_ref()
                .map(Hsts::value)
                .as_deref()
                .and_then(made_once),
            cors: rules.cors.as_ref().map(|c| Box::new(Cors::new(c))),
            compression: rules
                .compression
                .as_ref()
                .map(|c| Box::new(Compress::new(c))),
        }
    }
}

/// A header value made once: from static text when it is one of the usual values (so
/// that each response's copy costs nothing, not even a reference count), else copied.
/// `None` if it cannot be a header value (the config checked it can).
fn made_once(value: &str) -> Option<HeaderValue> {
    const USUAL: &[&str] = &[
        "nosniff",
        "strict-origin-when-cross-origin",
        "no-referrer",
        "same-origin",
        "strict-origin",
        "SAMEORIGIN",
        "DENY",
        "max-age=31536000",
        "max-age=31536000; includeSubDomains",
        "max-age=63072000; includeSubDomains; preload",
        "default-src 'self'",
        "frame-ancestors 'self'",
        "frame-ancestors 'none'",
    ];
    match USUAL.iter().find(|usual| **usual == value) {
        Some(usual) => Some(HeaderValue::from_static(usual)),
        None => HeaderValue::from_str(value).ok(),
    }
}

/// What one request's response gets from its server's rules.
pub struct Finishing {
    /// The server's rules when the request came.
    headers: arc_swap::Guard<Arc<ServerHeaders>>,
    /// HSTS applies: a TLS connection, and a name not under `localhost`.
    hsts: bool,
    /// The request's `Origin`, when the server has CORS rules (`None` after the host
    /// answered the request as a preflight).
    origin: Option<HeaderValue>,
    /// The server compresses and the request is not a HEAD.
    compress: bool,
    /// The request's `Accept-Encoding`, when `compress`.
    accept_encoding: Option<HeaderValue>,
}

impl Finishing {
    /// What `parts`' response gets from `headers` (the server's rules), for `domain`
    /// (as routed) on a TLS connection or not.
    #[inline]
    pub fn of(
        headers: arc_swap::Guard<Arc<ServerHeaders>>,
        parts: &Parts,
        domain: &[u8],
        tls: bool,
    ) -> Finishing {
        // Browsers would pin every port of a development name to HTTPS, the plain
        // listener's too (RFC 6797 ignores ports).
        let hsts = tls
            && headers.hsts.is_some()
            && domain != b"localhost"
            && !domain.ends_with(b".localhost");
        let origin = match headers.cors {
            Some(_) => parts.headers.get(ORIGIN).cloned(),
            None => None,
        };
        let compress = headers.compression.is_some() && parts.method != Method::HEAD;
        let accept_encoding = if compress {
            accept_encoding(&parts.headers)
        } else {
            None
        };
        Finishing {
            headers,
            hsts,
            origin,
            compress,
            accept_encoding,
        }
    }

    /// The same, for a response that is awaited: the rules are held by a reference
    /// count of their own rather than by a slot of the thread's (which a guard held
    /// long would keep from others).
    pub fn owned(self) -> Finishing {
        let headers = arc_swap::Guard::into_inner(self.headers);
        Finishing {
            headers: arc_swap::Guard::from_inner(headers),
            ..self
        }
    }

    /// The host's answer to a CORS preflight (OPTIONS with `Origin` and
    /// `Access-Control-Request-Method`), for a server with CORS rules: 204, with the
    /// CORS headers when the origin is allowed and none when it is not (the browser
    /// then refuses the request it wanted to make). `None`: not a preflight, or no CORS
    /// rules; the request goes on to the plugin.
    #[inline]
    pub fn preflight(&mut self, parts: &Parts) -> Option<Response<Body>> {
        if parts.method != Method::OPTIONS || self.origin.is_none() {
            return None;
        }
        self.answer_preflight(parts)
    }

    #[cold]
    #[inline(never)]
    fn answer_preflight(&mut self, parts: &Parts) -> Option<Response<Body>> {
        let cors = self.headers.cors.as_deref()?;
        let origin = self.origin.as_ref()?;
        let method = parts.headers.get(ACCESS_CONTROL_REQUEST_METHOD)?;
        let response = cors.preflight(origin, method, &parts.headers);
        // Its CORS headers are made: `apply` adds the rest.
        self.origin = None;
        Some(response)
    }

    /// Adds what the server's rules call for to `response`. A header the response
    /// already has (the plugin's own) is kept.
    pub fn apply(&self, response: &mut Response<Body>) {
        let rules = &*self.headers;
        let headers = response.headers_mut();
        // Room for them at once: a plugin's response comes with room for the few
        // headers it set, and growing the map for each insert costs more than the inserts.
        headers.reserve(rules.security.len() + 2);
        for (name, value) in &rules.security {
            headers.entry(name).or_insert_with(|| value.clone());
        }
        if self.hsts {
            if let Some(hsts) = &rules.hsts {
                headers
                    .entry(STRICT_TRANSPORT_SECURITY)
                    .or_insert_with(|| hsts.clone());
            }
        }
        if let Some(cors) = &rules.cors {
            cors.actual(self.origin.as_ref(), headers);
        }
        if self.compress {
            if let Some(compression) = &rules.compression {
                compression.compress(response, self.accept_encoding.as_ref());
            }
        }
    }
}

/// The request's `Accept-Encoding`: one field as it came (most requests), or several
/// joined into one.
fn accept_encoding(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut all = headers.get_all(ACCEPT_ENCODING).iter();
    let first = all.next()?;
    let Some(second) = all.next() else {
        return Some(first.clone());
    };
    let mut joined = first.as_bytes().to_vec();
    for more in std::iter::once(second).chain(all) {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(more.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// Appends `token` to `Vary` unless a `Vary` field names it (or `*`) already.
fn vary(headers: &mut HeaderMap, token: &'static str) {
    let named = headers.get_all(VARY).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .map(|t| t.trim_ascii())
            .any(|t| t == b"*" || t.eq_ignore_ascii_case(token.as_bytes()))
    });
    if !named {
        headers.append(VARY, HeaderValue::from_static(token));
    }
}

/// A server's CORS rules, with their header values made.
#[derive(Debug)]
struct Cors {
    origins: Origins,
    credentials: bool,
    /// `None`: the method a preflight asks for is sent back.
    methods: Option<HeaderValue>,
    /// The headers a preflight may send: `Mirror` sends back what it asks for.
    allow_headers: Allow,
    max_age: Option<HeaderValue>,
    expose: Option<HeaderValue>,
}

#[derive(Debug)]
enum Allow {
    Mirror,
    These(Option<HeaderValue>),
}

impl Cors {
    fn new(rules: &CorsRules) -> Cors {
        Cors {
            origins: rules.origins.clone(),
            credentials: rules.credentials,
            methods: match &rules.methods {
                Listed::Any => None,
                // An empty list allows no method: nothing is sent.
                Listed::List(list) => Some(joined(list).unwrap_or(HeaderValue::from_static(""))),
            },
            allow_headers: match &rules.headers {
                Listed::Any => Allow::Mirror,
                Listed::List(list) => Allow::These(joined(list)),
            },
            max_age: rules.max_age_s.map(HeaderValue::from),
            expose: match &rules.expose_headers {
                Listed::Any => Some(HeaderValue::from_static("*")),
                Listed::List(list) => joined(list),
            },
        }
    }

    /// The value of `Access-Control-Allow-Origin` for `origin`, if it is allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        match &self.origins {
            Origins::Any => Some(HeaderValue::from_static("*")),
            Origins::List(list) => list
                .iter()
                .any(|pattern| pattern.matches(origin.as_bytes()))
                .then(|| origin.clone()),
        }
    }

    fn preflight(
        &self,
        origin: &HeaderValue,
        method: &HeaderValue,
        request: &HeaderMap,
    ) -> Response<Body> {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.insert(
            VARY,
            HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
        );
        let Some(allow) = self.allow_origin(origin) else {
            return response;
        };
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        if self.credentials {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        let methods = self.methods.as_ref().unwrap_or(method);
        if !methods.is_empty() {
            headers.insert(ACCESS_CONTROL_ALLOW_METHODS, methods.clone());
        }
        let asked = request.get(ACCESS_CONTROL_REQUEST_HEADERS);
        let allowed = match &self.allow_headers {
            Allow::Mirror => asked,
            Allow::These(these) => these.as_ref(),
        };
        if let Some(allowed) = allowed {
            headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, allowed.clone());
        }
        if let Some(max_age) = &self.max_age {
            headers.insert(ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        response
    }

    /// The CORS headers of an actual request's response (not a preflight's).
    fn actual(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        // The answer depends on the request's origin: caches must know.
        if matches!(self.origins, Origins::List(_)) {
            vary(headers, "origin");
        }
        let Some(origin) = origin else {
            return;
        };
        // The plugin answered CORS itself.
        if headers.contains_key(ACCESS_CONTROL_ALLOW_ORIGIN) {
            return;
        }
        let Some(allow) = self.allow_origin(origin) else {
            return;
        };
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        if self.credentials {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

/// A server's compression rules.
#[derive(Debug)]
struct Compress {
    gzip: bool,
    br: bool,
    zstd: bool,
    min_bytes: u64,
    /// Lower case; `type/*` for a whole type.
    types: Vec<String>,
}

impl Compress {
    fn new(rules: &CompressionRules) -> Compress {
        Compress {
            gzip: rules.gzip,
            br: rules.br,
            zstd: rules.zstd,
            min_bytes: rules.min_bytes,
            types: rules.types.clone(),
        }
    }

    /// Whether `response` may be compressed at all (what the client accepts aside):
    /// a body of a listed type, not encoded already, not a range, not below
    /// `min_bytes` (a stream's length is not known: it may be), and no
    /// `Cache-Control: no-transform`.
    fn wants(&self, response: &Response<Body>) -> bool {
        let status = response.status();
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::PARTIAL_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return false;
        }
        let headers = response.headers();
        if headers.contains_key(CONTENT_ENCODING) || headers.contains_key(CONTENT_RANGE) {
            return false;
        }
        let Some(content_type) = headers.get(CONTENT_TYPE) else {
            return false;
        };
        if !self.compresses(content_type.as_bytes()) {
            return false;
        }
        let size = hyper::body::Body::size_hint(response.body())
            .exact()
            .or_else(|| {
                headers
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
            });
        if size.is_some_and(|size| size < self.min_bytes) {
            return false;
        }
        !headers.get_all(CACHE_CONTROL).iter().any(|value| {
            value
                .as_bytes()
                .split(|b| *b == b',')
                .any(|d| d.trim_ascii().eq_ignore_ascii_case(b"no-transform"))
        })
    }

    /// Whether the rules list `content_type` (parameters aside). `text/*` does not
    /// cover `text/event-stream`: server-sent events only when listed by name.
    fn compresses(&self, content_type: &[u8]) -> bool {
        let essence = content_type
            .split(|b| *b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        self.types.iter().any(|listed| {
            let listed = listed.as_bytes();
            match listed.strip_suffix(b"*") {
                Some(whole) => {
                    essence.len() > whole.len()
                        && essence[..whole.len()].eq_ignore_ascii_case(whole)
                        && !essence.eq_ignore_ascii_case(b"text/event-stream")
                }
                None => essence.eq_ignore_ascii_case(listed),
            }
        })
    }

    /// Compresses `response` with the encoding the client prefers, if it may be. The
    /// negotiation (quality values, `*`, `identity;q=0`, ties going to zstd, then br,
    /// then gzip), `Vary: Accept-Encoding`, `Content-Encoding`, the dropped
    /// `Content-Length` and `Accept-Ranges`, and the body itself are tower-http's
    /// `Compression` service, which is called here with the response already made. Its
    /// body flushes the encoder whenever the response's own body has nothing more for
    /// the moment, so a stream stays a stream.
    #[inline(never)]
    fn compress(&self, response: &mut Response<Body>, accept_encoding: Option<&HeaderValue>) {
        if !self.wants(response) {
            return;
        }
        let made = std::mem::replace(response, Response::new(Body::empty()));
        let mut request = Request::new(());
        if let Some(accept) = accept_encoding {
            request
                .headers_mut()
                .insert(ACCEPT_ENCODING, accept.clone());
        }
        let mut service = Compression::new(Made(Some(made)))
            .quality(CompressionLevel::Default)
            .no_deflate();
        if !self.gzip {
            service = service.no_gzip();
        }
        if !self.br {
            service = service.no_br();
        }
        if !self.zstd {
            service = service.no_zstd();
        }
        // `wants` has decided.
        let mut service = service
            .compress_when(chosen as fn(StatusCode, Version, &HeaderMap, &Extensions) -> bool);
        let future = std::pin::pin!(service.call(request));
        let Poll::Ready(Ok(compressed)) = future.poll(&mut Context::from_waker(Waker::noop()))
        else {
            unreachable!("the response is made before the call");
        };
        let (mut parts, body) = compressed.into_parts();
        let body = if parts.headers.contains_key(CONTENT_ENCODING) {
            // Another representation, so not the same strong validator (RFC 9110,
            // 8.8.1): a range or If-Range with the plain file's ETag must not mix the
            // two. Weak comparison (If-None-Match) still matches it.
            if let Some(etag) = parts.headers.get(ETAG) {
                if !etag.as_bytes().starts_with(b"W/") {
                    let weak = [b"W/", etag.as_bytes()].concat();
                    if let Ok(weak) = HeaderValue::from_bytes(&weak) {
                        parts.headers.insert(ETAG, weak);
                    }
                }
            }
            Body::Compressed(Box::pin(body))
        } else {
            // Not compressed (the client takes none of the encodings): the body as it
            // was. (A client that refuses even `identity` got 406, as tower-http
            // answers.)
            body.into_inner()
        };
        *response = Response::from_parts(parts, body);
    }
}

fn chosen(_: StatusCode, _: Version, _: &HeaderMap, _: &Extensions) -> bool {
    true
}

/// The inner service of a `Compression` called for one response: it answers with the
/// response made already.
struct Made(Option<Response<Body>>);

impl Service<Request<()>> for Made {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        std::future::ready(Ok(self.0.take().expect("called once")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config::OriginPattern;

    fn compress(types: &[&str]) -> Compress {
        Compress::new(&CompressionRules {
            types: types.iter().map(|t| (*t).to_owned()).collect(),
            ..CompressionRules::default()
        })
    }

    #[test]
    fn content_types_match_by_essence_and_whole_type() {
        let c = compress(&["text/*", "application/json"]);
        for yes in [
            &b"text/html; charset=utf-8"[..],
            b"TEXT/CSS",
            b"application/json",
            b" application/json ; charset=utf-8",
        ] {
            assert!(c.compresses(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"text/event-stream"[..],
            b"text",
            b"text/",
            b"application/jsonx",
            b"image/png",
            b"",
        ] {
            assert!(!c.compresses(no), "{}", String::from_utf8_lossy(no));
        }
        assert!(compress(&["text/event-stream"]).compresses(b"text/event-stream"));
    }

    #[test]
    fn origins_match_exactly_or_below_a_name() {
        let exact = OriginPattern::Exact("https://app.example".into());
        assert!(exact.matches(b"https://app.example"));
        assert!(exact.matches(b"HTTPS://App.Example"));
        assert!(!exact.matches(b"https://app.example:8443"));
        assert!(!exact.matches(b"http://app.example"));
        let below = OriginPattern::Subdomains {
            prefix: "https://".into(),
            suffix: ".example.com".into(),
        };
        assert!(below.matches(b"https://a.example.com"));
        assert!(below.matches(b"https://a.b.example.com"));
        for no in [
            &b"https://example.com"[..],
            b"https://.example.com",
            b"https://a..example.com",
            b"https://evil.com/.example.com",
            b"https://a.example.com:1",
            b"http://a.example.com",
            b"https://aexample.com",
        ] {
            assert!(!below.matches(no), "{}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn vary_is_appended_once() {
        let mut headers = HeaderMap::new();
        vary(&mut headers, "origin");
        vary(&mut headers, "origin");
        headers.append(VARY, HeaderValue::from_static("Accept-Encoding, Origin"));
        vary(&mut headers, "accept-encoding");
        assert_eq!(headers.get_all(VARY).iter().count(), 2);
    }
}
