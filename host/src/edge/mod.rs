//! The edge, the top layer: listening sockets, connections and graceful shutdown
//! (`serve`).

pub mod serve;
