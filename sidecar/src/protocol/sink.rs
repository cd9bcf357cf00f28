//! The connector's side of a sink session (spec 3, checklist 3.12), as a state machine without I/O.
//!
//! One session per worker connection. The driver feeds frames to [`SinkSession::on_frame`] and performs the
//! returned [`SinkAction`]s in order against the integration. Two actions need an answer before the next frame
//! is fed: `Recover` (answer with [`SinkSession::recovered`]) and `Prepare` (answer with
//! [`SinkSession::prepared`]). Replies to the worker accumulate in the output buffer.
use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::codec::{Frame, Message};
use super::twopc::{TwoPc, WhereRange};

/// Byte range `[start, end)` of one worker's output that a checkpoint covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Txn {
    pub id: Bytes,
    pub start: u64,
    pub end: u64,
}

impl Txn {
    pub fn id_str(&self) -> String {
        String::from_utf8_lossy(&self.id).into_owned()
    }
}

/// What the integration knows about a worker after a (re)connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// End of the last committed transaction; `None` for sinks that keep no state (they adopt the worker's offset).
    pub committed: Option<u64>,
    /// A transaction that voted commit in Phase 1 and has not seen Phase 2.
    pub pending: Option<Txn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkAction {
    /// HELLO accepted: load this worker's durable state and answer with `recovered`.
    Recover { worker: Bytes },
    /// Append `payload` at byte `offset` of the worker's output (offsets are contiguous).
    Stage { offset: u64, payload: Bytes },
    /// Make `txn` durable but unpublished, then answer with `prepared`.
    Prepare { txn: Txn },
    /// Publish `txn` (Phase 2 commit). Must eventually succeed; on failure drop the connection so the worker
    /// resolves it again through ListUncommitted.
    Commit { txn: Txn },
    /// Discard everything staged from `txn.start` on.
    Abort { txn: Txn, reason: String },
    /// These workers left the cluster: archive or forget their state.
    Forget { workers: Vec<Bytes> },
    /// Close the connection (after writing any pending output).
    Close { reason: String },
}

#[derive(Debug, Clone)]
pub struct SinkSessionConfig {
    pub version: String,
    pub cookie: String,
    /// Credits granted in OK (the worker requires at least 2 and otherwise relies on TCP backpressure).
    pub credits: u32,
}

