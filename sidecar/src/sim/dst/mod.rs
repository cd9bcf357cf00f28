//! Deterministic simulation testing (DST) of the whole protocol path, without sockets, threads or clocks:
//!
//! partitioned log -> [`SourceSession`](crate::protocol::source::SourceSession) (with the Kafka source's `Book`)
//! -> a model of a Wallaroo cluster (identity application) -> [`SinkSession`](crate::protocol::sink::SinkSession)
//! -> a transactional store.
//!
//! One seed fixes everything: the shape of the run (workers, partitions, records, credits, which faults may
//! happen) and every scheduling decision. [`run`] returns a [`Report`]; a failing seed is replayed exactly with
//! `run(seed)`. See `docs/testing.md`.
//!
//! - [`rng`]: the PRNG and the trace hash.
//! - [`pipe`]: simulated TCP connections.
//! - [`log`]: the partitioned log (source upstream).
//! - [`store`]: the transactional store (sink downstream), behind the real `SinkIntegration` contract.
//! - [`cluster`]: the worker model: `source.rs` (connections, credits, registry, de-duplication), `sink.rs` (intro,
//!   data behind the valve, 2PC replies), `checkpoint.rs` (barrier, completion, rollback window, RESTART).
//! - [`connectors`]: the production sessions and the glue that drives them like the runtime's drivers.
//! - [`world`]: the scheduler and the faults; `config.rs` (what a seed draws, the report), `checks.rs` (the
//!   invariants).
pub mod cluster;
pub mod connectors;
pub mod log;
pub mod pipe;
pub mod rng;
pub mod store;
pub mod world;

pub use world::{Config, Faults, Report, Violation, run, run_config};
