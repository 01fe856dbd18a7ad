//! Control, beside the request path: the config file (`config`), the set of servers and
//! the generations they run (`servers`), the file watcher (`watch`) and the loop that
//! applies changes one at a time (`reload`).

pub mod config;
pub mod reload;
pub mod servers;
pub mod watch;
