//! Routing, above the plugin boundary: which server a domain belongs to (`domain`),
//! which of a generation's routes a method and path select (`routes`), and which tenant
//! a request is for (`tenants`).

pub mod domain;
pub mod routes;
pub mod tenants;
