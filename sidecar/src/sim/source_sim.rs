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
        }
    }
}

/// Counters a test asserts on: anything non-zero in `credit_overruns`, `second_hello` or `protocol_errors`
/// means the connector broke the protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    pub connections: u64,
    pub credit_overruns: u64,
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
    pub message_id: u64,
    pub payload: Bytes,
}

#[derive(Debug, Default)]
struct StreamRec {
    name: Bytes,
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
    /// EOS received: close at the first checkpoint with id >= this.
    close_on_or_after: Option<u64>,
}

struct Conn {
    tx: mpsc::Sender<Out>,
    credits: u32,
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

    fn send(&self, conn: u64, frame: Frame) {
        if let Some(c) = self.conns.get(&conn) {
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
        if c.credits == 0 {
            self.stats.credit_overruns += 1;
        }
        c.credits = c.credits.wrapping_sub(1);
        if c.streaming && c.credits <= refill {
            let add = max.wrapping_sub(c.credits);
            c.credits = max;
            self.send(conn, Frame::Ack { credits: add, acks: vec![] });
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
                if here || rec.active_conn.is_some() {
                    self.send(conn, Frame::NotifyAck { success: false, stream_id, point_of_ref });
                    return;
                }
                rec.active_conn = Some(conn);
                rec.finished = false;
                let por = rec.last_acked;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.streams.insert(stream_id, ConnStream { last_seen: por, close_on_or_after: None });
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
                    out.push(Processed { stream: rec.name.clone(), message_id: m.message_id, payload: m.payload });
                }
            }
            Frame::Eos { stream_id } => {
                let next = self.checkpoint_id + 1;
                match c.streams.get_mut(&stream_id) {
                    Some(cs) if cs.close_on_or_after.is_none() => cs.close_on_or_after = Some(next),
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
        self.checkpoint_id += 1;
        self.stats.checkpoints += 1;
        let id = self.checkpoint_id;
        let max = self.cfg.max_credits;
        let mut sends = Vec::new();
        for (&conn_id, c) in self.conns.iter_mut() {
            if !c.streaming {
                continue;
            }
            let mut entries = Vec::new();
            let mut closing = Vec::new();
            for (&sid, cs) in c.streams.iter() {
                if let Some(rec) = self.streams.get_mut(&sid) {
                    rec.last_acked = cs.last_seen;
                    rec.committed_len = rec.processed.len();
                    rec.committed_count = rec.processed_count;
                }
                match cs.close_on_or_after {
                    Some(at) if at <= id => {
                        entries.push((sid, cs.last_seen));
                        closing.push(sid);
                    }
                    Some(_) => {}
                    None => entries.push((sid, cs.last_seen)),
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
    fn rollback(&mut self, send_restart: bool) {
        for rec in self.streams.values_mut() {
            rec.processed.truncate(rec.committed_len);
            rec.processed_count = rec.committed_count;
        }
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        let address = Bytes::from(self.addr.to_string());
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

    /// Completes a checkpoint now (sends the ACKs).
    pub fn checkpoint_now(&self) {
        lock(&self.state).checkpoint();
    }
    /// Fault: stop (or resume) completing checkpoints; credit refills continue.
    pub fn stall_acks(&self, stalled: bool) {
        lock(&self.state).stalled = stalled;
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
        lock(&self.state).rollback(true);
    }
    /// Fault: roll back to the last checkpoint and close every connection (what a rollback looks like).
    pub fn rollback(&self) {
        lock(&self.state).rollback(false);
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
        s.conns.insert(id, Conn { tx, credits, streaming: false, streams: HashMap::new() });
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
