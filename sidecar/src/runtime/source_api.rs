//! The contract between the runtime and a source integration.
//!
//! An integration runs as its own task and talks to the runtime over two bounded channels:
//! it sends [`Emit`]s (streams it wants to run, batches of records, ends of streams) and receives
//! [`Command`]s (start a stream at a position, durable-through acknowledgements, stream finished).
//! The runtime owns credits, framing, stream ids and reconnects.
//!
//! Rules an integration must follow:
//! - Announce a stream with [`Emit::Stream`] and send nothing for it until [`Command::Start`] arrives.
//! - Tag every batch with the generation of the latest `Start` of that stream. After a reconnect the runtime
//!   starts the stream again with a new generation and drops batches of older ones, so records read before the
//!   rewind can never overtake the replay.
//! - Points of reference strictly increase within a generation. `Position::After(p)` means resume with the
//!   first record whose point of reference is greater than `p`.
//! - Commit upstream only on [`Command::Durable`]: the worker has durably processed everything through it.
//! - Keep receiving commands while blocked on sending (use `tokio::select!`), and stop taking new input from
//!   upstream when `shutdown` fires, then return.
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::protocol::source::Position;
pub use crate::protocol::stream_id_for;

use super::{Health, Metrics};

/// One record of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Point of reference of this record within its stream; becomes the MESSAGE id.
    pub por: u64,
    pub key: Option<Bytes>,
    pub payload: Bytes,
}

/// From the integration to the runtime.
#[derive(Debug)]
pub enum Emit {
    /// Run this stream (the runtime derives its id with [`stream_id_for`]).
    Stream { name: String },
    /// Records of one stream, in order.
    Records { stream: u64, generation: u64, records: Vec<Record> },
    /// No more records for this stream at this generation: the runtime sends EOS after what it sent.
    End { stream: u64, generation: u64 },
}

/// From the runtime to the integration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// (Re)start the stream at `from`, tagging records with `generation`.
    Start { stream: u64, from: Position, generation: u64 },
    /// Everything through `through` (inclusive) is durable in Wallaroo.
    Durable { stream: u64, through: u64 },
    /// The EOS of this stream was confirmed by the worker.
    Finished { stream: u64 },
}

/// Everything an integration gets at start.
pub struct SourceContext {
    pub emit: mpsc::Sender<Emit>,
    pub commands: mpsc::Receiver<Command>,
    /// Set `external` when the upstream system is reachable (drives `/readyz`).
    pub health: Health,
    pub metrics: Metrics,
    /// Fires on SIGTERM: stop taking input, hand over what was read, return.
    pub shutdown: CancellationToken,
    /// This pod's name (or host name): a default consumer identity.
    pub instance: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{system}: {message}")]
    External { system: &'static str, message: String },
    #[error("the runtime went away")]
    RuntimeGone,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[async_trait::async_trait]
pub trait SourceIntegration: Send {
    /// Runs until every stream ended or shutdown fired. An error is logged and the sidecar exits non-zero.
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError>;
}

/// Capacity of the emit channel in batches: bounds memory while letting the reader stay ahead of the socket.
/// Integrations keep their batches to a few thousand records or a few hundred KiB, so this is at most a few MiB.
pub const EMIT_CAPACITY: usize = 16;
/// Capacity of the command channel.
pub const COMMAND_CAPACITY: usize = 1024;
