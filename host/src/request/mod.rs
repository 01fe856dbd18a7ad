//! The request path, below the edge: one HTTP request from its domain to its plugin's
//! answer (`http`), a server's static files when no plugin route answers (`files`), and
//! a WebSocket from its upgrade to its close (`websocket`).

pub mod files;
pub mod http;
pub mod websocket;
