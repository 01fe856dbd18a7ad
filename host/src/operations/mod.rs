//! Operations, beside control: seeing a running host. The admin listener (`admin`), its
//! health endpoints (`health`) and Prometheus metrics (`metrics`), and the counts the
//! other layers record (`recording`, the only part of this module they import).

pub mod admin;
pub mod health;
pub mod metrics;
pub mod recording;
