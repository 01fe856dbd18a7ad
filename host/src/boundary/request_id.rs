//! Request ids: the one a client (or the proxy in front) sent in `X-Request-Id`, when it
//! is well-formed, else one the host makes. A request's id is lent to its plugin
//! (`Request::request_id`), sent back in `X-Request-Id`, written in the access log and
//! in JSON error bodies.
//!
//! Well-formed: 1 to [`MAX_LEN`] bytes, each a letter, a digit or one of `-_.:+/=`.
//! That covers UUIDs, nginx's `$request_id` (32 hex digits), the host's own ids, and
//! base64 or base64url ids; it leaves out spaces, quotes and control bytes, so an id
//! can go into a log line, a header or JSON as it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyper::header::{HeaderName, HeaderValue};
use hyper::HeaderMap;

/// The header a request id comes in and goes out in.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest incoming id kept.
pub const MAX_LEN: usize = 64;

/// A request's id (see the module's doc). Cloning a kept id costs a reference count.
#[derive(Clone)]
pub struct RequestId(Id);

#[derive(Clone)]
enum Id {
    /// 16 hex digits, unique within the process and unlikely to repeat across restarts.
    Made([u8; 16]),
    /// Sent by the client, well-formed.
    Kept(Arc<str>),
}

impl RequestId {
    /// The request's id: its well-formed `X-Request-Id`, else a new one. One header
    /// lookup for a request without one.
    #[inline]
    pub fn of(headers: &HeaderMap) -> Self {
        match headers.get(&X_REQUEST_ID) {
            None => RequestId::next(),
            Some(sent) => RequestId::kept(sent.as_bytes()),
        }
    }

    #[cold]
    #[inline(never)]
    fn kept(sent: &[u8]) -> Self {
        match std::str::from_utf8(sent) {
            Ok(text) if well_formed(text) => RequestId(Id::Kept(Arc::from(text))),
            _ => RequestId::next(),
        }
    }

    /// A new id.
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let seed = *SEED.get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos.rotate_left(32) ^ u64::from(std::process::id())
        });
        // A multiplicative step spreads consecutive ids apart; the counter keeps them unique.
        let n = seed.wrapping_add(
            NEXT.fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        RequestId(Id::Made(hex(n)))
    }

    /// The id's text as bytes (ASCII either way), with no UTF-8 check: what is lent to
    /// the plugin on every request.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Id::Made(bytes) => bytes,
            Id::Kept(text) => text.as_bytes(),
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Id::Made(bytes) => std::str::from_utf8(bytes).unwrap_or_default(),
            Id::Kept(text) => text,
        }
    }

    /// The id as a header value (both kinds are valid ones).
    pub fn header_value(&self) -> Option<HeaderValue> {
        match &self.0 {
            Id::Made(bytes) => HeaderValue::from_bytes(bytes).ok(),
            Id::Kept(text) => HeaderValue::from_str(text).ok(),
        }
    }
}

/// `n` in 16 lowercase hex digits, most significant first: every nibble moved into a
/// byte of its own, then all sixteen turned into digits at once (a few dozen
/// instructions where a digit at a time took over a hundred, on every request).
fn hex(n: u64) -> [u8; 16] {
    const fn bytes(b: u8) -> u128 {
        u128::from_ne_bytes([b; 16])
    }
    let mut x = u128::from(n);
    x = (x & 0xFFFF_FFFF) | ((x & 0xFFFF_FFFF_0000_0000) << 32);
    x = (x & 0x0000_0000_0000_FFFF_0000_0000_0000_FFFF)
        | ((x & 0x0000_0000_FFFF_0000_0000_0000_FFFF_0000) << 16);
    x = (x & 0x0000_00FF_0000_00FF_0000_00FF_0000_00FF)
        | ((x & 0x0000_FF00_0000_FF00_0000_FF00_0000_FF00) << 8);
    x = (x & 0x000F_000F_000F_000F_000F_000F_000F_000F)
        | ((x & 0x00F0_00F0_00F0_00F0_00F0_00F0_00F0_00F0) << 4);
    // Byte k now holds nibble k. A nibble of 10 or more gains the gap between '9' and
    // 'a' (39) besides '0'.
    let letters = ((x + bytes(6)) >> 4) & bytes(1);
    (x + bytes(b'0') + letters * 39).to_be_bytes()
}

/// Whether an incoming id is kept (see the module's doc).
pub fn well_formed(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_incoming_ids_are_kept() {
        for kept in [
            "f47ac10b-58cc-4372-a567-0e02b2c3d479",
            "0123456789abcdef0123456789abcdef",
            "req_01HZX3:edge.1",
            "dGVzdA==",
            &"a".repeat(64),
        ] {
            assert!(well_formed(kept), "{kept:?}");
            let mut headers = HeaderMap::new();
            headers.insert(&X_REQUEST_ID, HeaderValue::from_str(kept).unwrap());
            assert_eq!(RequestId::of(&headers).as_str(), kept);
        }
        for replaced in ["", "a b", "\"quoted\"", "id;x=1", "é", &"a".repeat(65)] {
            assert!(!well_formed(replaced), "{replaced:?}");
        }
        for n in [
            0,
            1,
            9,
            10,
            15,
            0xabcdef,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            0x9E37_79B9_7F4A_7C15,
        ] {
            assert_eq!(hex(n), *format!("{n:016x}").as_bytes(), "{n:#x}");
        }
        let made = RequestId::of(&HeaderMap::new());
        assert_eq!(made.as_str().len(), 16);
        assert!(well_formed(made.as_str()));
    }
}
