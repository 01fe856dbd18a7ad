//! The request path, below the edge: one HTTP request from its domain to its plugin's
//! answer (`http`), and a WebSocket from its upgrade to its close (`websocket`).

pub mod http;
pub mod websocket;
