//! The error type handlers and init return.

use crate::response::{IntoResponse, Response};

/// An error with the HTTP status it maps to. As a response its body is
/// `{"error": "<message>"}`.
///
/// ```
/// # use plugin_api::{Error, IntoResponse};
/// let r = Error::not_found("no note 7").into_response();
/// assert_eq!(r.status(), 404);
/// assert_eq!(r.body(), br#"{"error":"no note 7"}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: u16,
    message: String,
}

impl Error {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Error::new(400, message)
    }

    /// 404 Not Found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(404, message)
    }

    /// 500 Internal Server Error.
    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(500, message)
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::bad_request(e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        Response::json(&serde_json::json!({ "error": self.message })).with_status(self.status)
    }
}
