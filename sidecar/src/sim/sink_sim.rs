//! A worker's connector sink (spec 3): connects, runs the intro, streams byte-offset data on stream 1 and
//! drives one 2PC round per checkpoint. Faults are explicit methods so tests read like scenarios.
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;

use crate::protocol::{CodecError, Frame, FrameCodec, Hello, Message, SINK_VERSION, TwoPc, WhereRange, encode_message};

#[derive(Debug, Clone)]
pub struct SinkSimConfig {
    pub addr: SocketAddr,
    pub worker_name: String,
    pub app_name: String,
    pub cookie: String,
    /// How long to wait for any reply before calling the sink unresponsive.
    pub reply_timeout: Duration,
}

impl SinkSimConfig {
    pub fn new(addr: SocketAddr, worker_name: &str) -> Self {
        Self {
            addr,
            worker_name: worker_name.to_string(),
            app_name: "sim-app".to_string(),
            cookie: crate::runtime_default_cookie().to_string(),
            reply_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkSimError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    #[error("the sink closed the connection")]
    Closed,
    #[error("the sink sent ERROR: {0}")]
    SinkError(String),
    #[error("protocol violation by the sink: {0}")]
    Violation(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("not connected")]
    NotConnected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundOutcome {
    /// The sink voted commit and got Phase 2 commit.
    Committed,
    /// The sink voted abort; the worker rolled back (connection closed, offsets reset).
    Aborted,
}

struct Connection {
    frames: FramedRead<OwnedReadHalf, FrameCodec>,
    wr: OwnedWriteHalf,
}

pub struct SinkSim {
    cfg: SinkSimConfig,
    conn: Option<Connection>,
    out: BytesMut,
    stream_name: String,
    /// Current output offset (end of everything produced).
    offset: u64,
    /// End of the last committed round.
    committed: u64,
    checkpoint_id: u64,
    /// Last checkpoint id that completed cluster-wide.
    last_completed: u64,
    rtag: u64,
    /// Phase 1 sent and voted commit, Phase 2 not sent yet.
    open_round: Option<(Bytes, u64)>,
    /// Transactions the last intro resolved (for tests): (txn, decision).
    pub resolved: Vec<(String, bool)>,
    /// A 2PC-ready connection dropped: the worker aborts the next checkpoint (spec 3.5).
    abort_next: bool,
}

impl SinkSim {
    pub async fn connect(cfg: SinkSimConfig) -> Result<Self, SinkSimError> {
        let stream_name = format!("{}-w-{}-id-1", cfg.app_name, cfg.worker_name);
        let mut sim = Self {
            cfg,
            conn: None,
            out: BytesMut::new(),
            stream_name,
            offset: 0,
            committed: 0,
            checkpoint_id: 1,
            last_completed: 1,
            rtag: 77777,
            open_round: None,
            resolved: Vec::new(),
            abort_next: false,
        };
        sim.reconnect().await?;
        Ok(sim)
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn committed_offset(&self) -> u64 {
        self.committed
    }
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }
    fn txn_name(&self, id: u64) -> String {
        format!("{}:c_id={}", self.stream_name, id)
    }

    /// Opens a connection and runs the intro (spec 3.2), resolving a pending transaction like the worker:
    /// commit iff it is the checkpoint we rolled back to.
    pub async fn reconnect(&mut self) -> Result<(), SinkSimError> {
        self.conn = None;
        let stream = TcpStream::connect(self.cfg.addr)
            .await
            .map_err(|source| SinkSimError::Connect { addr: self.cfg.addr, source })?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        self.conn = Some(Connection { frames: FramedRead::new(rd, FrameCodec::default()), wr });
        // Output produced while disconnected was dropped but still counted (spec 3.3): the sink sees a gap.
        self.out.clear();
        // The worker reconnects at its *current* output offset (spec 3.5); only a rollback resets it to the last
        // checkpoint (see `rollback_round`). A sink must cope with both.
        self.open_round = None;
        self.rtag += 1;
        let mut buf = BytesMut::new();
        let hello = Frame::Hello(Hello {
            version: Bytes::from_static(SINK_VERSION.as_bytes()),
            cookie: Bytes::from(self.cfg.cookie.clone()),
            program_name: Bytes::from(self.cfg.app_name.clone()),
            instance_name: Bytes::from(self.cfg.worker_name.clone()),
        });
        let notify = Frame::Notify {
            stream_id: 1,
            stream_name: Bytes::from(self.stream_name.clone()),
            point_of_ref: self.offset,
        };
        for f in [hello, notify, TwoPc::ListUncommitted { rtag: self.rtag }.to_frame().map_err(CodecError::from)?] {
            f.encode(&mut buf).map_err(CodecError::from)?;
        }
        self.write(&buf).await?;
        match self.read().await? {
            Frame::Ok { initial_credits } if initial_credits >= 2 => {}
            Frame::Ok { initial_credits } => {
                return Err(SinkSimError::Violation(format!("HEY, too few credits: {initial_credits}")));
            }
            other => return Err(SinkSimError::Violation(format!("expected OK, got {}", other.name()))),
        }
        match self.read().await? {
            Frame::NotifyAck { success: true, stream_id: 1, .. } => {}
            other => return Err(SinkSimError::Violation(format!("expected NOTIFY_ACK(true, 1), got {other:?}"))),
        }
        let txns = match self.read_2pc().await? {
            TwoPc::ReplyUncommitted { txn_ids, .. } => txn_ids,
            other => return Err(SinkSimError::Violation(format!("expected ReplyUncommitted, got {}", other.name()))),
        };
        match txns.len() {
            0 => {}
            1 => {
                let txn = txns[0].clone();
                let commit = txn.as_ref() == self.txn_name(self.last_completed).as_bytes();
                self.resolved.push((String::from_utf8_lossy(&txn).into_owned(), commit));
                self.send_frame(TwoPc::Phase2 { txn_id: txn, commit }.to_frame().map_err(CodecError::from)?).await?;
            }
            n => {
                return Err(SinkSimError::Violation(format!(
                    "the worker requires at most one uncommitted txn, got {n}"
                )));
            }
        }
        Ok(())
    }

    /// Sends one output record at the current offset.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), SinkSimError> {
        if self.open_round.is_some() {
            return Err(SinkSimError::Violation("data while a 2PC round is open (the worker never does this)".into()));
        }
        encode_message(&mut self.out, 1, self.offset, None, payload).map_err(CodecError::from)?;
        self.offset += payload.len() as u64;
        if self.out.len() >= 256 * 1024 {
            self.flush().await?;
        }
        Ok(())
    }

    /// Fault: output produced while disconnected is dropped but still counted (spec 3.3): a gap.
    pub fn lose(&mut self, bytes: u64) {
        self.offset += bytes;
    }

    pub async fn flush(&mut self) -> Result<(), SinkSimError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let buf = self.out.split().freeze();
        self.write(&buf).await
    }

    /// Phase 1 of the next checkpoint; returns the sink's vote.
    pub async fn phase1(&mut self) -> Result<bool, SinkSimError> {
        self.flush().await?;
        self.expect_quiet()?;
        self.checkpoint_id += 1;
        let txn = Bytes::from(self.txn_name(self.checkpoint_id));
        let where_list = vec![WhereRange { stream_id: 1, start: self.committed, end: self.offset }];
        self.send_frame(TwoPc::Phase1 { txn_id: txn.clone(), where_list }.to_frame().map_err(CodecError::from)?)
            .await?;
        match self.read_2pc().await? {
            TwoPc::Reply { txn_id, commit } if txn_id == txn => {
                if commit {
                    self.open_round = Some((txn, self.offset));
                }
                Ok(commit)
            }
            other => Err(SinkSimError::Violation(format!("expected TwoPCReply for this round, got {other:?}"))),
        }
    }

    /// Phase 2 commit of the open round (the checkpoint completed cluster-wide).
    pub async fn phase2_commit(&mut self) -> Result<(), SinkSimError> {
        let (txn, end) = self.open_round.take().ok_or_else(|| SinkSimError::Violation("no open round".into()))?;
        // The checkpoint is complete cluster-wide whether or not this Phase 2 arrives; a lost one is resolved
        // through ListUncommitted on the next connection.
        self.committed = end;
        self.last_completed = self.checkpoint_id;
        self.send_frame(TwoPc::Phase2 { txn_id: txn, commit: true }.to_frame().map_err(CodecError::from)?).await
    }

    /// A whole checkpoint: Phase 1, then Phase 2 commit, or a rollback when the sink votes abort. After a dropped
    /// connection the worker aborts the checkpoint without a Phase 1 and rolls back (spec 3.5, 3.7).
    pub async fn checkpoint(&mut self) -> Result<RoundOutcome, SinkSimError> {
        if std::mem::take(&mut self.abort_next) {
            self.checkpoint_id += 1;
            self.rollback_round();
            return Ok(RoundOutcome::Aborted);
        }
        if self.phase1().await? {
            self.phase2_commit().await?;
            Ok(RoundOutcome::Committed)
        } else {
            self.rollback_round();
            Ok(RoundOutcome::Aborted)
        }
    }

    /// Fault: the open round's checkpoint completed cluster-wide, but the connection is lost before Phase 2.
    /// The next `reconnect` commits it through ListUncommitted.
    pub fn complete_without_phase2(&mut self) {
        if let Some((_, end)) = self.open_round.take() {
            self.committed = end;
            self.last_completed = self.checkpoint_id;
        }
        self.conn = None;
    }

    /// Fault: the round is aborted cluster-wide (another participant voted abort, or the sink did): the worker
    /// drops the connection and rolls back; the next `reconnect` aborts the pending transaction.
    pub fn rollback_round(&mut self) {
        self.open_round = None;
        self.offset = self.committed;
        self.conn = None;
        // Queued output is dropped by a rollback (spec 3.7 RollingBack), never sent on the next connection.
        self.out.clear();
    }

    /// Fault: drop the connection. The worker reconnects at its current offset and aborts the next checkpoint,
    /// which rolls everything back to the last commit (spec 3.5).
    pub fn disconnect(&mut self) {
        if self.conn.take().is_some() {
            self.abort_next = true;
        }
    }

    /// Fault: resend the last `bytes` of output at their original offsets (a duplicate the sink must skip).
    pub async fn resend_tail(&mut self, payload: &[u8]) -> Result<(), SinkSimError> {
        let at =
            self.offset.checked_sub(payload.len() as u64).ok_or(SinkSimError::Violation("nothing to resend".into()))?;
        encode_message(&mut self.out, 1, at, None, payload).map_err(CodecError::from)?;
        self.flush().await
    }

    /// Fault: a Phase 2 for a transaction the sink never saw (the sink must ignore it, without a reply).
    pub async fn phase2_unknown(&mut self, commit: bool) -> Result<(), SinkSimError> {
        let txn = Bytes::from(self.txn_name(self.checkpoint_id + 1000));
        self.send_frame(TwoPc::Phase2 { txn_id: txn, commit }.to_frame().map_err(CodecError::from)?).await
    }

    /// The connection broke under us: like a dropped 2PC-ready connection, it aborts the next checkpoint.
    fn lost(&mut self) {
        if self.conn.take().is_some() {
            self.abort_next = true;
        }
    }

    /// Nothing may be waiting from the sink outside a request/reply exchange: a stray frame (a second vote, a
    /// reply to Phase 2, an ERROR) is a violation the real worker would fail on.
    fn expect_quiet(&mut self) -> Result<(), SinkSimError> {
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        match conn.frames.next().now_or_never() {
            None => Ok(()),
            Some(None) => {
                self.lost();
                Err(SinkSimError::Closed)
            }
            Some(Some(Ok(f))) => {
                self.lost();
                Err(SinkSimError::Violation(format!("stray {} from the sink", f.name())))
            }
            Some(Some(Err(e))) => {
                self.lost();
                Err(e.into())
            }
        }
    }

    /// Sends WorkersLeft for the named workers (after an autoscale shrink).
    pub async fn workers_left(&mut self, workers: &[&str]) -> Result<(), SinkSimError> {
        let workers = workers.iter().map(|w| Bytes::from(w.to_string())).collect();
        self.send_frame(TwoPc::WorkersLeft { rtag: 7, workers }.to_frame().map_err(CodecError::from)?).await
    }

    async fn send_frame(&mut self, f: Frame) -> Result<(), SinkSimError> {
        self.flush().await?;
        let mut buf = BytesMut::new();
        f.encode(&mut buf).map_err(CodecError::from)?;
        self.write(&buf).await
    }

    async fn write(&mut self, buf: &[u8]) -> Result<(), SinkSimError> {
        let conn = self.conn.as_mut().ok_or(SinkSimError::NotConnected)?;
        if let Err(e) = conn.wr.write_all(buf).await {
            self.lost();
            return Err(e.into());
        }
        Ok(())
    }

    async fn read(&mut self) -> Result<Frame, SinkSimError> {
        let timeout = self.cfg.reply_timeout;
        let conn = self.conn.as_mut().ok_or(SinkSimError::NotConnected)?;
        let frame = match tokio::time::timeout(timeout, conn.frames.next()).await {
            Err(_) => return Err(SinkSimError::Timeout(timeout)),
            Ok(None) => {
                self.lost();
                return Err(SinkSimError::Closed);
            }
            Ok(Some(Err(e))) => {
                self.lost();
                return Err(e.into());
            }
            Ok(Some(Ok(f))) => f,
        };
        match frame {
            Frame::Error { message } => {
                self.lost();
                Err(SinkSimError::SinkError(String::from_utf8_lossy(&message).into_owned()))
            }
            Frame::Hello(_) | Frame::Notify { .. } | Frame::Ack { .. } | Frame::Restart { .. } => {
                self.lost();
                Err(SinkSimError::Violation(format!("the sink sent {} (fatal for a real worker)", frame.name())))
            }
            f => Ok(f),
        }
    }

    async fn read_2pc(&mut self) -> Result<TwoPc, SinkSimError> {
        match self.read().await? {
            Frame::Message(Message { stream_id: 0, payload, .. }) => {
                Ok(TwoPc::decode(payload).map_err(CodecError::from)?)
            }
            other => Err(SinkSimError::Violation(format!("expected a stream-0 MESSAGE, got {other:?}"))),
        }
    }
}
