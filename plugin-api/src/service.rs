//! Service calls: a request to another server of the host, by its name, with no socket.
//!
//! ```
//! # use std::sync::Arc;
//! # use plugin_api::{service, Error, Request, Response};
//! # struct Shop;
//! # impl Shop {
//! async fn checkout(self: Arc<Self>, req: Request) -> Result<Response, Error> {
//!     let token = req.header("authorization").unwrap_or_default();
//!     let who = service::call("auth", service::ServiceRequest::get("/whoami").header("authorization", token)).await;
//!     if who.status() != 200 {
//!         return Err(Error::new(401, "not signed in"));
//!     }
//!     Ok(Response::text("checked out"))
//! }
//! # }
//! ```

use abi_stable::std_types::RStr;
use serde::Serialize;

use crate::ffi::{FfiBytes, FfiHeaders, FfiServiceRequest};
use crate::{Error, Response};

/// A request to another server.
#[derive(Debug)]
pub struct ServiceRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Option<std::time::Duration>,
}

impl ServiceRequest {
    /// A request with `method` (such as `GET`) for `path` (with a query if wanted).
    pub fn new(method: &str, path: &str) -> Self {
        ServiceRequest {
            method: method.to_ascii_uppercase(),
            path: path.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// A `GET` for `path`.
    pub fn get(path: &str) -> Self {
        ServiceRequest::new("GET", path)
    }

    /// A `POST` for `path` with `body`.
    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> Self {
        ServiceRequest::new("POST", path).body(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Waits at most `timeout` for the answer (default: the host's request timeout,
    /// which also bounds this); past it the call answers 504.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets a JSON body (and its `content-type`).
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self, Error> {
        let json = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("cannot serialize a request: {e}")))?;
        Ok(self.header("content-type", "application/json").body(json))
    }

    fn into_ffi(self) -> FfiServiceRequest {
        let mut headers = FfiHeaders::default();
        for (name, value) in &self.headers {
            headers.push(name.as_bytes(), value.as_bytes());
        }
        FfiServiceRequest {
            method: self.method.into(),
            path: self.path.into(),
            headers,
            body: FfiBytes::from_vec(self.body),
            timeout_ms: self.timeout.map_or(0, |t| {
                u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
            }),
        }
    }
}

/// Sends `request` to the server named `server` (its `name` in `servers.config.json`)
/// and returns its response, whatever it is: the call goes to the server's current
/// generation, in process, under the host's limits. A server that does not exist or is
/// not serving answers 503, one whose handler panics 500, one slower than the request
/// timeout 504 (each with a JSON `error`), exactly as to a client; this never panics.
/// Outside a host (a unit test without one), it answers 503.
pub async fn call(server: &str, request: ServiceRequest) -> Response {
    let Some(call) = crate::host::fns().and_then(|fns| fns.call()) else {
        return Response::json(&serde_json::json!({
            "error": "service calls need the host (this code runs outside one)"
        }))
        .with_status(503);
    };
    let future = call(RStr::from_str(server), request.into_ffi());
    Response::from_ffi(crate::host::HostFuture::new(future).await)
}
