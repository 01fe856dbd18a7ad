//! Benchmark support. The crate's real content is the `baseline` binary (the physical
//! limit the host is compared with: bare hyper, same versions and runtime settings, no
//! routing, no plugin) and the criterion benches in `benches/`.
