//! Everything between a manifest and the protocol core: contracts for integrations, the tokio drivers,
//! the admin server, metrics, health and shutdown.

pub mod admin;
pub mod health;
pub mod metrics;
pub mod run;
pub mod sink_api;
pub mod sink_driver;
pub mod source_api;
pub mod source_driver;

pub use health::Health;
pub use metrics::Metrics;
