//! The request path, below the edge: one HTTP request from its domain to its plugin's
//! answer (`http`).

pub mod http;
