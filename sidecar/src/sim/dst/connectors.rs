//! The connector processes under test, driven without I/O: the real [`SourceSession`] with the Kafka source's
//! real bookkeeping ([`Book`]) over the partitioned log, and the real [`SinkSession`] with the transactional store
//! behind the real [`SinkIntegration`] contract. The glue mirrors `runtime::source_driver` and
//! `runtime::sink_driver` (batching of staged records, retries, poison on a failed stage).
//!
//! `Book` (`sources/kafka/partitions.rs`) is sans-IO enough to call directly: commands in, controls out. Its only
//! non-deterministic input is the revoke deadline (`Instant`), which it stores and never compares itself; we pass
//! one and never ask for it, so it cannot influence a decision.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;
use wallaroo_crds::StartFrom;

use super::log::PartitionedLog;
use super::store::MemStore;
use crate::protocol::sink::{SinkAction, SinkSession, SinkSessionConfig};
use crate::protocol::source::{SendError, SourceEvent, SourceSession, SourceSessionConfig};
use crate::protocol::{FrameCodec, Inbound, SinkDecoder};
use crate::runtime::sink_api::{SinkError, SinkIntegration, SinkRecord};
use crate::runtime::source_api::{Command, Emit, Record};
use crate::sources::kafka::consumer::{Control, StartAt};
use crate::sources::kafka::partitions::{Book, Out, Tp};

pub const TOPIC: &str = "t";

/// The consumer's position in one partition and the generation (epoch) of the start it serves.
#[derive(Debug)]
struct Reader {
    epoch: u64,
    next: u64,
}

/// A batch handed to the driver, possibly across several credit refills (the driver's `Pending`).
#[derive(Debug)]
struct Batch {
    stream: u64,
    generation: u64,
    records: Vec<Record>,
    next: usize,
}

/// Batches in the emit channel (`source_api::EMIT_CAPACITY`): records read before a rewind may still be queued
/// here when the stream restarts, which is what the generation check exists for.
const CHANNEL: usize = 16;

pub struct SourceConnector {
    cfg: SourceSessionConfig,
    pub session: SourceSession,
    book: Book,
    tps: Vec<Tp>,
    part_of: BTreeMap<u64, usize>,
    readers: BTreeMap<usize, Reader>,
    channel: VecDeque<Batch>,
    pending: Option<Batch>,
    pub link: Option<u64>,
    /// Worker it connects to (changed by RESTART), and the configured one.
    pub target: usize,
    pub configured: usize,
    /// Streams granted on the current connection.
    pub open: BTreeSet<u64>,
    pub revoke_started: bool,
    pub revoked: bool,
    /// The session asked to close the connection (RESTART or a protocol problem).
    pub want_close: bool,
    pub violations: Vec<String>,
    pub sent: u64,
    /// Bytes from the worker not yet forming a whole frame.
    rbuf: BytesMut,
}

impl SourceConnector {
    pub fn new(cfg: SourceSessionConfig, partitions: usize, configured: usize, log: &mut PartitionedLog) -> Self {
        let tps: Vec<Tp> = (0..partitions).map(|p| Tp::new(TOPIC, p as i32)).collect();
        let part_of = tps
            .iter()
            .enumerate()
            .map(|(p, tp)| (crate::protocol::stream_id_for(tp.stream_name().as_bytes()), p))
            .collect();
        let mut c = Self {
            session: SourceSession::new(cfg.clone()),
            cfg,
            book: Book::new(StartFrom::Earliest),
            tps,
            part_of,
            readers: BTreeMap::new(),
            channel: VecDeque::new(),
            pending: None,
            link: None,
            target: configured,
            configured,
            open: BTreeSet::new(),
            revoke_started: false,
            revoked: false,
            want_close: false,
            violations: Vec::new(),
            sent: 0,
            rbuf: BytesMut::new(),
        };
        let outs = c.book.assigned(c.tps.clone());
        c.apply(outs, log);
        c
    }

