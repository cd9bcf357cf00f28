//! The Wallaroo Connector operator: injects connector sidecars into worker pods (admission webhook and offline),
//! keeps Connector status, rolls workloads when a Connector changes, and manages its own webhook certificate.
pub mod admin;
pub mod connector_cache;
pub mod controller;
pub mod inject;
pub mod metrics;
pub mod watch_merge;
pub mod webhook;
