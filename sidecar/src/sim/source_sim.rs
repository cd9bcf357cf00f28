//! A worker's source connector listener (spec 2.2): one state shared by all connections, as the worker's
//! stream registry is shared, so checkpoints, rollbacks and ownership rules span connections.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::{DEFAULT_MAX_FRAME, Frame, FrameCodec, SOURCE_VERSION, U64_MAX};

#[derive(Debug, Clone)]
pub struct SourceSimConfig {
    pub listen: String,
    pub cookie: String,
    pub max_credits: u32,
    pub refill_credits: u32,
    /// Checkpoint period; `None` checkpoints only on [`SourceSim::checkpoint_now`].
    pub checkpoint_every: Option<Duration>,
    /// Keep every processed payload (tests); benchmarks only count.
    pub keep_payloads: bool,
    /// Where the stream registry's leader lives (spec 2.5): a remote leader grants a new stream the point of
    /// reference the connector sent in its NOTIFY, the local one grants U64_MAX.
    pub leader: Leader,
    /// Resilience on: checkpoints ACK streams. Off: ACKs carry credits only and EOS is acked at once (spec 2.7).
    pub resilient: bool,
    /// How long a rollback lasts (spec 2.9): connections made meanwhile get their NOTIFYs refused and their
    /// MESSAGEs dropped, then a RESTART.
    pub rollback_window: Duration,
    /// Resilient workers keep source listeners muted until checkpoint 1 completes (spec 2.1): connections are
    /// accepted but HELLO is neither read nor answered until then.
    pub mute_until_first_checkpoint: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Leader {
    #[default]
    Local,
    Remote,
}

impl Default for SourceSimConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            cookie: crate::runtime_default_cookie().into(),
            max_credits: 500,
            refill_credits: 50,
            checkpoint_every: Some(Duration::from_millis(100)),
            keep_payloads: true,
            leader: Leader::Local,
            resilient: true,
            rollback_window: Duration::ZERO,
            mute_until_first_checkpoint: false,
        }
    }
}

/// Counters a test asserts on: anything non-zero in `credit_overruns`, `second_hello` or `protocol_errors`
/// means the connector broke the protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    pub connections: u64,
    /// Frames received beyond the credits granted. The real worker does not notice (its u32 wraps and refills
    /// misbehave, spec 2.4); the model counts it and closes the connection, so an overrun can never pass a test.
    pub credit_overruns: u64,
    /// MESSAGE ids that did not increase on one connection (spec 2.11 rule 4): the worker would drop them
    /// silently as duplicates, losing the records.
    pub id_regressions: u64,
    pub second_hello: u64,
    pub protocol_errors: u64,
    pub duplicates: u64,
    pub checkpoints: u64,
    pub restarts: u64,
    pub eos_completed: u64,
}

/// A processed message, as the pipeline saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    pub stream: Bytes,
    pub stream_id: u64,
    pub message_id: u64,
    pub payload: Bytes,
    /// Rollbacks before this message was processed: a consumer drops messages of an older epoch, which a
    /// rollback undid (they are replayed).
    pub epoch: u64,
}

#[derive(Debug, Default)]
struct StreamRec {
    name: Bytes,
    /// The registry has granted this stream before (it is no longer "new", spec 2.5).
    seen: bool,
    active_conn: Option<u64>,
    /// Last checkpointed point of reference (U64_MAX: nothing yet).
    last_acked: u64,
    processed: Vec<(u64, Bytes)>,
    processed_count: u64,
    /// Length of `processed` at the last completed checkpoint: a rollback truncates back to it.
    committed_len: usize,
    committed_count: u64,
    finished: bool,
}

#[derive(Debug)]
struct ConnStream {
    last_seen: u64,
    /// Last id this connection sent on the stream.
    last_id: Option<u64>,
    /// EOS received: close at the first checkpoint with id >= this.
    close_on_or_after: Option<u64>,
}

struct Conn {
    tx: mpsc::Sender<Out>,
    credits: u32,
    /// Credits the connector was given on this connection (OK plus every ACK) and frames it sent after HELLO.
    granted: u64,
    received: u64,
    refill_owed: bool,
    streaming: bool,
    streams: HashMap<u64, ConnStream>,
}

