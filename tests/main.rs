//! Integration tests: real host processes, real plugin libraries, real sockets.
//!
//! The harness in `support` builds the plugin and fixture libraries on first use, so
//! `cargo test --workspace` is all it takes.

mod support;

mod admin_api;
mod boundary;
mod bulkheads;
mod bus;
mod chat;
mod config;
mod database;
mod edge;
mod gateway;
mod headers;
mod isolation;
mod jwt;
mod loading;
mod logs_and_signals;
mod operations;
mod rate_limits;
mod redis;
mod reload;
mod robustness;
mod routing;
mod runtime;
mod static_files;
mod streaming;
mod tls;
mod websocket;
