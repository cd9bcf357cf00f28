//! The tokio driver of sink sessions: listens, runs one session per worker connection, performs the session's
//! actions against the integration with retries, keeps one live connection per worker name, drains on shutdown.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::sink_api::{SinkError, SinkIntegration, SinkRecord};
use super::{Health, Metrics};
use crate::protocol::sink::{SinkAction, SinkSession, SinkSessionConfig};
use crate::protocol::{Inbound, SinkDecoder};

#[derive(Debug, Clone)]
pub struct SinkDriverConfig {
    pub listen: String,
    pub session: SinkSessionConfig,
    pub max_frame: usize,
    /// How long shutdown waits for an open 2PC round to get its Phase 2.
    pub drain_timeout: Duration,
    /// Attempts for a transient failure of prepare/recover before giving up (vote abort / drop connection).
    pub attempts: u32,
    pub retry_initial: Duration,
    /// A new connection must send a valid HELLO within this time.
    pub handshake_timeout: Duration,
    /// Close a worker connection after this long without a frame (`None`: never; TCP keepalive finds dead peers).
    pub idle_timeout: Option<Duration>,
    /// Connections served at once, handshakes included; more are closed on accept.
    pub max_connections: usize,
    /// Warn when data flows this long with no checkpoint round (a non-resilient worker, spec 3.11).
    pub no_rounds_warning: Duration,
}

impl SinkDriverConfig {
    pub fn new(listen: impl Into<String>, session: SinkSessionConfig) -> Self {
        Self {
            listen: listen.into(),
            session,
            max_frame: crate::protocol::DEFAULT_MAX_FRAME,
            drain_timeout: Duration::from_secs(20),
            attempts: 5,
            retry_initial: Duration::from_millis(100),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_connections: 64,
            no_rounds_warning: Duration::from_secs(60),
        }
    }
}

/// Per worker name: a lock held by the connection that owns the name, and that connection's cancel token.
#[derive(Default)]
struct Owners(HashMap<Bytes, (Arc<Mutex<()>>, CancellationToken)>);

struct Shared {
    cfg: SinkDriverConfig,
    sink: Arc<dyn SinkIntegration>,
    metrics: Metrics,
    owners: std::sync::Mutex<Owners>,
}

impl Shared {
    /// Does a live connection own this worker name (holds its lock)?
    fn is_connected(&self, worker: &Bytes) -> bool {
        let owners = match self.owners.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        owners.0.get(worker).is_some_and(|(lock, _)| lock.try_lock().is_err())
    }
}

/// Binds the listener (port 0 picks one) and returns the address with the serving task.
pub async fn start(
    cfg: SinkDriverConfig,
    sink: Arc<dyn SinkIntegration>,
    health: Health,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(&cfg.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, guarantee = sink.guarantee().as_str(), "sink listening for workers");
    health.set_worker(true);
    let shared = Arc::new(Shared { cfg, sink, metrics, owners: std::sync::Mutex::new(Owners::default()) });
    let handle = tokio::spawn(serve(listener, shared, health, shutdown));
    Ok((addr, handle))
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, health: Health, shutdown: CancellationToken) {
    let mut conns = tokio::task::JoinSet::new();
    let permits = Arc::new(Semaphore::new(shared.cfg.max_connections.max(1)));
    let mut refused_logged = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        // Closing at once keeps file descriptors for the workers we do serve.
                        shared.metrics.error("connection_limit", "worker");
                        if !refused_logged {
                            tracing::warn!(%peer, max = shared.cfg.max_connections, "connection limit reached; closing new connections (spec.worker.maxConnections)");
                            refused_logged = true;
                        }
                        drop(stream);
                        continue;
                    };
                    refused_logged = false;
                    let _ = stream.set_nodelay(true);
                    set_keepalive(&stream);
                    tracing::info!(%peer, "worker connected");
                    conns.spawn(connection(stream, shared.clone(), shutdown.clone(), permit));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    health.set_stopping();
    drop(listener);
    tracing::info!(connections = conns.len(), "shutdown: no new workers; draining open rounds");
    while conns.join_next().await.is_some() {}
}

