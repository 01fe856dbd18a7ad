//! The plugin boundary, the lowest layer: opening and checking plugin libraries
//! (`loader`), the microserver instances and generations inside them (`plugin`), one
//! request across the boundary (`call`) and its id (`request_id`), the functions the host lends to plugins
//! (`services`), a server's WebSocket connections as plugins reach them
//! (`sockets`), the event bus (`bus`) and its link to other hosts over Redis (`relay`),
//! the limit on how often a plugin's panics are logged (`repeats`), and the bound on
//! how many runtime threads a server's plugin code may hold at once (`bulkhead`), and a
//! server's plugin in a worker process of its own (`worker`).
//! It imports nothing from the layers above it.

pub mod bulkhead;
pub mod bus;
pub mod call;
pub mod loader;
pub mod plugin;
pub mod relay;
pub mod repeats;
pub mod request_id;
pub mod services;
pub mod sockets;
pub mod worker;
