//! The plugin host: runs many web microservers, each a `cdylib` plugin, in one process,
//! and routes each request by its domain. `main.rs` is glue; the logic lives here.
//!
//! See ARCHITECTURE.md for the request path and the invariants.

pub mod call;
pub mod config;
pub mod domain;
pub mod http;
pub mod loader;
pub mod plugin;
pub mod reload;
pub mod routes;
pub mod serve;
pub mod servers;
pub mod services;
pub mod watch;
