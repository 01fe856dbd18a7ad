//! The edge, the top layer: listening sockets, connections and graceful shutdown
//! (`serve`), the limits every connection is held to (`limits`), and TLS with its
//! certificates (`tls`).

pub mod limits;
pub mod serve;
pub mod tls;
