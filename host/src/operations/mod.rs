//! Operations, beside control: seeing a running host. The admin listener (`admin`), its
//! health endpoints (`health`), Prometheus metrics (`metrics`), the admin API (`api`)
//! and the dashboard (`dashboard`), and the counts the other layers record
//! (`recording`, the only part of this module they import).

pub mod admin;
pub mod api;
pub mod dashboard;
pub mod health;
pub mod metrics;
pub mod recording;