/// TCP keepalive finds a worker that vanished without a FIN (node lost, network cut) within about a minute.
pub(crate) fn set_keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot enable TCP keepalive");
    }
}

async fn connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let me = CancellationToken::new();
    let (rd, mut wr) = stream.into_split();
    let mut frames = FramedRead::with_capacity(rd, SinkDecoder::new(shared.cfg.max_frame), 64 * 1024);
    let handshake_deadline = Instant::now() + shared.cfg.handshake_timeout;
    let mut conn = Conn {
        session: SinkSession::new(shared.cfg.session.clone()),
        shared: shared.clone(),
        worker: String::new(),
        batch: Vec::new(),
        owner_guard: None,
        me: me.clone(),
        data_without_rounds: None,
        saw_phase1: false,
    };
    let mut drain_until: Option<Instant> = None;
    let reason = 'conn: loop {
        if shutdown.is_cancelled() {
            if !conn.session.round_open() {
                break "shutdown".to_string();
            }
            let deadline = *drain_until.get_or_insert_with(|| Instant::now() + shared.cfg.drain_timeout);
            if Instant::now() >= deadline {
                break "shutdown drain timeout with a round open (the worker resolves it on reconnect)".to_string();
            }
        }
        let far = Instant::now() + Duration::from_secs(3600);
        let (read_deadline, what) = if conn.worker.is_empty() {
            (handshake_deadline, "no valid HELLO within the handshake timeout (spec.worker.handshakeTimeoutSeconds)")
        } else if let Some(idle) = shared.cfg.idle_timeout {
            (Instant::now() + idle, "no frame within the idle timeout (spec.worker.idleTimeoutSeconds)")
        } else {
            (far, "")
        };
        let first = tokio::select! {
            f = frames.next() => f,
            _ = tokio::time::sleep_until(read_deadline) => {
                shared.metrics.error("timeout", "worker");
                break what.to_string();
            }
            _ = me.cancelled() => break "another connection took over this worker".to_string(),
            _ = shutdown.cancelled(), if !shutdown.is_cancelled() => continue,
            _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => continue,
        };
        let mut next = first;
        // Take every frame already buffered so staged data goes to the integration in large batches.
        let mut budget = 4096;
        loop {
            match next {
                None => break 'conn "worker closed the connection".to_string(),
                Some(Err(e)) => {
                    shared.metrics.error("decode", "worker");
                    break 'conn format!("bad frame from the worker: {e}");
                }
                Some(Ok(Inbound::Frame(f))) => conn.session.on_frame(f),
                Some(Ok(Inbound::Oversize { stream_id, message_id, frame_len, limit })) => {
                    shared.metrics.error("record_too_large", "worker");
                    tracing::error!(worker = %conn.worker, stream_id, message_id, frame_len, limit, "record over the frame limit skipped unread; the round will vote abort (raise spec.worker.maxFrameBytes)");
                    conn.session.oversize(stream_id, message_id, frame_len, limit);
                }
            }
            if !conn.worker.is_empty() && frames.decoder().limit() < shared.cfg.max_frame {
                frames.decoder_mut().authenticated();
            }
            if let Some(reason) = conn.run_actions().await {
                break 'conn reason;
            }
            budget -= 1;
            if budget == 0 || conn.batch.len() >= 8192 {
                break;
            }
            match frames.next().now_or_never() {
                Some(f) => next = f,
                None => break,
            }
        }
        if let Some(reason) = conn.flush().await {
            break reason;
        }
        if conn.session.has_output() {
            let out = conn.session.take_output();
            // A worker that stops reading must not hold shutdown hostage: the write gives up at the drain deadline.
            let write = tokio::select! {
                r = wr.write_all(&out) => r.map_err(|e| format!("write failed: {e}")),
                _ = shutdown_deadline(&shutdown, shared.cfg.drain_timeout) => {
                    Err("shutdown drain timeout while the worker was not reading".to_string())
                }
            };
            if let Err(reason) = write {
                break reason;
            }
        }
    };
    // Best effort, bounded: replies queued before a close (e.g. an ERROR) still go out.
    if conn.session.has_output() {
        let out = conn.session.take_output();
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    if !conn.worker.is_empty() {
        shared.metrics.worker_connected.dec();
    }
    tracing::info!(worker = %conn.worker, %reason, "worker connection closed");
}

