//! The request path, below the edge: one HTTP request from its domain to its plugin's
//! answer (`http`), its tenant and rate limits (`rate_limits`), the tokens some paths need (`jwt`), a server's static files
//! when no plugin route answers (`files`), what a server adds to its responses: security
//! headers, CORS, compression (`headers`), a WebSocket from its upgrade to its close
//! (`websocket`), the line each request leaves in the access log (`access_log`), and
//! a request forwarded to a server's worker process (`proxy`).

pub mod access_log;
pub mod files;
pub mod headers;
pub mod http;
pub mod jwt;
pub mod proxy;
pub mod rate_limits;
pub mod websocket;