    pub fn stream_of(&self, p: usize) -> Option<u64> {
        self.part_of.iter().find(|(_, q)| **q == p).map(|(s, _)| *s)
    }

    pub fn partition_of(&self, sid: u64) -> Option<usize> {
        self.part_of.get(&sid).copied()
    }

    /// The sidecar process dies: every in-memory state is gone; the log (and its committed offsets) remains.
    pub fn crash(&mut self, log: &mut PartitionedLog) {
        let configured = self.configured;
        let violations = std::mem::take(&mut self.violations);
        let sent = self.sent;
        *self = Self::new(self.cfg.clone(), self.tps.len(), configured, log);
        self.violations = violations;
        self.sent = sent;
    }

    fn apply(&mut self, outs: Vec<Out>, log: &mut PartitionedLog) {
        for o in outs {
            match o {
                Out::Emit(Emit::Stream { name }) => {
                    self.session.announce(name.as_bytes());
                }
                Out::Emit(Emit::End { stream, generation }) => self.session.end_stream(stream, generation),
                Out::Emit(Emit::Records { .. }) => {}
                Out::Control(Control::Start { tp, at, epoch }) => {
                    let p = tp.partition as usize;
                    let next = match at {
                        StartAt::Offset(o) => u64::try_from(o).unwrap_or(0),
                        StartAt::Committed(_) => log.committed.get(p).copied().flatten().map_or(0, |o| o.max(0) as u64),
                    };
                    self.readers.insert(p, Reader { epoch, next });
                }
                Out::Control(Control::Commit { tp, next_offset }) => log.commit(tp.partition as usize, next_offset),
                Out::Control(Control::RevokeDone) => self.revoked = true,
                Out::Control(Control::PauseAll) => {}
            }
        }
    }

