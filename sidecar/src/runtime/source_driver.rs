//! The tokio driver of a source session: connects to the worker, pumps records from the integration while
//! credits allow, relays acknowledgements, reconnects with capped exponential backoff, drains on shutdown.
use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::source_api::{
    COMMAND_CAPACITY, Command, EMIT_CAPACITY, Emit, Record, SourceContext, SourceError, SourceIntegration,
};
use super::{Health, Metrics};
use crate::protocol::FrameCodec;
use crate::protocol::source::{SendError, Sent, SourceEvent, SourceSession, SourceSessionConfig};

#[derive(Debug, Clone)]
pub struct SourceDriverConfig {
    /// `host:port` of the worker's source connector listener.
    pub worker_addr: String,
    pub session: SourceSessionConfig,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long shutdown waits for the worker to acknowledge what was sent.
    pub drain_timeout: Duration,
    pub max_frame: usize,
    pub instance: String,
}

impl SourceDriverConfig {
    pub fn new(worker_addr: impl Into<String>, session: SourceSessionConfig) -> Self {
        let instance = session.instance_name.clone();
        Self {
            worker_addr: worker_addr.into(),
            session,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
            max_frame: crate::protocol::DEFAULT_MAX_FRAME,
            instance,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("source integration failed: {0}")]
    Integration(#[from] SourceError),
    #[error("source integration task panicked or was cancelled: {0}")]
    Join(String),
    #[error("source integration stopped without ending its streams")]
    Abandoned,
}

/// How the driver ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceOutcome {
    /// Every stream ended and the worker confirmed each EOS.
    Completed,
    /// Shutdown was requested; `unacked` streams still had unacknowledged data when the drain ended.
    Stopped { unacked: usize },
}

/// A batch being fed to the session, possibly across several credit refills.
struct Pending {
    stream: u64,
    generation: u64,
    records: Vec<Record>,
    next: usize,
}

/// Output is written in chunks of about this size: large enough to amortize syscalls.
const WRITE_CHUNK: usize = 256 * 1024;

pub struct SourceDriver {
    cfg: SourceDriverConfig,
    session: SourceSession,
    metrics: Metrics,
    health: Health,
    names: HashMap<u64, String>,
    pending: Option<Pending>,
    emit_rx: mpsc::Receiver<Emit>,
    emit_open: bool,
    cmd_tx: mpsc::Sender<Command>,
    task: Option<JoinHandle<Result<(), SourceError>>>,
    drain_until: Option<Instant>,
}

enum ConnEnd {
    /// Reconnect after backoff.
    Lost(String),
    /// Reconnect now, maybe elsewhere.
    Restart(Option<String>),
    Done(SourceOutcome),
}

impl SourceDriver {
    /// Spawns the integration and prepares the session.
    pub fn start(
        cfg: SourceDriverConfig,
        integration: Box<dyn SourceIntegration>,
        health: Health,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        let (emit_tx, emit_rx) = mpsc::channel(EMIT_CAPACITY);
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAPACITY);
        let ctx = SourceContext {
            emit: emit_tx,
            commands: cmd_rx,
            health: health.clone(),
            metrics: metrics.clone(),
            shutdown,
            instance: cfg.instance.clone(),
        };
        let task = tokio::spawn(integration.run(ctx));
        Self {
            session: SourceSession::new(cfg.session.clone()),
            cfg,
            metrics,
            health,
            names: HashMap::new(),
            pending: None,
            emit_rx,
            emit_open: true,
            cmd_tx,
            task: Some(task),
            drain_until: None,
        }
    }

