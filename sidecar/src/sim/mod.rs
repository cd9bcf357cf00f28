//! The worker's side of both protocol directions, for tests, benchmarks and `wallaroo-connector sim-worker`.
pub mod cli;
