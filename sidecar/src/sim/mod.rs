//! The worker's side of both protocol directions (spec 2.2-2.9 and 3.2-3.7), for tests, benchmarks and
//! `wallaroo-connector sim-worker`. Built on the same codec as the connector side.
//!
//! - [`SourceSim`]: listens like a worker's source connector listener; credits and refills, the stream registry,
//!   de-duplication by message id, acks only at checkpoints, EOS, RESTART and rollback.
//! - [`SinkSim`]: connects like a worker's sink; the intro, byte-offset data, 2PC rounds per checkpoint and
//!   resolution of a pending transaction through ListUncommitted after a reconnect.
pub mod apps;
pub mod cli;
pub mod dst;
mod sink_sim;
mod source_sim;

pub use sink_sim::{RoundOutcome, SinkSim, SinkSimConfig, SinkSimError};
pub use source_sim::{Leader, Processed, SimStats, SourceSim, SourceSimConfig, SourceSimState};