impl Default for SinkSessionConfig {
    fn default() -> Self {
        Self { version: super::SINK_VERSION.to_string(), cookie: String::new(), credits: 500 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Recovering,
    Ready,
    Preparing,
    Closed,
}

pub struct SinkSession {
    cfg: SinkSessionConfig,
    phase: Phase,
    worker: Bytes,
    /// Next byte offset expected on stream 1.
    expected: u64,
    last_committed: u64,
    /// Adopt the worker's NOTIFY offset (stateless sinks).
    adopt_offset: bool,
    pending: Option<Txn>,
    preparing: Option<Txn>,
    /// Set when data went missing in the open round: its Phase 1 must vote abort.
    force_abort: Option<String>,
    out: BytesMut,
    actions: VecDeque<SinkAction>,
}

impl SinkSession {
    pub fn new(cfg: SinkSessionConfig) -> Self {
        Self {
            cfg,
            phase: Phase::AwaitHello,
            worker: Bytes::new(),
            expected: 0,
            last_committed: 0,
            adopt_offset: false,
            pending: None,
            preparing: None,
            force_abort: None,
            out: BytesMut::with_capacity(1024),
            actions: VecDeque::new(),
        }
    }

    pub fn worker(&self) -> &Bytes {
        &self.worker
    }

    pub fn expected_offset(&self) -> u64 {
        self.expected
    }

    pub fn last_committed(&self) -> u64 {
        self.last_committed
    }

    pub fn pending(&self) -> Option<&Txn> {
        self.pending.as_ref()
    }

    /// Is a Phase 1 vote given and Phase 2 not yet received (shutdown waits for this)?
    pub fn round_open(&self) -> bool {
        self.pending.is_some() || self.preparing.is_some()
    }

    pub fn take_output(&mut self) -> Bytes {
        self.out.split().freeze()
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn poll_action(&mut self) -> Option<SinkAction> {
        self.actions.pop_front()
    }

    fn send(&mut self, frame: Frame) {
        if let Err(e) = frame.encode(&mut self.out) {
            // Only txn ids / names we echo could be too long, and those came off the wire within limits.
            tracing::error!(error = %e, "cannot encode reply");
        }
    }

    fn send_2pc(&mut self, msg: TwoPc) {
        match msg.to_frame() {
            Ok(f) => self.send(f),
            Err(e) => tracing::error!(error = %e, "cannot encode 2PC reply"),
        }
    }

    fn fail(&mut self, reason: String, tell_worker: bool) {
        if tell_worker {
            self.send(Frame::Error { message: Bytes::from(reason.clone()) });
        }
        self.phase = Phase::Closed;
        self.actions.push_back(SinkAction::Close { reason });
    }

    pub fn on_frame(&mut self, frame: Frame) {
        match (self.phase, frame) {
            (Phase::Closed, _) => {}
            (Phase::Recovering | Phase::Preparing, f) => {
                self.fail(format!("driver fed {} before answering the previous action", f.name()), false)
            }
            (Phase::AwaitHello, Frame::Hello(h)) => {
                if h.version.as_ref() != self.cfg.version.as_bytes() {
                    let v = String::from_utf8_lossy(&h.version).into_owned();
                    self.fail(format!("Unknown protocol version: {v} (expected {})", self.cfg.version), true);
                } else if h.cookie.as_ref() != self.cfg.cookie.as_bytes() {
                    // Unlike the worker we do not echo the expected cookie back.
                    self.fail("Bad cookie".to_string(), true);
                } else if std::str::from_utf8(&h.instance_name).is_err() || h.instance_name.is_empty() {
                    // State is keyed by the worker name as text; two names that differ only in invalid bytes would
                    // otherwise share one worker's transactions.
                    self.fail("worker name (HELLO instance_name) must be non-empty UTF-8".to_string(), true);
                } else {
                    self.worker = h.instance_name.clone();
                    self.send(Frame::Ok { initial_credits: self.cfg.credits });
                    self.phase = Phase::Recovering;
                    self.actions.push_back(SinkAction::Recover { worker: h.instance_name });
                }
            }
            (Phase::AwaitHello, f) => self.fail(format!("expected HELLO, got {}", f.name()), true),
            (Phase::Ready, Frame::Notify { stream_id, point_of_ref, .. }) => {
                if stream_id != 1 {
                    self.fail(format!("Unsupported stream id {stream_id}"), true);
                    return;
                }
                if self.adopt_offset {
                    self.expected = point_of_ref;
                    self.last_committed = point_of_ref;
                }
                self.send(Frame::NotifyAck { success: true, stream_id: 1, point_of_ref: self.expected });
            }
            (Phase::Ready, Frame::Message(m)) => self.on_message(m),
            (Phase::Ready, f) => self.fail(format!("Protocol error: sink got {}", f.name()), true),
        }
    }

    /// Staging failed at the target: the open round must not commit.
    pub fn poison(&mut self, reason: String) {
        if self.force_abort.is_none() {
            self.force_abort = Some(reason);
        }
    }

    /// The integration's answer to `Recover`.
    pub fn recovered(&mut self, r: Recovery) {
        if self.phase != Phase::Recovering {
            return;
        }
        match r.committed {
            Some(c) => {
                self.adopt_offset = false;
                self.last_committed = c;
                self.expected = r.pending.as_ref().map_or(c, |t| t.end.max(c));
            }
            None => self.adopt_offset = true,
        }
        self.pending = r.pending;
        self.phase = Phase::Ready;
    }

    /// The integration's answer to `Prepare`: `Ok` votes commit, `Err(reason)` votes abort.
    pub fn prepared(&mut self, vote: Result<(), String>) {
        if self.phase != Phase::Preparing {
            return;
        }
        self.phase = Phase::Ready;
        let Some(txn) = self.preparing.take() else { return };
        // Staging of the round's last batch can fail after the Phase-1 checks ran (the driver flushes it just
        // before `prepare`); such a round is missing records and must not commit, whatever `prepare` said.
        let vote = match (vote, self.force_abort.clone()) {
            (Ok(()), Some(reason)) => Err(reason),
            (vote, _) => vote,
        };
        match vote {
            Ok(()) => {
                self.send_2pc(TwoPc::Reply { txn_id: txn.id.clone(), commit: true });
                self.pending = Some(txn);
            }
            Err(reason) => self.vote_abort(txn, reason),
        }
    }

    fn vote_abort(&mut self, txn: Txn, reason: String) {
        tracing::warn!(worker = %String::from_utf8_lossy(&self.worker), txn = %txn.id_str(), %reason, "voting abort");
        self.send_2pc(TwoPc::Reply { txn_id: txn.id.clone(), commit: false });
        if self.pending.is_some() {
            // Never discard a prepared transaction's data because of a confused newer round.
            return;
        }
        // The worker will roll back to its last checkpoint, whose offset is our last commit.
        self.expected = self.last_committed;
        self.force_abort = None;
        let start = self.last_committed;
        self.actions.push_back(SinkAction::Abort { txn: Txn { start, ..txn }, reason });
    }

    fn on_message(&mut self, m: Message) {
        match m.stream_id {
            1 => self.on_data(m.message_id, m.payload),
            0 => match TwoPc::decode(m.payload) {
                Ok(msg) => self.on_2pc(msg),
                Err(e) => self.fail(format!("bad 2PC message: {e}"), true),
            },
            other => self.fail(format!("data on unsupported stream {other}"), true),
        }
    }

    fn on_data(&mut self, offset: u64, payload: Bytes) {
        let len = payload.len() as u64;
        let Some(end) = offset.checked_add(len) else {
            self.fail(format!("Protocol error: message at offset {offset} of {len} bytes overflows u64"), true);
            return;
        };
        if offset == self.expected {
            self.expected = end;
            self.actions.push_back(SinkAction::Stage { offset, payload });
        } else if offset > self.expected {
            // Bytes went missing (e.g. dropped by the worker while disconnected): this round cannot commit.
            if self.force_abort.is_none() {
                tracing::warn!(offset, expected = self.expected, "gap in worker output; next Phase 1 votes abort");
                self.force_abort = Some(format!("gap: got offset {offset}, expected {}", self.expected));
            }
        } else if end > self.expected {
            // The worker sends whole encoder outputs at exact offsets; a message straddling what we hold is not a
            // replay of it. Staging its tail would commit a truncated record nobody sent, so the round aborts.
            self.poison(format!(
                "message [{offset}, {end}) overlaps the received output, which ends at {}",
                self.expected
            ));
        } else {
            tracing::debug!(offset, len, expected = self.expected, "duplicate data skipped");
        }
    }

    /// A record larger than the frame limit arrived (its bytes were discarded unread). Nothing after it can be
    /// staged contiguously, so the open round votes abort with a reason naming the record and the limit.
    pub fn oversize(&mut self, stream_id: u64, message_id: u64, frame_len: usize, limit: usize) {
        self.poison(format!(
            "record at offset {message_id} (stream {stream_id}) is a {frame_len}-byte frame, over the limit of {limit} \
             bytes (raise worker.maxFrameBytes or drop the record upstream)"
        ));
    }

    fn on_2pc(&mut self, msg: TwoPc) {
        match msg {
            TwoPc::ListUncommitted { rtag } => {
                let txn_ids = self.pending.iter().map(|t| t.id.clone()).collect();
                self.send_2pc(TwoPc::ReplyUncommitted { rtag, txn_ids });
            }
            TwoPc::Phase1 { txn_id, where_list } => self.on_phase1(txn_id, &where_list),
            TwoPc::Phase2 { txn_id, commit } => {
                let Some(txn) = self.pending.take_if(|t| t.id == txn_id) else {
                    tracing::warn!(txn = %String::from_utf8_lossy(&txn_id), "Phase 2 for an unknown transaction ignored");
                    return;
                };
                if commit {
                    self.last_committed = txn.end;
                    self.actions.push_back(SinkAction::Commit { txn });
                } else {
                    self.expected = txn.start;
                    self.actions.push_back(SinkAction::Abort { txn, reason: "worker decided abort".into() });
                }
            }
            TwoPc::WorkersLeft { workers, .. } => {
                let others: Vec<Bytes> = workers.into_iter().filter(|w| *w != self.worker).collect();
                if !others.is_empty() {
                    self.actions.push_back(SinkAction::Forget { workers: others });
                }
            }
            other => self.fail(format!("Protocol error: sink got {}", other.name()), true),
        }
    }

    fn on_phase1(&mut self, txn_id: Bytes, where_list: &[WhereRange]) {
        let mut range = None;
        let mut problem = None;
        for w in where_list {
            if w.stream_id == 1 {
                range = Some((w.start, w.end));
            } else if w.start != w.end {
                problem = Some(format!("where list names stream {} that this sink never received", w.stream_id));
            }
        }
        let (start, end) = range.unwrap_or((self.last_committed, self.last_committed));
        let txn = Txn { id: txn_id, start, end };
        if let Some(p) = &self.pending {
            problem = Some(format!("transaction {} is still pending", p.id_str()));
        } else if let Some(reason) = self.force_abort.clone() {
            problem = Some(reason);
        } else if start != self.last_committed {
            problem = Some(format!("range starts at {start}, last commit ended at {}", self.last_committed));
        } else if start > end {
            problem = Some(format!("range start {start} is after its end {end}"));
        } else if end != self.expected {
            problem = Some(format!("range ends at {end}, received through {}", self.expected));
        }
        match problem {
            Some(reason) => self.vote_abort(txn, reason),
            None => {
                self.phase = Phase::Preparing;
                self.preparing = Some(txn.clone());
                self.actions.push_back(SinkAction::Prepare { txn });
            }
        }
    }
}