    /// Runs until completion or until `shutdown` fired and the drain ended.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<SourceOutcome, DriverError> {
        let mut addr = self.cfg.worker_addr.clone();
        let mut backoff = self.cfg.backoff_initial;
        let mut first = true;
        let result = loop {
            if !first {
                self.metrics.reconnects_total.with_label_values(&["worker"]).inc();
            }
            first = false;
            if let Some(e) = self.integration_failed().await {
                break Err(e);
            }
            // Disconnected during shutdown with nothing waiting for an ack: records still unsent were never acked,
            // so upstream replays them next time; nothing is lost by leaving now.
            if shutdown.is_cancelled() && self.session.unacked_streams() == 0 {
                break Ok(SourceOutcome::Stopped { unacked: 0 });
            }
            let stream = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)) => r,
                _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {
                    break Ok(SourceOutcome::Stopped { unacked: self.session.unacked_streams() });
                }
            };
            let stream = match stream {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%addr, error = %e, delay_ms = backoff.as_millis() as u64, "worker not reachable; retrying");
                    self.metrics.error("connect", "worker");
                    self.revert_restart_address(&mut addr);
                    if self.sleep_or_stop(&mut backoff, &shutdown).await {
                        break Ok(SourceOutcome::Stopped { unacked: self.session.unacked_streams() });
                    }
                    continue;
                }
                Err(_) => {
                    tracing::info!(%addr, "connecting to the worker timed out; retrying");
                    self.metrics.error("connect_timeout", "worker");
                    self.revert_restart_address(&mut addr);
                    if self.sleep_or_stop(&mut backoff, &shutdown).await {
                        break Ok(SourceOutcome::Stopped { unacked: self.session.unacked_streams() });
                    }
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            super::sink_driver::set_keepalive(&stream);
            tracing::info!(%addr, "connected to the worker");
            match self.connection(stream, &shutdown, &mut backoff).await {
                Ok(ConnEnd::Done(outcome)) => break Ok(outcome),
                Ok(ConnEnd::Restart(new_addr)) => {
                    if let Some(a) = new_addr.filter(|a| valid_restart_address(a)) {
                        tracing::info!(from = %addr, to = %a, "worker sent RESTART");
                        addr = a;
                    } else {
                        tracing::info!(%addr, "worker sent RESTART");
                    }
                    backoff = self.cfg.backoff_initial;
                    // The worker closes right after RESTART; give it a moment before we knock again.
                    tokio::time::sleep(self.cfg.backoff_initial).await;
                }
                Ok(ConnEnd::Lost(reason)) => {
                    tracing::warn!(%addr, %reason, delay_ms = backoff.as_millis() as u64, "worker connection lost; reconnecting");
                    if self.sleep_or_stop(&mut backoff, &shutdown).await {
                        break Ok(SourceOutcome::Stopped { unacked: self.session.unacked_streams() });
                    }
                }
                Err(e) => break Err(e),
            }
        };
        self.health.set_worker(false);
        self.metrics.worker_connected.set(0);
        // Let the integration finish (it saw shutdown, or the stream completed) and surface its error.
        drop(self.cmd_tx);
        drop(self.emit_rx);
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(10), task).await {
                // We hung up first (shutdown or completion): the integration noticing that is not a failure.
                Ok(Ok(Err(SourceError::RuntimeGone))) => {}
                Ok(Ok(Err(e))) => return Err(DriverError::Integration(e)),
                Ok(Err(e)) => return Err(DriverError::Join(e.to_string())),
                _ => {}
            }
        }
        result
    }

    /// A RESTART address that cannot be reached is not our home: go back to the configured worker, which can
    /// redirect us again. Without this a bad RESTART would cut the source off for good.
    fn revert_restart_address(&self, addr: &mut String) {
        if *addr != self.cfg.worker_addr {
            tracing::warn!(restart_address = %addr, configured = %self.cfg.worker_addr, "RESTART address unreachable; returning to the configured worker");
            self.metrics.error("restart_address", "worker");
            *addr = self.cfg.worker_addr.clone();
        }
    }

    /// Returns the integration's error once its task ended with one (the sidecar then exits non-zero instead
    /// of idling with a dead stream).
    async fn integration_failed(&mut self) -> Option<DriverError> {
        if !self.task.as_ref().is_some_and(|t| t.is_finished()) {
            return None;
        }
        match self.task.take()?.await {
            Ok(Ok(())) | Ok(Err(SourceError::RuntimeGone)) => None,
            Ok(Err(e)) => Some(DriverError::Integration(e)),
            Err(e) => Some(DriverError::Join(e.to_string())),
        }
    }

    /// Sleeps for the current backoff (doubling it, capped, with jitter); true if shutdown ended the wait.
    async fn sleep_or_stop(&mut self, backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
        let jitter = rand::random::<f64>() * 0.2 + 0.9;
        let d = backoff.mul_f64(jitter);
        *backoff = (*backoff * 2).min(self.cfg.backoff_max);
        if shutdown.is_cancelled() {
            // During shutdown we only try to finish the drain, within its deadline.
            return match self.drain_deadline(shutdown) {
                Some(deadline) if Instant::now() + d < deadline => {
                    tokio::time::sleep(d).await;
                    false
                }
                _ => true,
            };
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = shutdown.cancelled() => false,
        }
    }

    /// The drain deadline, fixed the first time it is asked for after shutdown fired.
    fn drain_deadline(&mut self, shutdown: &CancellationToken) -> Option<Instant> {
        if !shutdown.is_cancelled() {
            return None;
        }
        let timeout = self.cfg.drain_timeout;
        Some(*self.drain_until.get_or_insert_with(|| Instant::now() + timeout))
    }

    async fn connection(
        &mut self,
        stream: TcpStream,
        shutdown: &CancellationToken,
        backoff: &mut Duration,
    ) -> Result<ConnEnd, DriverError> {
        let (rd, mut wr) = stream.into_split();
        let mut frames = FramedRead::with_capacity(rd, FrameCodec::new(self.cfg.max_frame), 64 * 1024);
        self.session.connected();
        let mut drain_deadline: Option<Instant> = None;
        let end = loop {
            // Act on what the session decided.
            while let Some(ev) = self.session.poll_event() {
                match ev {
                    SourceEvent::Start { stream_id, from, generation } => {
                        tracing::info!(stream = %self.name(stream_id), ?from, generation, "stream granted");
                        self.command(Command::Start { stream: stream_id, from, generation }).await?;
                    }
                    SourceEvent::Refused { stream_id } => {
                        tracing::info!(stream = %self.name(stream_id), "stream refused by the worker; retrying on next ACK");
                        self.metrics.error("notify_refused", "worker");
                    }
                    SourceEvent::Durable { stream_id, through } => {
                        self.metrics.acked(&self.name(stream_id), through);
                        self.command(Command::Durable { stream: stream_id, through }).await?;
                    }
                    SourceEvent::Finished { stream_id } => {
                        tracing::info!(stream = %self.name(stream_id), "end of stream confirmed");
                        self.command(Command::Finished { stream: stream_id }).await?;
                    }
                    SourceEvent::Restart { address } => {
                        self.session.disconnected();
                        self.health.set_worker(false);
                        self.metrics.worker_connected.set(0);
                        return Ok(ConnEnd::Restart(address));
                    }
                    SourceEvent::Close { reason } => {
                        self.metrics.error("protocol", "worker");
                        return Ok(self.lost(reason));
                    }
                }
            }
            if self.session.is_streaming() {
                if !self.health.worker() {
                    self.health.set_worker(true);
                    self.metrics.worker_connected.set(1);
                    *backoff = self.cfg.backoff_initial;
                }
                self.pump(shutdown.is_cancelled())?;
            }
            self.metrics.credits_available.set(i64::from(self.session.credits()));
            if self.session.has_output() {
                let out = self.session.take_output();
                // A worker that stops reading must not hold shutdown hostage past the drain deadline.
                let drain_end = self.drain_until;
                let write = tokio::select! {
                    r = wr.write_all(&out) => r.map_err(|e| format!("write failed: {e}")),
                    _ = async {
                        shutdown.cancelled().await;
                        match drain_end {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => tokio::time::sleep(self.cfg.drain_timeout).await,
                        }
                    } => Err("shutdown drain timeout while the worker was not reading".to_string()),
                };
                if let Err(reason) = write {
                    if shutdown.is_cancelled() {
                        let unacked = self.session.unacked_streams();
                        tracing::warn!(unacked, %reason, "stopping with unacknowledged data (it will be replayed)");
                        break ConnEnd::Done(SourceOutcome::Stopped { unacked });
                    }
                    break self.lost(reason);
                }
                // More may be ready right away (a batch larger than one chunk); go around before waiting.
                if self.session.can_send()
                    && (self.pending.is_some() || (!self.emit_rx.is_empty() && !shutdown.is_cancelled()))
                {
                    continue;
                }
            }
            // Finished, or the shutdown drain is over?
            if !self.emit_open && self.pending.is_none() && self.session.all_finished() {
                break ConnEnd::Done(SourceOutcome::Completed);
            }
            // Shutdown: the batch in hand goes out, nothing more is taken from the integration (records it read
            // were never acknowledged, so upstream replays them), and we leave once what was sent is acknowledged.
            if shutdown.is_cancelled() && self.pending.is_none() && self.session.unacked_streams() == 0 {
                break ConnEnd::Done(SourceOutcome::Stopped { unacked: 0 });
            }
            if shutdown.is_cancelled() && drain_deadline.is_none() {
                self.health.set_stopping();
                drain_deadline = self.drain_deadline(shutdown);
                tracing::info!("shutdown: intake stopped, draining");
            }
            if !self.emit_open
                && let Some(e) = self.integration_failed().await
            {
                let _ = wr.shutdown().await;
                return Err(e);
            }
            let can_take =
                self.session.is_streaming() && self.pending.is_none() && self.emit_open && !shutdown.is_cancelled();
            let deadline = drain_deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                frame = frames.next() => match frame {
                    Some(Ok(f)) => self.session.on_frame(f),
                    Some(Err(e)) => {
                        self.metrics.error("decode", "worker");
                        break self.lost(format!("bad frame from the worker: {e}"));
                    }
                    None => break self.lost("worker closed the connection".into()),
                },
                emit = self.emit_rx.recv(), if can_take => self.on_emit(emit),
                _ = shutdown.cancelled(), if drain_deadline.is_none() => {}
                _ = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => {
                    let unacked = self.session.unacked_streams();
                    tracing::warn!(unacked, "drain timeout: exiting with unacknowledged data (it will be replayed)");
                    break ConnEnd::Done(SourceOutcome::Stopped { unacked });
                }
            }
        };
        let _ = wr.shutdown().await;
        Ok(end)
    }

    fn lost(&mut self, reason: String) -> ConnEnd {
        self.session.disconnected();
        self.health.set_worker(false);
        self.metrics.worker_connected.set(0);
        ConnEnd::Lost(reason)
    }

    fn name(&self, id: u64) -> String {
        self.names.get(&id).cloned().unwrap_or_else(|| format!("{id:#x}"))
    }

    async fn command(&mut self, cmd: Command) -> Result<(), DriverError> {
        // A closed command channel means the integration returned; its result is collected at the end.
        let _ = self.cmd_tx.send(cmd).await;
        Ok(())
    }

    fn on_emit(&mut self, emit: Option<Emit>) {
        match emit {
            None => self.emit_open = false,
            Some(Emit::Stream { name }) => {
                let id = self.session.announce(name.as_bytes());
                tracing::info!(stream = %name, stream_id = format_args!("{id:#018x}"), "stream announced");
                self.names.insert(id, name);
            }
            Some(Emit::Records { stream, generation, records }) => {
                self.pending = Some(Pending { stream, generation, records, next: 0 });
            }
            Some(Emit::End { stream, generation }) => self.session.end_stream(stream, generation),
        }
    }

    /// Feeds pending records (and further ready batches) to the session while credits last.
    fn pump(&mut self, stopping: bool) -> Result<(), DriverError> {
        let mut sent = 0u64;
        let mut bytes = 0u64;
        while self.session.output_len() < WRITE_CHUNK {
            let Some(p) = self.pending.as_mut() else {
                if !self.session.can_send() || !self.emit_open || stopping {
                    break;
                }
                match self.emit_rx.try_recv() {
                    Ok(e) => {
                        self.on_emit(Some(e));
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.emit_open = false;
                        break;
                    }
                }
            };
            if self.session.stream_generation(p.stream) != Some(p.generation) {
                // Read before the latest rewind of this stream: the replay brings these again.
                self.pending = None;
                continue;
            }
            let mut drop_rest = false;
            while p.next < p.records.len() && self.session.output_len() < WRITE_CHUNK {
                let r = &p.records[p.next];
                match self.session.send_message(p.stream, p.generation, r.por, r.key.as_deref(), &r.payload) {
                    Ok(Sent::Sent) => {
                        sent += 1;
                        bytes += r.payload.len() as u64;
                    }
                    Ok(Sent::Skipped) => {}
                    // Out of credits: the next refill continues from here.
                    Err(SendError::NotReady) => break,
                    Err(e @ SendError::NotIncreasing { .. }) => {
                        tracing::warn!(error = %e, "integration produced a non-increasing point of reference");
                        self.metrics.error("non_increasing_por", "source");
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "dropping the rest of a batch");
                        drop_rest = true;
                        break;
                    }
                }
                p.next += 1;
            }
            if drop_rest || p.next >= p.records.len() {
                self.pending = None;
            } else {
                break;
            }
        }
        if sent > 0 {
            self.metrics.messages_total.inc_by(sent);
            self.metrics.bytes_total.inc_by(bytes);
        }
        Ok(())
    }
}

/// `host:port` with a numeric port: anything else cannot be connected to, so the RESTART is taken as "same address".
fn valid_restart_address(a: &str) -> bool {
    a.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0))
}
