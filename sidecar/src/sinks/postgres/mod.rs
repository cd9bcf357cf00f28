//! `sink.postgres`: each worker's output as rows of a table, exactly once.
//!
//! Two ways to hold a checkpoint's rows between Phase 1 and Phase 2 (`twoPhase`, default `auto`):
//! - **prepared** ([`prepared`]): every worker has its own connection with a transaction open for the round;
//!   rows are COPYed straight into the table, Phase 1 adds the offsets update and runs
//!   `PREPARE TRANSACTION 'wallaroo:<worker>:<txn>:...'`, Phase 2 is `COMMIT PREPARED` / `ROLLBACK PREPARED`.
//!   pg_prepared_xacts is the durable record of pending transactions. Needs `max_prepared_transactions > 0`.
//! - **staging** ([`staging`]): payloads are written to `wallaroo_sink_staging` as the round goes; Phase 1
//!   test-loads them into the table (rolled back), logs the txn as prepared and commits; Phase 2 moves them into
//!   the table, marks the txn committed and advances the offset in one transaction.
//!
//! Either way the published rows and `wallaroo_sink_offsets.committed_end` change in one transaction, so a
//! recovered worker resumes exactly after what the table holds.
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Mutex, OnceCell, OwnedSemaphorePermit, RwLock, Semaphore};
use tokio_postgres::Client;
use wallaroo_crds::{
    DEFAULT_POSTGRES_IDLE_TIMEOUT_SECONDS, DEFAULT_POSTGRES_MAX_CONNECTIONS, PayloadMapping,
    PostgresSink as PostgresSinkConfig, PostgresTwoPhase,
};

use crate::runtime::sink_api::{Guarantee, Recovery, SinkError, SinkIntegration, SinkRecord, Txn};
use crate::runtime::{Health, Metrics};

pub mod conn;
pub mod gid;
mod prepared;
pub mod rows;
pub mod schema;
mod staging;

use conn::{Control, classify};
use rows::{ColumnTypes, CopyBatch, Encoder, Layout};

/// Staged payload bytes buffered per worker before they are written as one staging row.
const CHUNK_BYTES: usize = 4 << 20;
/// How long a worker waits for a connection slot when every slot holds an open round.
const SLOT_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Prepared,
    Staging,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Prepared => "prepared",
            Mode::Staging => "staging",
        }
    }
}

/// Per-worker state. Calls for one worker are never concurrent, so one async mutex per worker is uncontended.
#[derive(Default)]
struct Worker {
    /// The worker's own connection (a prepared-mode round is a transaction on it).
    client: Option<Client>,
    /// Offset the next staged record must have.
    next: u64,
    /// Prepared mode: a transaction is open on `client`, holding the rows from `round_start` to `next`.
    in_tx: bool,
    /// Prepared mode: nothing failed in the open transaction.
    tx_ok: bool,
    round_start: u64,
    /// Prepared mode: the COPY streaming this round's rows.
    copy: Option<prepared::OpenCopy>,
    /// Staging mode: framed payloads not yet written, starting at offset `chunk_start`.
    chunk: Vec<u8>,
    chunk_start: u64,
    chunk_rows: i32,
    /// One of the sink's `maxConnections` slots, held while `client` is.
    permit: Option<OwnedSemaphorePermit>,
    /// Last time the worker's connection was asked for (for idle release and eviction).
    last_used: Option<Instant>,
}

impl Worker {
    /// Its connection can be closed without losing anything: no round is open on it.
    fn releasable(&self) -> bool {
        !self.in_tx && self.copy.is_none() && (self.client.is_some() || self.permit.is_some())
    }

    fn release(&mut self) {
        self.copy = None;
        self.client = None;
        self.permit = None;
    }
}

type Workers = std::sync::Mutex<HashMap<String, Arc<Mutex<Worker>>>>;

/// Closes the connections of workers idle for `idle` (not locked by a call, no open round).
fn release_idle(workers: &Workers, idle: Duration) -> usize {
    let map = workers.lock().unwrap_or_else(|p| p.into_inner());
    let mut released = 0;
    for w in map.values() {
        if let Ok(mut w) = w.try_lock()
            && w.releasable()
            && w.last_used.is_none_or(|t| t.elapsed() >= idle)
        {
            w.release();
            released += 1;
        }
    }
    released
}

