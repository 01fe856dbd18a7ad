//! Benchmark support. The crate's real content is the `baseline` binary (the physical
//! limit the host is compared with: bare hyper, same versions and runtime settings, no
//! routing, no plugin) and the criterion benches in `benches/`.
//!
//! What the two baseline servers share is here: the request id header and a bare status
//! response.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// An empty response with `code`.
pub fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

/// A 16-hex-digit id, as the host sends, made the same cheap way (no formatting
/// machinery: a baseline must not be slower than it needs to be).
pub fn request_id() -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(0x5eed);
    let n = NEXT
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = b"0123456789abcdef"[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&out).expect("hex is a valid header value")
}
