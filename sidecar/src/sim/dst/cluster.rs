//! A sans-IO model of a Wallaroo cluster, from the connectors' point of view, at least as strict as the real
//! worker (spec 2.2-2.9 for sources, 3.2-3.7 for sinks). It owns no sockets: it reads and writes the simulated
//! links it is handed, and records every protocol violation it sees instead of crashing like the worker would.
use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use super::pipe::{SinkLink, SrcLink};
use crate::protocol::{Frame, FrameCodec, Hello, Message, SINK_VERSION, SOURCE_VERSION, TwoPc, U64_MAX, WhereRange};

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

    fn leader(&self) -> usize {
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

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    // ----- source side -----

    pub fn src_accept(&mut self, link: u64, worker: usize) {
        self.conns.insert(
            link,
            SrcConn {
                worker,
                streaming: false,
                credits: self.cfg.max_credits,
                received: 0,
                delivered: 0,
                streams: BTreeMap::new(),
                buf: BytesMut::new(),
            },
        );
    }

    pub fn src_has_conn(&self, link: u64) -> bool {
        self.conns.contains_key(&link)
    }

    /// Credits that reached the connector on `link`.
    pub fn src_credits_delivered(&mut self, link: u64, credits: u64) {
        if let Some(c) = self.conns.get_mut(&link) {
            c.delivered += credits;
        }
    }

    fn send_src(l: &mut SrcLink, frame: &Frame, credits: u32) -> Result<(), String> {
        l.to_conn.push_frame(frame, credits)
    }

    /// The worker closes a source connection (spec 2.2 ERROR path, rollback, RESTART): streams go back to the
    /// registry at their last checkpointed point.
    pub fn src_close(&mut self, link: u64, l: &mut SrcLink, plain: bool) {
        l.closed_by_worker = true;
        l.worker_alive = false;
        l.to_worker.clear();
        self.src_forget(link, plain);
    }

    /// The worker noticed the connector closed the connection.
    pub fn src_closed_by_peer(&mut self, link: u64, l: &mut SrcLink) {
        l.worker_alive = false;
        self.src_forget(link, true);
    }

    fn src_forget(&mut self, link: u64, plain: bool) {
        let Some(c) = self.conns.remove(&link) else { return };
        for (sid, cs) in c.streams {
            if plain {
                // Processed after the last barrier: the connector resends these from last_acked and, with no
                // rollback, their first processing stays in the output (at-least-once by design, spec 2.9).
                for id in cs.since_barrier {
                    *self.replay_allowance.entry(Origin { stream: sid, id }).or_insert(0) += 1;
                }
            }
            if self.active.get(&sid) == Some(&link) {
                self.active.remove(&sid);
                self.inactive.insert(sid, cs.last_acked);
            }
        }
    }

    /// Bytes from the connector reached the worker.
    pub fn src_receive(&mut self, link: u64, l: &mut SrcLink, chunk: &[u8]) {
        let frames = {
            let Some(c) = self.conns.get_mut(&link) else { return };
            c.buf.extend_from_slice(chunk);
            decode_frames(&mut c.buf)
        };
        let frames = match frames {
            Ok(f) => f,
            Err(e) => {
                self.violation(format!("source link {link}: undecodable frame: {e}"));
                return self.src_error(link, l, "Unable to decode message");
            }
        };
        for f in frames {
            if !self.conns.contains_key(&link) {
                break;
            }
            self.src_frame(link, l, f);
        }
    }

    fn src_error(&mut self, link: u64, l: &mut SrcLink, msg: &str) {
        let _ = Self::send_src(l, &Frame::Error { message: Bytes::from(msg.to_string()) }, 0);
        self.src_close(link, l, true);
    }

    /// Spec 2.2, one frame.
    fn src_frame(&mut self, link: u64, l: &mut SrcLink, frame: Frame) {
        let max = self.cfg.max_credits;
        let refill = self.cfg.refill_credits;
        let rolling_back = self.rolling_back.is_some();
        let Some(c) = self.conns.get_mut(&link) else { return };
        if c.streaming {
            c.received += 1;
            if c.received > c.delivered {
                let (r, d) = (c.received, c.delivered);
                self.violation(format!(
                    "credit overrun on source link {link}: frame {r} after HELLO, only {d} credits reached the connector"
                ));
                return self.src_error(link, l, "credit overrun");
            }
        }
        c.credits = c.credits.wrapping_sub(1);
        if c.streaming && c.credits <= refill {
            let add = max.wrapping_sub(c.credits);
            c.credits = max;
            if let Err(e) = Self::send_src(l, &Frame::Ack { credits: add, acks: vec![] }, add) {
                self.violation(e);
            }
        }
        let Some(c) = self.conns.get_mut(&link) else { return };
        let streaming = c.streaming;
        let worker = c.worker;
        match frame {
            Frame::Hello(h) => {
                if streaming {
                    self.violation(format!("second HELLO on source link {link} (the worker would Fail())"));
                    self.src_close(link, l, true);
                } else if h.version.as_ref() != SOURCE_VERSION.as_bytes()
                    || h.cookie.as_ref() != self.cfg.cookie.as_bytes()
                {
                    self.violation(format!("bad HELLO on source link {link}: {h:?}"));
                    self.src_error(link, l, "bad HELLO");
                } else {
                    c.credits = max;
                    c.streaming = true;
                    c.received = 0;
                    c.delivered = 0;
                    if let Err(e) = Self::send_src(l, &Frame::Ok { initial_credits: max }, max) {
                        self.violation(e);
                    }
                }
            }
            Frame::Notify { stream_id, point_of_ref, .. } => {
                if !streaming {
                    self.violation(format!("NOTIFY before HELLO on source link {link}"));
                    return self.src_error(link, l, "Bad protocol FSM state");
                }
                let here = c.streams.contains_key(&stream_id);
                let refuse = rolling_back || here || self.active.contains_key(&stream_id);
                if refuse {
                    self.stats.refused += 1;
                    let f = Frame::NotifyAck { success: false, stream_id, point_of_ref };
                    if let Err(e) = Self::send_src(l, &f, 0) {
                        self.violation(e);
                    }
                    return;
                }
                // Registry (spec 2.5): inactive -> its stored last_acked; new -> U64_MAX from a local leader, the
                // NOTIFY's own value from a remote one.
                let por = match self.inactive.remove(&stream_id) {
                    Some(p) => p,
                    None if worker == self.leader() => U64_MAX,
                    None => point_of_ref,
                };
                self.active.insert(stream_id, link);
                if let Some(c) = self.conns.get_mut(&link) {
                    c.streams.insert(
                        stream_id,
                        ConnStream {
                            last_seen: por,
                            last_acked: por,
                            last_id: None,
                            close_on_or_after: None,
                            since_barrier: Vec::new(),
                        },
                    );
                }
                let f = Frame::NotifyAck { success: true, stream_id, point_of_ref: por };
                if let Err(e) = Self::send_src(l, &f, 0) {
                    self.violation(e);
                }
            }
            Frame::Message(m) => {
                if !streaming {
                    self.violation(format!("MESSAGE before HELLO on source link {link}"));
                    return self.src_error(link, l, "Bad protocol FSM state");
                }
                if rolling_back {
                    return;
                }
                let Some(cs) = c.streams.get_mut(&m.stream_id).filter(|s| s.close_on_or_after.is_none()) else {
                    self.violation(format!(
                        "MESSAGE on stream {:#x} not granted on source link {link} (id {})",
                        m.stream_id, m.message_id
                    ));
                    return self.src_error(link, l, "Bad/unregistered stream_id");
                };
                if let Some(last) = cs.last_id
                    && m.message_id <= last
                {
                    let what = format!(
                        "message id regression on source link {link}, stream {:#x}: {} after {last}",
                        m.stream_id, m.message_id
                    );
                    cs.last_id = Some(m.message_id);
                    self.violation(what);
                    return;
                }
                cs.last_id = Some(m.message_id);
                if cs.last_seen != U64_MAX && m.message_id <= cs.last_seen {
                    self.stats.duplicates_dropped += 1;
                    return;
                }
                cs.last_seen = m.message_id;
                cs.since_barrier.push(m.message_id);
                self.stats.processed += 1;
                // The identity application: the record goes to this worker's sink output unchanged.
                self.produce(worker, &m.payload);
            }
            Frame::Eos { stream_id } => {
                let next = self.barrier_id + 1;
                match c.streams.get_mut(&stream_id) {
                    Some(cs) if cs.close_on_or_after.is_none() => cs.close_on_or_after = Some(next),
                    _ => {
                        self.violation(format!("EOS for stream {stream_id:#x} not active on source link {link}"));
                        self.src_error(link, l, "Unable to decode message");
                    }
                }
            }
            Frame::Error { .. } => self.src_close(link, l, true),
            other => {
                self.violation(format!("{} from the source connector on link {link}", other.name()));
                self.src_error(link, l, "Invalid message");
            }
        }
    }

    fn produce(&mut self, worker: usize, payload: &[u8]) {
        let s = &mut self.sinks[worker];
        s.starts.push(s.current);
        s.out.extend_from_slice(payload);
        s.current += payload.len() as u64;
    }

    // ----- sink side -----

    /// The worker's sink connects and sends the intro (spec 3.2).
    pub fn sink_connect(&mut self, w: usize, link: u64, l: &mut SinkLink) {
        let app = self.cfg.app.clone();
        let cookie = self.cfg.cookie.clone();
        let s = &mut self.sinks[w];
        s.link = Some(link);
        s.ec = Ec::Intro { ok: false, notify_ack: false };
        s.buf.clear();
        s.rtag += 1;
        let frames = [
            Frame::Hello(Hello {
                version: Bytes::from_static(SINK_VERSION.as_bytes()),
                cookie: Bytes::from(cookie),
                program_name: Bytes::from(app),
                instance_name: Bytes::from(s.name.clone()),
            }),
            Frame::Notify { stream_id: 1, stream_name: Bytes::from(s.stream_name.clone()), point_of_ref: s.current },
            match (TwoPc::ListUncommitted { rtag: s.rtag }).to_frame() {
                Ok(f) => f,
                Err(e) => return self.violation(e.to_string()),
            },
        ];
        for f in &frames {
            if let Err(e) = l.to_sink.push_frame(f, 0) {
                self.violation(e);
            }
        }
    }

    /// The sink connection is gone (either side). A 2PC-ready connection forces an abort (spec 3.5).
    pub fn sink_closed(&mut self, w: usize) {
        let s = &mut self.sinks[w];
        s.link = None;
        let was_ready = s.ec == Ec::Ready;
        s.ec = Ec::Disconnected;
        s.rollback_info = None;
        s.buf.clear();
        if was_ready && self.rolling_back.is_none() {
            match (&s.round, self.checkpoint.as_mut()) {
                (Some(r), Some(cp)) if r.vote.is_none() => {
                    cp.doomed.get_or_insert_with(|| format!("sink connection of {} dropped during Phase 1", s.name));
                }
                _ => s.abort_next = true,
            }
        }
    }

    fn send_2pc(l: &mut SinkLink, msg: TwoPc) -> Result<(), String> {
        let f = msg.to_frame().map_err(|e| e.to_string())?;
        l.to_sink.push_frame(&f, 0)
    }

    pub fn sink_receive(&mut self, w: usize, l: &mut SinkLink, chunk: &[u8]) {
        self.sinks[w].buf.extend_from_slice(chunk);
        let frames = match decode_frames(&mut self.sinks[w].buf) {
            Ok(f) => f,
            Err(e) => return self.violation(format!("worker {w}: undecodable frame from the sink: {e}")),
        };
        for f in frames {
            self.sink_frame(w, l, f);
        }
    }

    fn sink_frame(&mut self, w: usize, l: &mut SinkLink, frame: Frame) {
        let name = self.sinks[w].name.clone();
        let ec = self.sinks[w].ec.clone();
        match (ec, frame) {
            (Ec::Intro { ok: false, notify_ack: false }, Frame::Ok { initial_credits }) => {
                if initial_credits < 2 {
                    self.violation(format!("{name}: OK with {initial_credits} credits (HEY, too few credits)"));
                }
                self.sinks[w].ec = Ec::Intro { ok: true, notify_ack: false };
            }
            (Ec::Intro { ok: true, notify_ack: false }, Frame::NotifyAck { success, stream_id, .. }) => {
                if !success || stream_id != 1 {
                    self.violation(format!("{name}: NOTIFY_ACK({success}, {stream_id})"));
                }
                self.sinks[w].ec = Ec::Intro { ok: true, notify_ack: true };
            }
            (Ec::Intro { ok: true, notify_ack: true }, Frame::Message(m)) if m.stream_id == 0 => {
                match TwoPc::decode(m.payload) {
                    Ok(TwoPc::ReplyUncommitted { txn_ids, .. }) => match txn_ids.len() {
                        0 => self.sinks[w].ec = Ec::Ready,
                        1 => {
                            self.sinks[w].ec = Ec::WaitingRollback(txn_ids[0].clone());
                            self.resolve(w, l);
                        }
                        n => self.violation(format!("{name}: {n} uncommitted transactions (the worker requires one)")),
                    },
                    other => self.violation(format!("{name}: expected ReplyUncommitted, got {other:?}")),
                }
            }
            (Ec::Ready, Frame::Message(Message { stream_id: 0, payload, .. })) => match TwoPc::decode(payload) {
                Ok(TwoPc::Reply { txn_id, commit }) => {
                    let s = &mut self.sinks[w];
                    match s.round.as_mut() {
                        Some(r) if r.vote.is_none() && r.txn == txn_id => {
                            r.vote = Some(commit);
                            if !commit && let Some(cp) = self.checkpoint.as_mut() {
                                cp.doomed.get_or_insert_with(|| format!("{name} voted abort"));
                            }
                        }
                        Some(r) if r.vote.is_none() => {
                            let want = String::from_utf8_lossy(&r.txn).into_owned();
                            self.violation(format!(
                                "{name}: reply for {} while waiting for {want} (the worker would Fail())",
                                String::from_utf8_lossy(&txn_id)
                            ));
                        }
                        _ => self.violation(format!(
                            "{name}: stray TwoPCReply for {} with no Phase 1 waiting",
                            String::from_utf8_lossy(&txn_id)
                        )),
                    }
                }
                other => self.violation(format!("{name}: stray 2PC message from the sink: {other:?}")),
            },
            (ec, f) => self.violation(format!("{name}: {} from the sink while {ec:?}", f.name())),
        }
    }

    /// WaitingForRollbackPayload: Phase 2 for the listed txn, commit iff it is the rollback checkpoint's.
    fn resolve(&mut self, w: usize, l: &mut SinkLink) {
        let s = &mut self.sinks[w];
        let (Ec::WaitingRollback(txn), Some(rb)) = (s.ec.clone(), s.rollback_info) else { return };
        let commit = txn == s.txn_name(rb);
        s.ec = Ec::Ready;
        if let Err(e) = Self::send_2pc(l, TwoPc::Phase2 { txn_id: txn, commit }) {
            self.violation(e);
        }
    }

    /// Writes the output produced since the last send, if the valve is open.
    pub fn sink_pump(&mut self, w: usize, l: &mut SinkLink) {
        if self.rolling_back.is_some() {
            return;
        }
        let s = &mut self.sinks[w];
        if s.ec != Ec::Ready || s.round.is_some() {
            return;
        }
        let first = s.starts.partition_point(|&o| o < s.sent);
        let mut errs = Vec::new();
        for i in first..s.starts.len() {
            let start = s.starts[i];
            let end = s.starts.get(i + 1).copied().unwrap_or(s.current);
            if std::mem::take(&mut s.lose_next) {
                continue;
            }
            let (a, b) = (start as usize, end as usize);
            let f = Frame::Message(Message {
                stream_id: 1,
                message_id: start,
                event_time: 0,
                key: None,
                payload: Bytes::copy_from_slice(&s.out[a..b]),
            });
            if let Err(e) = l.to_sink.push_frame(&f, 0) {
                errs.push(e);
            }
        }
        s.sent = s.current;
        for e in errs {
            self.violation(e);
        }
    }

    pub fn sink_can_pump(&self, w: usize) -> bool {
        let s = &self.sinks[w];
        self.rolling_back.is_none() && s.ec == Ec::Ready && s.round.is_none() && s.unsent()
    }

    /// Fault: Phase 2 commit of the last completed round sent again (the sink must ignore it silently).
    pub fn sink_dup_phase2(&mut self, w: usize, l: &mut SinkLink) {
        let s = &self.sinks[w];
        if s.ec != Ec::Ready || s.round.is_some() {
            return;
        }
        if let Some(txn) = s.last_txn.clone()
            && let Err(e) = Self::send_2pc(l, TwoPc::Phase2 { txn_id: txn, commit: true })
        {
            self.violation(e);
        }
    }

    /// Fault: Phase 2 for a transaction the sink never saw.
    pub fn sink_unknown_phase2(&mut self, w: usize, l: &mut SinkLink, commit: bool) {
        let s = &self.sinks[w];
        if s.ec != Ec::Ready || s.round.is_some() {
            return;
        }
        let txn = s.txn_name(self.barrier_id + 1000);
        if let Err(e) = Self::send_2pc(l, TwoPc::Phase2 { txn_id: txn, commit }) {
            self.violation(e);
        }
    }

    // ----- checkpoints and rollbacks -----

    /// The checkpoint barrier (spec 2.7, 3.4): sources record last_acked = last_seen, each sink gets Phase 1.
    /// `sink_links` holds each worker's open sink link, if any.
    pub fn barrier(&mut self, sink_links: &mut [Option<&mut SinkLink>]) {
        self.barrier_id += 1;
        let id = self.barrier_id;
        let mut snapshot = Snapshot { streams: self.inactive.clone(), sink_offsets: Vec::new() };
        for c in self.conns.values_mut() {
            for (sid, cs) in c.streams.iter_mut() {
                cs.last_acked = cs.last_seen;
                cs.since_barrier.clear();
                if self.active.contains_key(sid) {
                    snapshot.streams.insert(*sid, cs.last_acked);
                }
            }
        }
        let mut doomed = None;
        for (w, link) in sink_links.iter_mut().enumerate() {
            // Queued output goes out before Phase 1: the round covers everything produced before the barrier.
            if let Some(l) = link.as_deref_mut() {
                self.sink_pump(w, l);
            }
            let s = &mut self.sinks[w];
            snapshot.sink_offsets.push(s.current);
            if std::mem::take(&mut s.abort_next) {
                doomed.get_or_insert_with(|| format!("{}: a 2PC-ready connection dropped earlier", s.name));
                continue;
            }
            match (s.ec == Ec::Ready && s.round.is_none(), link.as_deref_mut()) {
                (true, Some(l)) => {
                    let txn = s.txn_name(id);
                    let where_list = vec![WhereRange { stream_id: 1, start: s.last, end: s.current }];
                    s.round = Some(Round { txn: txn.clone(), end: s.current, vote: None });
                    if let Err(e) = Self::send_2pc(l, TwoPc::Phase1 { txn_id: txn, where_list }) {
                        self.violations.push(e);
                    }
                }
                _ => {
                    doomed.get_or_insert_with(|| format!("{}: sink not 2PC-ready at the barrier", s.name));
                }
            }
        }
        self.checkpoint = Some(InFlight { id, snapshot, doomed });
    }

    /// Takes the in-flight checkpoint's fate: `Err(reason)` if it must abort.
    pub fn take_doom(&self) -> Option<String> {
        self.checkpoint.as_ref().and_then(|c| c.doomed.clone())
    }

    /// Checkpoint completion: one ACK per source connection, Phase 2 commit to every sink.
    pub fn complete(&mut self, src_links: &mut BTreeMap<u64, SrcLink>, sink_links: &mut [Option<&mut SinkLink>]) {
        let Some(cp) = self.checkpoint.take() else { return };
        let id = cp.id;
        let max = self.cfg.max_credits;
        let mut relinquish = Vec::new();
        let mut errs = Vec::new();
        for (&link, c) in self.conns.iter_mut() {
            if !c.streaming {
                continue;
            }
            let mut entries = Vec::new();
            let mut closing = Vec::new();
            for (&sid, cs) in c.streams.iter() {
                match cs.close_on_or_after {
                    Some(at) if at <= id => {
                        entries.push((sid, cs.last_acked));
                        closing.push(sid);
                    }
                    Some(_) => {}
                    None => entries.push((sid, cs.last_acked)),
                }
            }
            for sid in closing {
                if let Some(cs) = c.streams.remove(&sid) {
                    relinquish.push((sid, link, cs.last_acked));
                }
            }
            let add = max.wrapping_sub(c.credits);
            c.credits = max;
            if (add > 0 || !entries.is_empty())
                && let Some(l) = src_links.get_mut(&link)
                && let Err(e) = Self::send_src(l, &Frame::Ack { credits: add, acks: entries }, add)
            {
                errs.push(e);
            }
        }
        for (sid, link, acked) in relinquish {
            if self.active.get(&sid) == Some(&link) {
                self.active.remove(&sid);
                self.inactive.insert(sid, acked);
            }
        }
        for (&sid, &p) in &cp.snapshot.streams {
            if p != U64_MAX {
                let d = self.durable.entry(sid).or_insert(p);
                *d = (*d).max(p);
            }
        }
        for (w, link) in sink_links.iter_mut().enumerate() {
            let s = &mut self.sinks[w];
            let Some(r) = s.round.take() else { continue };
            s.last = r.end;
            s.durable_out = s.out[..r.end as usize].to_vec();
            s.last_txn = Some(r.txn.clone());
            if s.ec == Ec::Ready
                && let Some(l) = link.as_deref_mut()
                && let Err(e) = Self::send_2pc(l, TwoPc::Phase2 { txn_id: r.txn, commit: true })
            {
                errs.push(e);
            }
        }
        self.completed = (id, cp.snapshot);
        self.stats.completed += 1;
        for e in errs {
            self.violation(e);
        }
    }

    /// Rollback starts (a worker crashed, or the checkpoint aborted): every source connection is closed, every
    /// sink connection hard-closed, the in-flight checkpoint dropped (spec 2.9, 3.5).
    /// Returns the sink links to close (the caller closes both ends).
    pub fn start_rollback(&mut self, src_links: &mut BTreeMap<u64, SrcLink>) -> Vec<u64> {
        self.stats.rollbacks += 1;
        self.checkpoint = None;
        self.rolling_back = Some(self.completed.0);
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for link in conns {
            if let Some(l) = src_links.get_mut(&link) {
                self.src_close(link, l, false);
            } else {
                self.conns.remove(&link);
            }
        }
        let mut closed = Vec::new();
        for w in 0..self.sinks.len() {
            if let Some(link) = self.sinks[w].link.take() {
                closed.push(link);
            }
            let s = &mut self.sinks[w];
            s.ec = Ec::Disconnected;
            s.rollback_info = None;
            s.abort_next = false;
            s.round = None;
            s.buf.clear();
        }
        closed
    }

    /// Rollback completes: the registry and the sinks' offsets are restored from the last completed checkpoint;
    /// connections made during the window get RESTART (to `restart_to`, else their own worker), then are closed.
    pub fn complete_rollback(
        &mut self,
        src_links: &mut BTreeMap<u64, SrcLink>,
        sink_links: &mut BTreeMap<u64, SinkLink>,
        restart_to: Option<usize>,
    ) {
        let Some(target) = self.rolling_back.take() else { return };
        let snap = self.completed.1.clone();
        self.active.clear();
        self.inactive = snap.streams.clone();
        for (w, s) in self.sinks.iter_mut().enumerate() {
            let off = snap.sink_offsets.get(w).copied().unwrap_or(0);
            s.current = off;
            s.last = off;
            s.sent = off;
            s.out.truncate(off as usize);
            let keep = s.starts.partition_point(|&o| o < off);
            s.starts.truncate(keep);
            s.rollback_info = Some(target);
        }
        for w in 0..self.sinks.len() {
            if let Some(link) = self.sinks[w].link
                && let Some(l) = sink_links.get_mut(&link)
            {
                self.resolve(w, l);
            }
        }
        let conns: Vec<(u64, usize)> = self.conns.iter().map(|(k, c)| (*k, c.worker)).collect();
        for (link, worker) in conns {
            // RESTART names this worker (same address) or another one (a shrink moving the source, spec 2.9).
            let to = restart_to.unwrap_or(worker);
            let address = Bytes::from(format!("{}:7100", self.cfg.workers[to]));
            if let Some(l) = src_links.get_mut(&link) {
                self.stats.restarts += 1;
                if let Err(e) = Self::send_src(l, &Frame::Restart { address: address.clone() }, 0) {
                    self.violation(e);
                }
                self.src_close(link, l, false);
            }
        }
    }

    /// The committed snapshot's point of reference of a stream, for diagnostics.
    pub fn registry_dump(&self) -> String {
        format!("active={:?} inactive={:?} completed={}", self.active, self.inactive, self.completed.0)
    }
}