pub struct PostgresSink {
    table: String,
    layout: Layout,
    mapping: PayloadMapping,
    batch_rows: usize,
    requested: PostgresTwoPhase,
    tag: String,
    control: Control,
    mode: OnceCell<Mode>,
    types: RwLock<Option<Arc<ColumnTypes>>>,
    workers: Arc<Workers>,
    /// Bounds the per-worker connections (`maxConnections`).
    slots: Arc<Semaphore>,
    max_connections: usize,
}

/// `url` inline or from a secret.
pub fn resolve_url(
    url: &Option<String>,
    url_from: &Option<wallaroo_crds::SecretValue>,
    field: &str,
) -> Result<String, String> {
    match (url_from, url) {
        (Some(s), _) => s.resolve(&format!("{field}From")).map_err(|e| e.to_string()),
        (None, Some(u)) => Ok(u.clone()),
        (None, None) => Err(format!("{field}: set url or urlFrom")),
    }
}

impl PostgresSink {
    /// Builds the sink and tries to reach the server once; an unreachable server is not fatal (the first
    /// worker's recover retries), but a server that cannot do what `twoPhase` asks for is.
    pub async fn connect(cfg: PostgresSinkConfig, health: Health, metrics: Metrics) -> Result<Self, SinkError> {
        let url = resolve_url(&cfg.url, &cfg.url_from, "spec.sink.postgres.url").map_err(SinkError::Permanent)?;
        let max_connections = cfg.max_connections.unwrap_or(DEFAULT_POSTGRES_MAX_CONNECTIONS).max(1) as usize;
        let idle = Duration::from_secs(u64::from(
            cfg.idle_timeout_seconds.unwrap_or(DEFAULT_POSTGRES_IDLE_TIMEOUT_SECONDS).max(1),
        ));
        let sink = Self {
            table: cfg.table.clone(),
            layout: Layout::from_config(&cfg),
            mapping: cfg.mapping(),
            batch_rows: cfg.batch_size.unwrap_or(1000).max(1) as usize,
            requested: cfg.two_phase.unwrap_or_default(),
            tag: gid::table_tag(&cfg.table),
            control: Control::new(url, health, metrics),
            mode: OnceCell::new(),
            types: RwLock::new(None),
            workers: Arc::new(std::sync::Mutex::new(HashMap::new())),
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
        };
        spawn_idle_reaper(Arc::downgrade(&sink.workers), idle);
        match sink.init().await {
            Ok(mode) => tracing::info!(table = %sink.table, mode = mode.as_str(), "postgres sink ready"),
            Err(SinkError::Transient(e)) => {
                tracing::warn!(error = %e, "postgres not reachable yet; will retry when a worker connects")
            }
            Err(e) => return Err(e),
        }
        Ok(sink)
    }

    /// The mode in use (connects, creates the bookkeeping tables and asks the server on first use).
    pub async fn init(&self) -> Result<Mode, SinkError> {
        self.mode
            .get_or_try_init(|| async {
                let mut client = conn::connect(self.control.url(), self.control.health(), self.control.metrics()).await?;
                schema::ensure_tables(&mut client).await?;
                let max = schema::max_prepared(&client).await?;
                let mode = match (self.requested, max > 0) {
                    (PostgresTwoPhase::Staging, _) | (PostgresTwoPhase::Auto, false) => Mode::Staging,
                    (PostgresTwoPhase::Prepared | PostgresTwoPhase::Auto, true) => Mode::Prepared,
                    (PostgresTwoPhase::Prepared, false) => {
                        return Err(SinkError::Permanent(
                            "spec.sink.postgres.twoPhase: prepared needs max_prepared_transactions > 0 on the server (it is 0)".into(),
                        ));
                    }
                };
                tracing::info!(max_prepared_transactions = max, mode = mode.as_str(), "postgres two-phase mode chosen");
                Ok(mode)
            })
            .await
            .copied()
    }

    fn worker(&self, worker: &str) -> Arc<Mutex<Worker>> {
        let mut map = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(worker.to_string()).or_default().clone()
    }

