//! Routing, above the plugin boundary: which server a domain belongs to (`domain`) and
//! which of a generation's routes a method and path select (`routes`).

pub mod domain;
pub mod routes;
