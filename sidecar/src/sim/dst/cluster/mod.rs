//! A sans-IO model of a Wallaroo cluster, from the connectors' point of view, at least as strict as the real
//! worker (spec 2.2-2.9 for sources, 3.2-3.7 for sinks). It owns no sockets: it reads and writes the simulated
//! links it is handed, and records every protocol violation it sees instead of crashing like the worker would.
mod checkpoint;
mod sink;
mod source;

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use crate::protocol::{Frame, FrameCodec};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Worker names; the registry leader is the alphabetically first (spec 2.5).
    pub workers: Vec<String>,
    pub cookie: String,
    pub app: String,
    pub max_credits: u32,
    pub refill_credits: u32,
}

/// The worker's per-stream state on one source connection (SRC-NOTIFY).
#[derive(Debug, Clone)]
struct ConnStream {
    last_seen: u64,
    last_acked: u64,
    /// Last id received on this connection: ids must increase per connection.
    last_id: Option<u64>,
    close_on_or_after: Option<u64>,
    /// Ids processed since the last barrier.
    since_barrier: Vec<u64>,
}

#[derive(Debug)]
struct SrcConn {
    worker: usize,
    streaming: bool,
    /// The worker's own u32 counter (spec 2.4), which wraps on overrun.
    credits: u32,
    /// Frames received after HELLO, and credits that reached the connector (OK + delivered ACKs).
    received: u64,
    delivered: u64,
    streams: BTreeMap<u64, ConnStream>,
    buf: BytesMut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec {
    Disconnected,
    /// Intro sent; waiting for OK, NOTIFY_ACK, ReplyUncommitted in that order.
    Intro {
        ok: bool,
        notify_ack: bool,
    },
    /// The sink listed this transaction; it is resolved once the rollback checkpoint is known.
    WaitingRollback(Bytes),
    Ready,
}

#[derive(Debug, Clone)]
struct Round {
    txn: Bytes,
    end: u64,
    vote: Option<bool>,
}

/// One worker's connector sink (SINK, SINK-EC, SINK-CPRB, SINK-2PC).
#[derive(Debug)]
pub struct WorkerSink {
    pub name: String,
    pub stream_name: String,
    pub link: Option<u64>,
    pub ec: Ec,
    round: Option<Round>,
    pub abort_next: bool,
    rollback_info: Option<u64>,
    /// Output offset (end of everything produced) and end of the last completed round.
    pub current: u64,
    pub last: u64,
    /// The worker's logical output stream and the start offset of each record in it.
    pub out: Vec<u8>,
    starts: Vec<u64>,
    /// Output before this offset was written to a connection (or dropped while disconnected).
    sent: u64,
    /// Fault: the next record is dropped but counted, as when the valve is open with no connection (spec 3.3).
    pub lose_next: bool,
    rtag: u64,
    /// The output of completed checkpoints: exactly what the store must end up committing.
    pub durable_out: Vec<u8>,
    pub last_txn: Option<Bytes>,
    buf: BytesMut,
}

impl WorkerSink {
    pub fn txn_name(&self, checkpoint: u64) -> Bytes {
        Bytes::from(format!("{}:c_id={checkpoint}", self.stream_name))
    }
    pub fn round_open(&self) -> bool {
        self.round.is_some()
    }
    pub fn unsent(&self) -> bool {
        self.sent < self.current
    }
}

#[derive(Debug, Clone, Default)]
struct Snapshot {
    /// Every stream the registry knows, with its checkpointed point of reference.
    streams: BTreeMap<u64, u64>,
    sink_offsets: Vec<u64>,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    snapshot: Snapshot,
    doomed: Option<String>,
}

/// Where each processed record came from, for the exactly-once audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    pub stream: u64,
    pub id: u64,
}

#[derive(Debug)]
pub struct Cluster {
    pub cfg: ClusterConfig,
    /// The registry (spec 2.5): stream -> the link it is active on; stream -> last_acked when inactive.
    active: BTreeMap<u64, u64>,
    inactive: BTreeMap<u64, u64>,
    conns: BTreeMap<u64, SrcConn>,
    pub sinks: Vec<WorkerSink>,
    checkpoint: Option<InFlight>,
    /// The last barrier id taken (completed or not).
    barrier_id: u64,
    completed: (u64, Snapshot),
    pub rolling_back: Option<u64>,
    /// Highest point of reference made durable by a completed checkpoint, per stream.
    pub durable: BTreeMap<u64, u64>,
    /// Records a plain connection drop lets the connector replay (processed after the last barrier on a
    /// connection that was closed without a rollback): at-least-once by design (spec 2.9).
    pub replay_allowance: BTreeMap<Origin, u32>,
    pub violations: Vec<String>,
    pub stats: ClusterStats,
}

#[derive(Debug, Default, Clone)]
pub struct ClusterStats {
    pub completed: u64,
    pub rollbacks: u64,
    pub processed: u64,
    pub duplicates_dropped: u64,
    pub refused: u64,
    pub restarts: u64,
}

fn decode_frames(buf: &mut BytesMut) -> Result<Vec<Frame>, String> {
    let codec = FrameCodec::default();
    let mut v = Vec::new();
    loop {
        match codec.split_frame(buf) {
            Ok(Some(body)) => v.push(Frame::decode(body).map_err(|e| e.to_string())?),
            Ok(None) => return Ok(v),
            Err(e) => return Err(e.to_string()),
        }
    }
}

impl Cluster {
    pub fn new(cfg: ClusterConfig) -> Self {
        let sinks = cfg
            .workers
            .iter()
            .map(|w| WorkerSink {
                name: w.clone(),
                stream_name: format!("{}-w-{w}-id-1", cfg.app),
                link: None,
                ec: Ec::Disconnected,
                round: None,
                abort_next: false,
                rollback_info: None,
                current: 0,
                last: 0,
                out: Vec::new(),
                starts: Vec::new(),
                sent: 0,
                lose_next: false,
                rtag: 77777,
                durable_out: Vec::new(),
                last_txn: None,
                buf: BytesMut::new(),
            })
            .collect();
        let n = cfg.workers.len();
        Self {
            cfg,
            active: BTreeMap::new(),
            inactive: BTreeMap::new(),
            conns: BTreeMap::new(),
            sinks,
            checkpoint: None,
            // Checkpoint 1 completes without 2PC at startup (spec 3.4): rounds start at 2.
            barrier_id: 1,
            completed: (1, Snapshot { streams: BTreeMap::new(), sink_offsets: vec![0; n] }),
            rolling_back: None,
            durable: BTreeMap::new(),
            replay_allowance: BTreeMap::new(),
            violations: Vec::new(),
            stats: ClusterStats::default(),
        }
    }

    pub(super) fn leader(&self) -> usize {
        let mut best = 0;
        for (i, w) in self.cfg.workers.iter().enumerate() {
            if *w < self.cfg.workers[best] {
                best = i;
            }
        }
        best
    }

    pub fn checkpoint_in_flight(&self) -> bool {
        self.checkpoint.is_some()
    }

    pub fn completed_id(&self) -> u64 {
        self.completed.0
    }

    /// Can the in-flight checkpoint be decided (every sink voted, or it is already lost)?
    pub fn decidable(&self) -> bool {
        match &self.checkpoint {
            None => false,
            Some(cp) => {
                cp.doomed.is_some() || self.sinks.iter().all(|s| s.round.as_ref().is_some_and(|r| r.vote == Some(true)))
            }
        }
    }

    pub(super) fn violation(&mut self, what: String) {
        self.violations.push(what);
    }
}