    async fn types(&self) -> Result<Arc<ColumnTypes>, SinkError> {
        if let Some(t) = self.types.read().await.as_ref() {
            return Ok(t.clone());
        }
        let client = self.control.get().await?;
        let t = Arc::new(schema::column_types(&client, &self.table).await?);
        *self.types.write().await = Some(t.clone());
        Ok(t)
    }

    /// After a permanent error the table may have been fixed: look the columns up again next time.
    async fn forget_types(&self, e: &SinkError) {
        if matches!(e, SinkError::Permanent(_)) {
            *self.types.write().await = None;
        }
    }

    fn encode(&self, types: &ColumnTypes, payloads: &[Bytes]) -> Result<Vec<CopyBatch>, SinkError> {
        let enc = Encoder { layout: &self.layout, mapping: &self.mapping, types, batch_rows: self.batch_rows };
        let mut out = Vec::new();
        enc.encode(payloads.iter(), &mut out).map_err(|e| SinkError::Permanent(format!("postgres sink: {e}")))?;
        Ok(out)
    }

    /// (Re)connects the worker's own connection; a lost connection takes its open round with it.
    async fn ensure_client(&self, w: &mut Worker) -> Result<(), SinkError> {
        w.last_used = Some(Instant::now());
        if w.client.as_ref().is_none_or(|c| c.is_closed()) {
            if w.in_tx {
                w.in_tx = false;
                w.tx_ok = false;
            }
            w.copy = None;
            w.client = None;
            if w.permit.is_none() {
                w.permit = Some(self.slot().await?);
            }
            w.client = Some(conn::connect(self.control.url(), self.control.health(), self.control.metrics()).await?);
        }
        Ok(())
    }

