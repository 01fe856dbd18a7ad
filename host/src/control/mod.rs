//! Control, beside the request path: the config file (`config`), the set of servers and
//! the generations they run (`servers`), events handed to a server's current generation
//! (`deliver`), the file watcher (`watch`) and the loop that
//! applies changes one at a time (`reload`), and the worker process's side of
//! `isolation: "process"` (`worker`).

pub mod config;
pub mod deliver;
pub mod reload;
pub mod servers;
pub mod watch;
pub mod worker;