    /// Acts on what the session decided (the driver's event loop).
    pub fn handle_events(&mut self, log: &mut PartitionedLog) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                SourceEvent::Start { stream_id, from, generation } => {
                    self.open.insert(stream_id);
                    let outs = self.book.command(Command::Start { stream: stream_id, from, generation });
                    self.apply(outs, log);
                }
                SourceEvent::Durable { stream_id, through } => {
                    let outs = self.book.command(Command::Durable { stream: stream_id, through });
                    self.apply(outs, log);
                }
                SourceEvent::Finished { stream_id } => {
                    self.open.remove(&stream_id);
                    let outs = self.book.command(Command::Finished { stream: stream_id });
                    self.apply(outs, log);
                }
                SourceEvent::Refused { stream_id } => {
                    self.open.remove(&stream_id);
                }
                SourceEvent::Restart { address } => {
                    self.session.disconnected();
                    self.open.clear();
                    self.want_close = true;
                    // As the driver: a usable address moves us, anything else keeps the configured worker.
                    self.target = address
                        .as_deref()
                        .and_then(|a| a.strip_suffix(":7100"))
                        .and_then(|w| w.strip_prefix('w'))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(self.configured);
                }
                SourceEvent::Close { reason } => {
                    self.violations.push(format!("source session closed: {reason}"));
                    self.session.disconnected();
                    self.open.clear();
                    self.want_close = true;
                }
            }
        }
    }

    pub fn connected(&mut self, link: u64) {
        self.link = Some(link);
        self.want_close = false;
        self.open.clear();
        self.rbuf.clear();
        self.session.connected();
    }

    /// The connection ended (seen from this side).
    pub fn disconnected(&mut self) {
        self.link = None;
        self.want_close = false;
        self.open.clear();
        self.session.disconnected();
    }

    pub fn on_bytes(&mut self, chunk: &[u8], log: &mut PartitionedLog) {
        self.rbuf.extend_from_slice(chunk);
        let mut codec = FrameCodec::default();
        loop {
            match codec.decode(&mut self.rbuf) {
                Ok(Some(f)) => {
                    self.session.on_frame(f);
                    self.handle_events(log);
                }
                Ok(None) => break,
                Err(e) => {
                    self.violations.push(format!("undecodable bytes from the worker: {e}"));
                    self.session.disconnected();
                    self.want_close = true;
                    break;
                }
            }
            if self.want_close {
                break;
            }
        }
    }

    /// Partitions whose reader can read more (and the channel has room).
    pub fn readable(&self, log: &PartitionedLog) -> Vec<usize> {
        if self.channel.len() >= CHANNEL {
            return Vec::new();
        }
        self.readers.iter().filter(|(p, r)| r.next < log.len(**p)).map(|(p, _)| *p).collect()
    }

    /// The integration reads up to `n` records of partition `p` and emits them as one batch, if `Book` lets it.
    pub fn read(&mut self, p: usize, n: u64, log: &PartitionedLog) {
        let Some(tp) = self.tps.get(p).cloned() else { return };
        let Some(r) = self.readers.get_mut(&p) else { return };
        let mut records = Vec::new();
        while (records.len() as u64) < n && r.next < log.len(p) {
            if let Some(payload) = log.get(p, r.next) {
                records.push(Record { por: r.next, key: None, payload });
            }
            r.next += 1;
        }
        let epoch = r.epoch;
        if let Some(Emit::Records { stream, generation, records }) = self.book.records(&tp, epoch, records) {
            self.channel.push_back(Batch { stream, generation, records, next: 0 });
        }
    }

    pub fn has_buffered(&self) -> bool {
        self.pending.is_some() || !self.channel.is_empty()
    }

    /// Feeds batches to the session while credits last: the source driver's `pump`.
    pub fn pump(&mut self) {
        loop {
            let Some(b) = self.pending.as_mut() else {
                if !self.session.can_send() {
                    return;
                }
                match self.channel.pop_front() {
                    Some(b) => {
                        self.pending = Some(b);
                        continue;
                    }
                    None => return,
                }
            };
            if self.session.stream_generation(b.stream) != Some(b.generation) {
                // Read before the latest rewind of this stream: the replay brings these again.
                self.pending = None;
                continue;
            }
            let mut drop_rest = false;
            while b.next < b.records.len() {
                let r = &b.records[b.next];
                match self.session.send_message(b.stream, b.generation, r.por, r.key.as_deref(), &r.payload) {
                    Ok(_) => self.sent += 1,
                    Err(SendError::NotReady) => break,
                    Err(SendError::NotIncreasing { .. }) => {}
                    Err(_) => {
                        drop_rest = true;
                        break;
                    }
                }
                b.next += 1;
            }
            if drop_rest || b.next >= b.records.len() {
                self.pending = None;
            } else {
                return;
            }
        }
    }

    /// Final phase: the group revokes every partition, so each stream ends with EOS (the Kafka source's drain).
    pub fn revoke_all(&mut self, log: &mut PartitionedLog) {
        self.revoke_started = true;
        // The deadline is stored by `Book` and never read by the simulation (see the module comment).
        let outs = self.book.revoking_started(self.tps.clone(), std::time::Instant::now());
        self.apply(outs, log);
    }

    pub fn partitions(&self) -> usize {
        self.tps.len()
    }
}

struct SinkConn {
    session: SinkSession,
    decoder: SinkDecoder,
    buf: BytesMut,
    worker: String,
    batch: Vec<SinkRecord>,
}

/// The sink sidecar: one session per worker connection, over the shared store.
pub struct SinkConnector {
    cfg: SinkSessionConfig,
    pub store: Arc<MemStore>,
    conns: BTreeMap<u64, SinkConn>,
    attempts: u32,
    pub violations: Vec<String>,
}

impl SinkConnector {
    pub fn new(cfg: SinkSessionConfig, store: Arc<MemStore>, attempts: u32) -> Self {
        Self { cfg, store, conns: BTreeMap::new(), attempts, violations: Vec::new() }
    }

    pub fn accept(&mut self, link: u64) {
        self.conns.insert(
            link,
            SinkConn {
                session: SinkSession::new(self.cfg.clone()),
                decoder: SinkDecoder::new(crate::protocol::DEFAULT_MAX_FRAME),
                buf: BytesMut::new(),
                worker: String::new(),
                batch: Vec::new(),
            },
        );
    }