    /// A connection slot: a free one, else the one of the least recently used idle worker, else the first
    /// freed within [`SLOT_WAIT`].
    async fn slot(&self) -> Result<OwnedSemaphorePermit, SinkError> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        let oldest = {
            let map = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            map.values()
                .filter_map(|w| {
                    let last = w.try_lock().ok().filter(|g| g.releasable() && g.permit.is_some())?.last_used;
                    Some((last, w.clone()))
                })
                .min_by_key(|(last, _)| *last)
                .map(|(_, w)| w)
        };
        if let Some(w) = oldest
            && let Ok(mut g) = w.try_lock()
            && g.releasable()
        {
            tracing::debug!(
                max = self.max_connections,
                "postgres sink: closing the least recently used idle connection"
            );
            g.release();
        }
        match tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(SinkError::Transient(format!(
                "postgres: all {} worker connections hold open rounds (spec.sink.postgres.maxConnections)",
                self.max_connections
            ))),
        }
    }

    /// Rolls back this worker's prepared transactions that start at or after `from`.
    async fn rollback_prepared_from(&self, worker: &str, from: u64) -> Result<(), SinkError> {
        let client = self.control.get().await?;
        for (g, txn) in prepared::list(&client, worker, &self.tag).await? {
            if txn.start >= from {
                prepared::rollback(&client, &g).await?;
                tracing::info!(%worker, txn = %txn.id_str(), "rolled back prepared transaction");
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl SinkIntegration for PostgresSink {
    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }

    async fn recover(&self, worker: &str) -> Result<Recovery, SinkError> {
        self.init().await?;
        let w = self.worker(worker);
        let mut w = w.lock().await;
        // A previous connection of this worker may hold an open round: closing it rolls that back.
        *w = Worker::default();
        let client = self.control.get().await?;
        let committed = schema::committed_end(&*client, &self.table, worker).await?.unwrap_or(0);
        let mut candidates: Vec<Txn> =
            prepared::list(&client, worker, &self.tag).await?.into_iter().map(|(_, t)| t).collect();
        candidates.extend(staging::prepared(&*client, &self.table, worker).await?);
        candidates.sort_by_key(|t| t.end);
        let pending = candidates.pop();
        if !candidates.is_empty() {
            tracing::warn!(%worker, extra = candidates.len(), "more than one pending transaction; keeping the newest");
        }
        let keep = pending.as_ref().map_or(committed, |p| p.end.max(committed));
        staging::delete_from(&*client, &self.table, worker, keep).await?;
        w.next = keep;
        w.chunk_start = keep;
        Ok(Recovery { committed: Some(committed), pending })
    }

    async fn stage(&self, worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        let Some(first) = records.first() else { return Ok(()) };
        let first_offset = first.offset;
        let mode = self.init().await?;
        let types = self.types().await?;
        let payloads: Vec<Bytes> = records.into_iter().map(|r| r.payload).collect();
        let end = first_offset + payloads.iter().map(|p| p.len() as u64).sum::<u64>();
        let w = self.worker(worker);
        let mut w = w.lock().await;
        let r = match mode {
            Mode::Prepared => prepared::stage(self, &mut w, &types, first_offset, &payloads).await,
            Mode::Staging => staging::stage(self, worker, &mut w, &types, first_offset, &payloads).await,
        };
        if r.is_ok() {
            w.next = end;
        }
        if let Err(e) = &r {
            self.forget_types(e).await;
        }
        r
    }

    async fn prepare(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let mode = self.init().await?;
        let w = self.worker(worker);
        let mut w = w.lock().await;
        if w.next != txn.end {
            return Err(SinkError::Permanent(format!(
                "staged data ends at offset {}, transaction {} ends at {}",
                w.next,
                txn.id_str(),
                txn.end
            )));
        }
        let r = match mode {
            Mode::Prepared => prepared::prepare(self, worker, &mut w, txn).await,
            Mode::Staging => staging::prepare(self, worker, &mut w, txn).await,
        };
        if let Err(e) = &r {
            self.forget_types(e).await;
        }
        r
    }

    async fn commit(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let mode = self.init().await?;
        let w = self.worker(worker);
        let mut w = w.lock().await;
        match mode {
            Mode::Prepared => prepared::commit(self, worker, txn).await,
            Mode::Staging => staging::commit(self, worker, &mut w, txn).await,
        }
    }

    async fn abort(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        self.init().await?;
        let w = self.worker(worker);
        let mut w = w.lock().await;
        w.copy = None;
        if w.in_tx {
            // Closing the connection also rolls back, so a failed ROLLBACK only costs a reconnect.
            if let Some(c) = w.client.as_ref()
                && c.batch_execute("ROLLBACK").await.is_err()
            {
                w.client = None;
            }
            w.in_tx = false;
            w.tx_ok = false;
        }
        self.rollback_prepared_from(worker, txn.start).await?;
        let client = self.control.get().await?;
        staging::abort_from(&*client, &self.table, worker, txn.start).await?;
        w.chunk.clear();
        w.chunk_rows = 0;
        w.chunk_start = txn.start;
        w.next = txn.start;
        Ok(())
    }

    async fn forget(&self, worker: &str) -> Result<(), SinkError> {
        self.init().await?;
        let removed = self.workers.lock().unwrap_or_else(|p| p.into_inner()).remove(worker);
        drop(removed);
        self.rollback_prepared_from(worker, 0).await?;
        let client = self.control.get().await?;
        staging::abort_from(&*client, &self.table, worker, 0).await?;
        client
            .execute("DELETE FROM wallaroo_sink_offsets WHERE target = $1 AND worker = $2", &[&self.table, &worker])
            .await
            .map_err(|e| classify(e, "forgetting offsets"))?;
        Ok(())
    }
}

/// Every so often, closes the connections of workers idle for `idle`; ends with the sink.
fn spawn_idle_reaper(workers: Weak<Workers>, idle: Duration) {
    let every = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(workers) = workers.upgrade() else { break };
            let n = release_idle(&workers, idle);
            if n > 0 {
                tracing::debug!(released = n, "postgres sink: closed idle worker connections");
            }
        }
    });
}

/// Sends COPY batches on `client` (inside whatever transaction it has open).
pub async fn copy_batches(client: &Client, table: &str, batches: Vec<CopyBatch>) -> Result<u64, SinkError> {
    use futures::SinkExt;
    let mut total = 0;
    for b in batches {
        let sink = client.copy_in::<_, Bytes>(&b.sql(table)).await.map_err(|e| classify(e, "COPY"))?;
        futures::pin_mut!(sink);
        sink.send(Bytes::from(b.data)).await.map_err(|e| classify(e, "COPY data"))?;
        total += sink.finish().await.map_err(|e| classify(e, "COPY"))?;
    }
    Ok(total)
}