struct Conn {
    session: SinkSession,
    shared: Arc<Shared>,
    worker: String,
    batch: Vec<SinkRecord>,
    owner_guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    me: CancellationToken,
    /// When data first arrived on this connection while no Phase 1 was ever seen on it; `None` once one was.
    data_without_rounds: Option<std::time::Instant>,
    saw_phase1: bool,
}

impl Conn {
    /// Performs queued actions; returns a reason when the connection must close.
    async fn run_actions(&mut self) -> Option<String> {
        while let Some(action) = self.session.poll_action() {
            if let SinkAction::Stage { offset, payload } = action {
                self.warn_if_no_rounds();
                self.shared.metrics.messages_total.inc();
                self.shared.metrics.bytes_total.inc_by(payload.len() as u64);
                self.batch.push(SinkRecord { offset, payload });
                continue;
            }
            if let Some(reason) = self.flush().await {
                return Some(reason);
            }
            match action {
                SinkAction::Stage { .. } => {}
                SinkAction::Recover { worker } => {
                    self.claim(worker).await;
                    match self.retry("recover", |s, w| Box::pin(async move { s.recover(&w).await })).await {
                        Ok(r) => {
                            tracing::info!(worker = %self.worker, committed = ?r.committed, pending = ?r.pending.as_ref().map(|t| t.id_str()), "worker state recovered");
                            self.session.recovered(r);
                        }
                        Err(e) => return Some(format!("cannot recover worker state: {e}")),
                    }
                }
                SinkAction::Prepare { txn } => {
                    self.saw_phase1 = true;
                    let started = std::time::Instant::now();
                    let t = txn.clone();
                    let vote = self
                        .retry("prepare", move |s, w| {
                            let t = t.clone();
                            Box::pin(async move { s.prepare(&w, &t).await })
                        })
                        .await;
                    self.shared.metrics.observe("prepare", started);
                    match vote {
                        Ok(()) => {
                            self.shared.metrics.twopc_rounds_total.with_label_values(&["commit_vote"]).inc();
                            self.session.prepared(Ok(()));
                        }
                        Err(e) => {
                            self.shared.metrics.twopc_rounds_total.with_label_values(&["abort_vote"]).inc();
                            self.shared.metrics.error(e.kind(), "prepare");
                            tracing::warn!(worker = %self.worker, txn = %txn.id_str(), error = %e, "prepare failed; voting abort");
                            self.session.prepared(Err(e.to_string()));
                        }
                    }
                }
                SinkAction::Commit { txn } => {
                    let started = std::time::Instant::now();
                    let t = txn.clone();
                    let r = self
                        .retry("commit", move |s, w| {
                            let t = t.clone();
                            Box::pin(async move { s.commit(&w, &t).await })
                        })
                        .await;
                    self.shared.metrics.observe("commit", started);
                    match r {
                        Ok(()) => {
                            self.shared.metrics.twopc_rounds_total.with_label_values(&["committed"]).inc();
                            tracing::debug!(worker = %self.worker, txn = %txn.id_str(), end = txn.end, "committed");
                        }
                        // The transaction stays pending in the integration's log; the worker's reconnect asks again.
                        Err(e) => return Some(format!("commit of {} failed: {e}", txn.id_str())),
                    }
                }
                SinkAction::Abort { txn, reason } => {
                    self.shared.metrics.twopc_rounds_total.with_label_values(&["aborted"]).inc();
                    tracing::info!(worker = %self.worker, txn = %txn.id_str(), %reason, "aborting");
                    let t = txn.clone();
                    if let Err(e) = self
                        .retry("abort", move |s, w| {
                            let t = t.clone();
                            Box::pin(async move { s.abort(&w, &t).await })
                        })
                        .await
                    {
                        return Some(format!("abort of {} failed: {e}", txn.id_str()));
                    }
                }
                SinkAction::Forget { workers } => {
                    for w in workers {
                        if self.shared.is_connected(&w) {
                            // A worker that is connected right now has not left; forgetting it would wipe the round
                            // it voted on, and its Phase 2 would then publish nothing.
                            self.shared.metrics.error("workers_left_connected", "worker");
                            tracing::warn!(worker = %String::from_utf8_lossy(&w), "WorkersLeft names a connected worker; ignored for it");
                            continue;
                        }
                        let w = String::from_utf8_lossy(&w).into_owned();
                        tracing::info!(worker = %w, "worker left the cluster; forgetting its state");
                        if let Err(e) = self.shared.sink.forget(&w).await {
                            self.shared.metrics.error(e.kind(), "forget");
                            tracing::warn!(worker = %w, error = %e, "forget failed");
                        }
                    }
                }
                SinkAction::Close { reason } => return Some(reason),
            }
        }
        None
    }

