//! The contract between the runtime and a sink integration.
//!
//! The runtime owns the 2PC conversation, offsets, gaps and duplicates; the integration only sees a small
//! transactional interface, called per worker (identified by HELLO.instance_name). Calls for one worker are
//! never concurrent; calls for different workers may be.
//!
//! Semantics:
//! - `recover(worker)`: what is durable for this worker: the end offset of its last commit and at most one
//!   transaction that voted commit without a Phase 2. Sinks that keep no state return `committed: None`.
//! - `stage(worker, records)`: bytes of the open round at contiguous offsets. May buffer.
//! - `prepare(worker, txn)`: make `[txn.start, txn.end)` durable but unpublished; `Ok` votes commit. Must be
//!   durable before returning, including the knowledge that `txn` is pending.
//! - `commit(worker, txn)`: publish atomically. Idempotent: it may be called again after a crash.
//! - `abort(worker, txn)`: discard everything staged from `txn.start` on (prepared or not). Idempotent.
//! - `forget(worker)`: the worker left the cluster; archive or drop its state.
use bytes::Bytes;

pub use crate::protocol::sink::{Recovery, Txn};

/// One contiguous piece of a worker's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkRecord {
    pub offset: u64,
    pub payload: Bytes,
}

/// What a sink can promise end to end; stated in the README per sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    ExactlyOnce,
    AtLeastOnce,
    BestEffort,
}

impl Guarantee {
    pub fn as_str(&self) -> &'static str {
        match self {
            Guarantee::ExactlyOnce => "exactly-once",
            Guarantee::AtLeastOnce => "at-least-once",
            Guarantee::BestEffort => "best-effort",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying (connection lost, throttled); the runtime retries with backoff, then votes abort.
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying cannot help (bad payload, missing table, permission denied): vote abort now.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl SinkError {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Transient(_) => "transient",
            SinkError::Permanent(_) => "permanent",
        }
    }
}

#[async_trait::async_trait]
pub trait SinkIntegration: Send + Sync + 'static {
    fn guarantee(&self) -> Guarantee;
    async fn recover(&self, worker: &str) -> Result<Recovery, SinkError>;
    async fn stage(&self, worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError>;
    async fn prepare(&self, worker: &str, txn: &Txn) -> Result<(), SinkError>;
    async fn commit(&self, worker: &str, txn: &Txn) -> Result<(), SinkError>;
    async fn abort(&self, worker: &str, txn: &Txn) -> Result<(), SinkError>;
    async fn forget(&self, worker: &str) -> Result<(), SinkError>;
}