enum Out {
    Bytes(Bytes),
    Close,
}

/// The simulator's whole state; tests read it through [`SourceSim::wait_until`].
pub struct SourceSimState {
    cfg: SourceSimConfig,
    addr: SocketAddr,
    streams: HashMap<u64, StreamRec>,
    conns: HashMap<u64, Conn>,
    checkpoint_id: u64,
    stalled: bool,
    credits_stalled: bool,
    epoch: u64,
    rolling_back: bool,
    next_conn: u64,
    stats: SimStats,
}

impl SourceSimState {
    fn rec_by_name(&self, name: &str) -> Option<&StreamRec> {
        self.streams.values().find(|r| r.name.as_ref() == name.as_bytes())
    }
    /// Messages processed on all streams (after rollbacks).
    pub fn processed_total(&self) -> u64 {
        self.streams.values().map(|r| r.processed_count).sum()
    }
    pub fn processed_count(&self, stream: &str) -> u64 {
        self.rec_by_name(stream).map_or(0, |r| r.processed_count)
    }
    pub fn processed(&self, stream: &str) -> Vec<(u64, Bytes)> {
        self.rec_by_name(stream).map(|r| r.processed.clone()).unwrap_or_default()
    }
    /// Last acknowledged (checkpointed) point of reference of a stream.
    pub fn acked(&self, stream: &str) -> Option<u64> {
        self.rec_by_name(stream).map(|r| r.last_acked).filter(|p| *p != U64_MAX)
    }
    pub fn finished(&self, stream: &str) -> bool {
        self.rec_by_name(stream).is_some_and(|r| r.finished)
    }
    pub fn stream_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.streams.values().map(|r| String::from_utf8_lossy(&r.name).into_owned()).collect();
        v.sort();
        v
    }
    pub fn connected(&self) -> usize {
        self.conns.values().filter(|c| c.streaming).count()
    }
    pub fn stats(&self) -> SimStats {
        self.stats.clone()
    }

    fn send(&mut self, conn: u64, frame: Frame) {
        if let Some(c) = self.conns.get_mut(&conn) {
            match &frame {
                Frame::Ok { initial_credits } => c.granted = u64::from(*initial_credits),
                Frame::Ack { credits, .. } => c.granted += u64::from(*credits),
                _ => {}
            }
            let mut buf = BytesMut::new();
            if frame.encode(&mut buf).is_ok() {
                // A full writer queue means the connector stopped reading; dropping a reply would be a lie, so
                // close instead (the connector reconnects).
                if c.tx.try_send(Out::Bytes(buf.freeze())).is_err() {
                    let _ = c.tx.try_send(Out::Close);
                }
            }
        }
    }

    fn error_and_close(&mut self, conn: u64, message: String) {
        tracing::debug!(conn, %message, "sim worker sends ERROR");
        self.stats.protocol_errors += 1;
        self.send(conn, Frame::Error { message: Bytes::from(message) });
        self.close(conn);
    }

    fn close(&mut self, conn: u64) {
        if let Some(c) = self.conns.remove(&conn) {
            let _ = c.tx.try_send(Out::Close);
            for (sid, _) in c.streams {
                if let Some(r) = self.streams.get_mut(&sid) {
                    r.active_conn = None;
                }
            }
        }
    }

    /// Spec 2.2, one frame; `out` collects processed messages for the application hook.
    fn on_frame(&mut self, conn: u64, frame: Frame, out: &mut Vec<Processed>) {
        let max = self.cfg.max_credits;
        let refill = self.cfg.refill_credits;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.streaming {
            c.received += 1;
            if c.received > c.granted {
                self.stats.credit_overruns += 1;
                let msg = format!("credit overrun: frame {} after {} credits granted", c.received, c.granted);
                return self.error_and_close(conn, msg);
            }
        }
        c.credits = c.credits.wrapping_sub(1);
        if c.streaming && c.credits <= refill {
            if self.credits_stalled {
                // A slow worker: the refill is owed and sent when the stall ends. A connector that does not wait
                // for it overruns what it was actually granted, which the check above then sees.
                c.refill_owed = true;
            } else {
                let add = max.wrapping_sub(c.credits);
                c.credits = max;
                self.send(conn, Frame::Ack { credits: add, acks: vec![] });
            }
        }
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let streaming = c.streaming;
        match frame {
            Frame::Hello(h) => {
                if streaming {
                    // The real worker calls Fail() here: the whole process aborts.
                    self.stats.second_hello += 1;
                    self.close(conn);
                } else if h.version.as_ref() != SOURCE_VERSION.as_bytes() {
                    let v = String::from_utf8_lossy(&h.version).into_owned();
                    self.error_and_close(conn, format!("Unknown protocol version: {v}"));
                } else if h.cookie.as_ref() != self.cfg.cookie.as_bytes() {
                    let got = String::from_utf8_lossy(&h.cookie).into_owned();
                    let want = self.cfg.cookie.clone();
                    self.error_and_close(conn, format!("Bad cookie: {got}, wanted: {want}"));
                } else {
                    c.credits = max;
                    c.streaming = true;
                    self.send(conn, Frame::Ok { initial_credits: max });
                }
            }
            Frame::Notify { stream_id, stream_name, point_of_ref } => {
                if !streaming {
                    return self.error_and_close(conn, "Bad protocol FSM state".into());
                }
                let here = c.streams.contains_key(&stream_id);
                let rec = self.streams.entry(stream_id).or_insert_with(|| StreamRec {
                    name: stream_name.clone(),
                    last_acked: U64_MAX,
                    ..Default::default()
                });
                let new_stream = rec.last_acked == U64_MAX && rec.processed_count == 0 && !rec.seen;
                if here || rec.active_conn.is_some() || self.rolling_back {
                    self.send(conn, Frame::NotifyAck { success: false, stream_id, point_of_ref });
                    return;
                }
                rec.active_conn = Some(conn);
                rec.finished = false;
                rec.seen = true;
                // Spec 2.5: a remote leader answers a new stream with the connector's own NOTIFY value.
                let por = if new_stream && self.cfg.leader == Leader::Remote { point_of_ref } else { rec.last_acked };
                if new_stream {
                    rec.last_acked = por;
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.streams.insert(stream_id, ConnStream { last_seen: por, last_id: None, close_on_or_after: None });
                }
                self.send(conn, Frame::NotifyAck { success: true, stream_id, point_of_ref: por });
            }
            Frame::Message(m) => {
                if !streaming {
                    return self.error_and_close(conn, "Bad protocol FSM state".into());
                }
                let Some(cs) = c.streams.get_mut(&m.stream_id).filter(|s| s.close_on_or_after.is_none()) else {
                    let msg = format!("Bad/unregistered stream_id {} with message_id {}", m.stream_id, m.message_id);
                    return self.error_and_close(conn, msg);
                };
                if self.rolling_back {
                    return;
                }
                if let Some(last) = cs.last_id
                    && m.message_id <= last
                {
                    self.stats.id_regressions += 1;
                    let msg = format!(
                        "message id {} after {last} on stream {}: ids must increase",
                        m.message_id, m.stream_id
                    );
                    return self.error_and_close(conn, msg);
                }
                cs.last_id = Some(m.message_id);
                if cs.last_seen != U64_MAX && m.message_id <= cs.last_seen {
                    self.stats.duplicates += 1;
                    return;
                }
                cs.last_seen = m.message_id;
                if let Some(rec) = self.streams.get_mut(&m.stream_id) {
                    rec.processed_count += 1;
                    if self.cfg.keep_payloads {
                        rec.processed.push((m.message_id, m.payload.clone()));
                    }
                    out.push(Processed {
                        stream: rec.name.clone(),
                        stream_id: m.stream_id,
                        message_id: m.message_id,
                        payload: m.payload,
                        epoch: self.epoch,
                    });
                }
            }
            Frame::Eos { stream_id } => {
                let next = self.checkpoint_id + 1;
                let resilient = self.cfg.resilient;
                match c.streams.get_mut(&stream_id) {
                    Some(cs) if cs.close_on_or_after.is_none() && resilient => cs.close_on_or_after = Some(next),
                    Some(cs) if cs.close_on_or_after.is_none() => {
                        // Non-resilient: ACK(0, [(sid, last_seen)]) at once, then relinquish (spec 2.8).
                        let last = cs.last_seen;
                        c.streams.remove(&stream_id);
                        if let Some(rec) = self.streams.get_mut(&stream_id) {
                            rec.active_conn = None;
                            rec.finished = true;
                            self.stats.eos_completed += 1;
                        }
                        self.send(conn, Frame::Ack { credits: 0, acks: vec![(stream_id, last)] });
                    }
                    _ => self.error_and_close(conn, "Unable to decode message".into()),
                }
            }
            Frame::Error { .. } => self.close(conn),
            other => {
                let name = other.name().to_ascii_lowercase();
                self.error_and_close(conn, format!("Invalid message: {name}"));
            }
        }
    }

    /// Barrier and completion in one step (spec 2.7): acked = last seen, one ACK per connection that tops up
    /// credits and lists every stream, EOS'd streams are acked and relinquished.
    fn checkpoint(&mut self) {
        self.checkpoint_through(None);
    }

    /// A checkpoint whose barrier covers, per stream id, only what the pipeline passed on (`through`): what was
    /// processed after it stays unacknowledged and is replayed after a rollback. `None`: everything seen.
    fn checkpoint_through(&mut self, through: Option<&HashMap<u64, u64>>) {
        self.checkpoint_id += 1;
        self.stats.checkpoints += 1;
        let id = self.checkpoint_id;
        let max = self.cfg.max_credits;
        let resilient = self.cfg.resilient;
        let mut sends = Vec::new();
        for (&conn_id, c) in self.conns.iter_mut() {
            if !c.streaming {
                continue;
            }
            if !resilient {
                // No checkpoints without resilience: only credits are topped up.
                let add = max.wrapping_sub(c.credits);
                c.credits = max;
                if add > 0 {
                    sends.push((conn_id, Frame::Ack { credits: add, acks: vec![] }));
                }
                continue;
            }
            let mut entries = Vec::new();
            let mut closing = Vec::new();
            for (&sid, cs) in c.streams.iter() {
                let Some(rec) = self.streams.get_mut(&sid) else { continue };
                let point = match through {
                    None => cs.last_seen,
                    Some(m) => m
                        .get(&sid)
                        .map_or(rec.last_acked, |&p| if cs.last_seen == U64_MAX { p } else { p.min(cs.last_seen) }),
                };
                rec.last_acked = point;
                rec.committed_len = rec.processed.len();
                rec.committed_count = rec.processed_count;
                match cs.close_on_or_after {
                    // A stream closes only once the barrier covers everything it sent.
                    Some(at) if at <= id && point == cs.last_seen => {
                        entries.push((sid, point));
                        closing.push(sid);
                    }
                    Some(_) => {}
                    None => entries.push((sid, point)),
                }
            }
            for sid in closing {
                c.streams.remove(&sid);
                if let Some(rec) = self.streams.get_mut(&sid) {
                    rec.active_conn = None;
                    rec.finished = true;
                    self.stats.eos_completed += 1;
                }
            }
            let add = max.wrapping_sub(c.credits);
            c.credits = max;
            if add > 0 || !entries.is_empty() {
                entries.sort_unstable();
                sends.push((conn_id, Frame::Ack { credits: add, acks: entries }));
            }
        }
        for (conn, f) in sends {
            self.send(conn, f);
        }
    }

    /// Rollback (spec 2.9): processed effects since the last checkpoint are undone, every connection is told to
    /// RESTART (or just closed) and its streams go back to the registry at their checkpointed point.
    fn rollback(&mut self, send_restart: bool, to: Option<String>) {
        self.epoch += 1;
        for rec in self.streams.values_mut() {
            rec.processed.truncate(rec.committed_len);
            rec.processed_count = rec.committed_count;
        }
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        let address = Bytes::from(to.unwrap_or_else(|| self.addr.to_string()));
        for conn in conns {
            if send_restart {
                self.stats.restarts += 1;
                self.send(conn, Frame::Restart { address: address.clone() });
            }
            self.close(conn);
        }
    }
}