    /// An exactly-once sink publishes only at Phase 2; a non-resilient worker never runs a round, so its output
    /// would stay staged forever. Say so once per connection instead of failing silently.
    fn warn_if_no_rounds(&mut self) {
        if self.saw_phase1 || self.shared.sink.guarantee() != super::sink_api::Guarantee::ExactlyOnce {
            return;
        }
        let first = *self.data_without_rounds.get_or_insert_with(std::time::Instant::now);
        let after = self.shared.cfg.no_rounds_warning;
        if first.elapsed() >= after {
            self.saw_phase1 = true;
            self.shared.metrics.error("no_checkpoints", "worker");
            tracing::warn!(worker = %self.worker, seconds = after.as_secs(), "data is arriving but the worker has run no checkpoint round: an exactly-once sink publishes nothing until one commits (is the worker built without resilience? spec 3.11)");
        }
    }

    /// Hands the batched records to the integration; a failure poisons the open round.
    async fn flush(&mut self) -> Option<String> {
        if self.batch.is_empty() {
            return None;
        }
        let records = std::mem::take(&mut self.batch);
        let started = std::time::Instant::now();
        if let Err(e) = self.shared.sink.stage(&self.worker, records).await {
            self.shared.metrics.error(e.kind(), "stage");
            tracing::warn!(worker = %self.worker, error = %e, "staging failed; this round will vote abort");
            self.session.poison(format!("staging failed: {e}"));
        }
        self.shared.metrics.observe("stage", started);
        None
    }

    /// Becomes the one connection for this worker name, displacing an older one.
    async fn claim(&mut self, worker: Bytes) {
        self.worker = String::from_utf8_lossy(&worker).into_owned();
        let lock = {
            let mut owners = match self.shared.owners.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let entry = owners.0.entry(worker).or_insert_with(|| (Arc::new(Mutex::new(())), CancellationToken::new()));
            entry.1.cancel();
            entry.1 = self.me.clone();
            entry.0.clone()
        };
        self.owner_guard = Some(lock.lock_owned().await);
        self.shared.metrics.worker_connected.inc();
    }

    async fn retry<T>(
        &self,
        what: &'static str,
        op: impl Fn(Arc<dyn SinkIntegration>, String) -> futures::future::BoxFuture<'static, Result<T, SinkError>>,
    ) -> Result<T, SinkError> {
        let mut delay = self.shared.cfg.retry_initial;
        let mut attempt = 1;
        loop {
            match op(self.shared.sink.clone(), self.worker.clone()).await {
                Ok(v) => {
                    self.shared.metrics.external_connected.set(1);
                    return Ok(v);
                }
                Err(e @ SinkError::Permanent(_)) => return Err(e),
                Err(e) if attempt >= self.shared.cfg.attempts => return Err(e),
                Err(e) => {
                    self.shared.metrics.error("transient", what);
                    tracing::info!(worker = %self.worker, what, attempt, error = %e, "retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
            }
        }
    }
}

/// Resolves `drain` after shutdown fired; never before.
async fn shutdown_deadline(shutdown: &CancellationToken, drain: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(drain).await;
}
