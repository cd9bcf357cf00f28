//! `wallaroo-connector`: runs any Wallaroo connector described by a `Connector` manifest.
//!
//! - [`protocol`]: the connector protocol v3 without I/O (codec, source and sink sessions).
//! - [`sim`]: the worker's side of both directions, for tests, benchmarks and `sim-worker`.
//! - [`runtime`]: manifest loading, drivers, admin server, metrics, shutdown.
//! - [`sources`] / [`sinks`]: one folder per integration.

pub mod protocol;
pub mod runtime;
pub mod sim;
pub mod sinks;
pub mod sources;

/// The cookie Wallaroo's own tools default to.
pub(crate) fn runtime_default_cookie() -> &'static str {
    wallaroo_crds::DEFAULT_COOKIE
}