/// Handle to a running simulated worker (source direction). Dropping it stops the simulator.
pub struct SourceSim {
    state: Arc<Mutex<SourceSimState>>,
    stop: CancellationToken,
    addr: SocketAddr,
}

impl Drop for SourceSim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock(state: &Mutex<SourceSimState>) -> MutexGuard<'_, SourceSimState> {
    match state.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl SourceSim {
    pub async fn start(cfg: SourceSimConfig) -> std::io::Result<Self> {
        Self::start_with_output(cfg, None).await
    }

    /// Like `start`, handing every processed message to `output` (the application pipeline).
    pub async fn start_with_output(
        cfg: SourceSimConfig,
        output: Option<mpsc::Sender<Processed>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(&cfg.listen).await?;
        let addr = listener.local_addr()?;
        let every = cfg.checkpoint_every;
        let state = Arc::new(Mutex::new(SourceSimState {
            cfg,
            addr,
            streams: HashMap::new(),
            conns: HashMap::new(),
            checkpoint_id: 0,
            stalled: false,
            credits_stalled: false,
            epoch: 0,
            rolling_back: false,
            next_conn: 0,
            stats: SimStats::default(),
        }));
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, state.clone(), stop.clone(), output));
        if let Some(every) = every {
            let (state, stop) = (state.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let mut s = lock(&state);
                            if !s.stalled {
                                s.checkpoint();
                            }
                        }
                        _ = stop.cancelled() => break,
                    }
                }
            });
        }
        Ok(Self { state, stop, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs `f` on the current state.
    pub fn with<T>(&self, f: impl FnOnce(&SourceSimState) -> T) -> T {
        f(&lock(&self.state))
    }

    /// Polls until `pred` holds or `timeout` passes; returns whether it held.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&SourceSimState) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.with(&pred) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn processed_total(&self) -> u64 {
        self.with(|s| s.processed_total())
    }
    pub fn processed(&self, stream: &str) -> Vec<(u64, Bytes)> {
        self.with(|s| s.processed(stream))
    }
    pub fn acked(&self, stream: &str) -> Option<u64> {
        self.with(|s| s.acked(stream))
    }
    pub fn stats(&self) -> SimStats {
        self.with(|s| s.stats())
    }
    /// Rollbacks so far (see [`Processed::epoch`]).
    pub fn epoch(&self) -> u64 {
        self.with(|s| s.epoch)
    }

    /// Completes a checkpoint now (sends the ACKs).
    pub fn checkpoint_now(&self) {
        lock(&self.state).checkpoint();
    }
    /// Completes a checkpoint whose barrier covers, per stream id, messages up to the given id (what the
    /// pipeline delivered downstream before the barrier).
    pub fn checkpoint_through(&self, through: &HashMap<u64, u64>) {
        lock(&self.state).checkpoint_through(Some(through));
    }
    /// Fault: stop (or resume) completing checkpoints; credit refills continue.
    pub fn stall_acks(&self, stalled: bool) {
        lock(&self.state).stalled = stalled;
    }
    /// Fault: hold back (or release) credit refills, as a busy worker does; checkpoint ACKs still top up.
    pub fn stall_credits(&self, stalled: bool) {
        let mut s = lock(&self.state);
        s.credits_stalled = stalled;
        if stalled {
            return;
        }
        let max = s.cfg.max_credits;
        let owed: Vec<(u64, u32)> = s
            .conns
            .iter_mut()
            .filter(|(_, c)| c.refill_owed && c.streaming)
            .map(|(id, c)| {
                c.refill_owed = false;
                let add = max.wrapping_sub(c.credits);
                c.credits = max;
                (*id, add)
            })
            .collect();
        for (conn, add) in owed {
            s.send(conn, Frame::Ack { credits: add, acks: vec![] });
        }
    }
    /// Fault (a broken or hostile worker): ACK `stream` through `por` on the connection that holds it, whatever
    /// was sent. Returns false if no connection holds the stream.
    pub fn inject_ack(&self, stream: &str, por: u64) -> bool {
        let mut s = lock(&self.state);
        let Some((&sid, rec)) = s.streams.iter().find(|(_, r)| r.name.as_ref() == stream.as_bytes()) else {
            return false;
        };
        let Some(conn) = rec.active_conn else { return false };
        s.send(conn, Frame::Ack { credits: 0, acks: vec![(sid, por)] });
        true
    }
    /// Fault: drop every connection (a network blip; no rollback).
    pub fn drop_connections(&self) {
        let mut s = lock(&self.state);
        let conns: Vec<u64> = s.conns.keys().copied().collect();
        for c in conns {
            s.close(c);
        }
    }
    /// Fault: roll back to the last checkpoint and send RESTART to every connection.
    pub fn restart_connections(&self) {
        lock(&self.state).rollback(true, None);
    }
    /// Fault: roll back and send RESTART naming another address (a shrink moving the source, spec 2.9).
    pub fn restart_connections_to(&self, address: &str) {
        lock(&self.state).rollback(true, Some(address.to_string()));
    }
    /// Fault: roll back to the last checkpoint and close every connection (what a rollback looks like).
    /// With a `rollback_window`, connections made during it get NOTIFY refused and MESSAGEs dropped, then RESTART.
    pub fn rollback(&self) {
        let window = {
            let mut s = lock(&self.state);
            s.rollback(false, None);
            s.cfg.rollback_window
        };
        if window.is_zero() {
            return;
        }
        lock(&self.state).rolling_back = true;
        let state = self.state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let mut s = lock(&state);
            s.rolling_back = false;
            // Sessions still active at rollback_complete are told to RESTART (spec 2.9 step 3).
            s.rollback(true, None);
        });
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<Mutex<SourceSimState>>,
    stop: CancellationToken,
    output: Option<mpsc::Sender<Processed>>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(stream, state.clone(), stop.clone(), output.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sim accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.cancelled() => break,
        }
    }
}