    pub fn drop_conn(&mut self, link: u64) {
        self.conns.remove(&link);
    }

    /// The process dies: sessions and staged batches are gone; the store keeps what it made durable.
    pub fn crash(&mut self) -> Vec<u64> {
        let links = self.conns.keys().copied().collect();
        self.conns.clear();
        links
    }

    /// Bytes from a worker; returns the reply bytes and, if the connection must close, why.
    pub fn on_bytes(&mut self, link: u64, chunk: &[u8]) -> (Bytes, Option<String>) {
        let attempts = self.attempts;
        let store = self.store.clone();
        let Some(c) = self.conns.get_mut(&link) else { return (Bytes::new(), None) };
        c.buf.extend_from_slice(chunk);
        let mut close = None;
        loop {
            match c.decoder.decode(&mut c.buf) {
                Ok(Some(Inbound::Frame(f))) => c.session.on_frame(f),
                Ok(Some(Inbound::Oversize { stream_id, message_id, frame_len, limit })) => {
                    c.session.oversize(stream_id, message_id, frame_len, limit)
                }
                Ok(None) => break,
                Err(e) => {
                    self.violations.push(format!("sink: bad frame from the worker: {e}"));
                    close = Some(format!("bad frame: {e}"));
                    break;
                }
            }
            if !c.session.worker().is_empty() {
                c.decoder.authenticated();
            }
            if let Some(reason) = run_actions(c, &store, attempts, &mut self.violations) {
                close = Some(reason);
                break;
            }
        }
        if close.is_none() {
            flush(c, &store);
        }
        (c.session.take_output(), close)
    }
}

fn retry<T>(attempts: u32, mut op: impl FnMut() -> Result<T, SinkError>) -> Result<T, SinkError> {
    let mut attempt = 1;
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e @ SinkError::Permanent(_)) => return Err(e),
            Err(e) if attempt >= attempts => return Err(e),
            Err(_) => attempt += 1,
        }
    }
}

fn flush(c: &mut SinkConn, store: &MemStore) {
    if c.batch.is_empty() {
        return;
    }
    let records = std::mem::take(&mut c.batch);
    if let Err(e) = futures::executor::block_on(store.stage(&c.worker, records)) {
        c.session.poison(format!("staging failed: {e}"));
    }
}

/// The sink driver's `run_actions`, synchronously.
fn run_actions(c: &mut SinkConn, store: &MemStore, attempts: u32, violations: &mut Vec<String>) -> Option<String> {
    use futures::executor::block_on;
    while let Some(action) = c.session.poll_action() {
        if let SinkAction::Stage { offset, payload } = action {
            c.batch.push(SinkRecord { offset, payload });
            continue;
        }
        flush(c, store);
        match action {
            SinkAction::Stage { .. } => {}
            SinkAction::Recover { worker } => {
                c.worker = String::from_utf8_lossy(&worker).into_owned();
                match retry(attempts, || block_on(store.recover(&c.worker))) {
                    Ok(r) => c.session.recovered(r),
                    Err(e) => return Some(format!("cannot recover: {e}")),
                }
            }
            SinkAction::Prepare { txn } => match retry(attempts, || block_on(store.prepare(&c.worker, &txn))) {
                Ok(()) => c.session.prepared(Ok(())),
                Err(e) => c.session.prepared(Err(e.to_string())),
            },
            SinkAction::Commit { txn } => {
                if let Err(e) = retry(attempts, || block_on(store.commit(&c.worker, &txn))) {
                    return Some(format!("commit of {} failed: {e}", txn.id_str()));
                }
            }
            SinkAction::Abort { txn, .. } => {
                if let Err(e) = retry(attempts, || block_on(store.abort(&c.worker, &txn))) {
                    return Some(format!("abort of {} failed: {e}", txn.id_str()));
                }
            }
            SinkAction::Forget { .. } => {}
            SinkAction::Close { reason } => {
                violations.push(format!("sink session closed: {reason}"));
                return Some(reason);
            }
        }
    }
    None
}
