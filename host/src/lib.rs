//! The plugin host: runs many web microservers, each a `cdylib` plugin, in one process,
//! and routes each request by its domain. `main.rs` is glue; the logic lives here.
//!
//! The modules are the layers a request crosses, top to bottom; a layer imports only
//! from the layers below it:
//!
//! - `edge`: listening sockets, connections, graceful shutdown, signals;
//! - `request`: the request path (domain, server, generation, route, call, response);
//! - `routing`: domains and routes;
//! - `boundary`: the plugin boundary (libraries, generations, calls, host services).
//!
//! `control` (config, servers, watching and reloading) sits beside them, and so does
//! `operations` (the admin listener: health, metrics, the admin API), which reads
//! control, the boundary and the counts. The other layers reach `operations` only
//! through its leaf module `operations::recording`, where they count what the metrics
//! show. `logging` (the JSON log format) is above them all.
//!
//! See ARCHITECTURE.md for the request path and the invariants.

pub mod boundary;
pub mod control;
pub mod edge;
pub mod logging;
pub mod operations;
pub mod request;
pub mod routing;