async fn connection(
    stream: TcpStream,
    state: Arc<Mutex<SourceSimState>>,
    stop: CancellationToken,
    output: Option<mpsc::Sender<Processed>>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Out>(4096);
    let id = {
        let mut s = lock(&state);
        s.next_conn += 1;
        s.stats.connections += 1;
        let id = s.next_conn;
        let credits = s.cfg.max_credits;
        s.conns.insert(
            id,
            Conn {
                tx,
                credits,
                granted: 0,
                received: 0,
                refill_owed: false,
                streaming: false,
                streams: HashMap::new(),
            },
        );
        id
    };
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Out::Bytes(b) => {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Out::Close => break,
            }
        }
        let _ = wr.shutdown().await;
    });
    // Muted: the connection is up, but nothing is read until the first checkpoint completes.
    loop {
        let muted = {
            let s = lock(&state);
            s.cfg.mute_until_first_checkpoint && s.checkpoint_id == 0
        };
        if !muted || stop.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let codec = FrameCodec::new(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut processed = Vec::new();
    loop {
        let n = tokio::select! {
            r = rd.read_buf(&mut buf) => r.unwrap_or(0),
            _ = stop.cancelled() => 0,
        };
        if n == 0 {
            break;
        }
        {
            let mut s = lock(&state);
            if !s.conns.contains_key(&id) {
                break;
            }
            loop {
                match codec.split_frame(&mut buf) {
                    Ok(Some(body)) => match Frame::decode(body) {
                        Ok(f) => s.on_frame(id, f, &mut processed),
                        Err(e) => {
                            s.error_and_close(id, format!("Unable to decode message: {e}"));
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        s.error_and_close(id, format!("Unable to decode message: {e}"));
                        break;
                    }
                }
                if !s.conns.contains_key(&id) {
                    break;
                }
            }
        }
        if let Some(out) = &output {
            for p in processed.drain(..) {
                if out.send(p).await.is_err() {
                    break;
                }
            }
        } else {
            processed.clear();
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
    }
    lock(&state).close(id);
    let _ = writer.await;
}
