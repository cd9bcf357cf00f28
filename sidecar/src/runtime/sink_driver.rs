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
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::sink_api::{SinkError, SinkIntegration, SinkRecord};
use super::{Health, Metrics};
use crate::protocol::FrameCodec;
use crate::protocol::sink::{SinkAction, SinkSession, SinkSessionConfig};

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
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tracing::info!(%peer, "worker connected");
                    conns.spawn(connection(stream, shared.clone(), shutdown.clone()));
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

async fn connection(stream: TcpStream, shared: Arc<Shared>, shutdown: CancellationToken) {
    let me = CancellationToken::new();
    let (rd, mut wr) = stream.into_split();
    let mut frames = FramedRead::with_capacity(rd, FrameCodec::new(shared.cfg.max_frame), 256 * 1024);
    let mut conn = Conn {
        session: SinkSession::new(shared.cfg.session.clone()),
        shared: shared.clone(),
        worker: String::new(),
        batch: Vec::new(),
        owner_guard: None,
        me: me.clone(),
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
        let first = tokio::select! {
            f = frames.next() => f,
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
                Some(Ok(f)) => conn.session.on_frame(f),
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
            if let Err(e) = wr.write_all(&out).await {
                break format!("write failed: {e}");
            }
        }
    };
    // Best effort: replies queued before a close (e.g. an ERROR) still go out.
    if conn.session.has_output() {
        let out = conn.session.take_output();
        let _ = wr.write_all(&out).await;
    }
    let _ = wr.shutdown().await;
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
}

impl Conn {
    /// Performs queued actions; returns a reason when the connection must close.
    async fn run_actions(&mut self) -> Option<String> {
        while let Some(action) = self.session.poll_action() {
            if let SinkAction::Stage { offset, payload } = action {
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
