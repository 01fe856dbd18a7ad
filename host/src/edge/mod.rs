//! The edge, the top layer: listening sockets, connections and graceful shutdown
//! (`serve`), and the limits every connection is held to (`limits`).

pub mod limits;
pub mod serve;
