//! `source.postgres`: a table as one stream named `postgres:<table>`, read in id order.
//!
//! Rows are read from the table itself (`WHERE id > $cursor ORDER BY id LIMIT n`), so rows inserted while the
//! sidecar was down are read on restart; LISTEN/NOTIFY only wakes the reader early (optionally through a trigger
//! this source installs), and a poll interval covers lost or missing notifications. Point of reference = the
//! id: `Position::After(p)` resumes at `id > p`, `Beginning` reads everything. `Durable` needs nothing upstream:
//! the worker's acknowledged point of reference is the whole state. Reads pass the commit-order fence described
//! in [`reader`], so rows whose transaction commits after a higher id was read are not skipped.
use std::time::Duration;

use tokio::time::Instant;
use wallaroo_crds::PostgresSource as PostgresSourceConfig;

use crate::runtime::source_api::{
    Command, Emit, Position, Record, SourceContext, SourceError, SourceIntegration, stream_id_for,
};

pub mod reader;

use reader::{ReadError, Reader, ReaderConfig};

/// A read that takes longer than this is treated as a lost connection.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// First re-check of a fence waiting for running writers; doubles up to the poll interval.
const FENCE_RECHECK_MIN: Duration = Duration::from_millis(2);

pub struct PostgresSource {
    cfg: PostgresSourceConfig,
}

impl PostgresSource {
    pub fn new(cfg: PostgresSourceConfig) -> Self {
        Self { cfg }
    }

    pub fn stream_name(&self) -> String {
        format!("postgres:{}", self.cfg.table)
    }

    fn reader_config(&self) -> Result<ReaderConfig, SourceError> {
        let url = crate::sinks::postgres::resolve_url(&self.cfg.url, &self.cfg.url_from, "spec.source.postgres.url")
            .map_err(SourceError::Config)?;
        Ok(ReaderConfig {
            url,
            table: self.cfg.table.clone(),
            id_column: self.cfg.id_column.clone(),
            payload_column: self.cfg.payload_column.clone(),
            channel: self.cfg.channel.clone().unwrap_or_else(|| reader::default_channel(&self.cfg.table)),
            install_trigger: self.cfg.install_trigger,
        })
    }
}

/// Where the stream stands in the current generation.
struct Cursor {
    generation: u64,
    /// Last id handed to the runtime (or the resume point).
    after: i64,
}

#[async_trait::async_trait]
impl SourceIntegration for PostgresSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        let rcfg = self.reader_config()?;
        let poll = Duration::from_millis(self.cfg.poll_interval_ms.unwrap_or(1000).max(1));
        let limit = i64::from(self.cfg.batch_size.unwrap_or(1000).max(1));
        let name = self.stream_name();
        let stream = stream_id_for(name.as_bytes());
        ctx.emit.send(Emit::Stream { name: name.clone() }).await.map_err(|_| SourceError::RuntimeGone)?;

        let mut reader: Option<Reader> = None;
        let mut backoff = BACKOFF_MIN;
        let mut connect_at = Instant::now();
        let mut cursor: Option<Cursor> = None;
        let mut batch: Vec<Record> = Vec::new();
        // Read again without waiting (after a full batch, a Start, a wake-up).
        let mut want_read = true;
        let mut fence_wait = FENCE_RECHECK_MIN;
        let mut wait = poll;
        loop {
            if reader.as_ref().is_some_and(Reader::is_closed) {
                reader = None;
                self.lost(&ctx, "connection closed");
                connect_at = Instant::now() + backoff;
            }
            if reader.is_none() && Instant::now() >= connect_at && !ctx.shutdown.is_cancelled() {
                match Reader::connect(&rcfg).await {
                    Ok(r) => {
                        tracing::info!(table = %rcfg.table, channel = %rcfg.channel, "connected to postgres");
                        ctx.health.set_external(true);
                        ctx.metrics.external_connected.set(1);
                        reader = Some(r);
                        want_read = true;
                    }
                    Err(ReadError::Fatal(m)) => return Err(SourceError::Config(m)),
                    Err(ReadError::Transient(m)) => {
                        tracing::warn!(error = %m, retry_in_ms = backoff.as_millis() as u64, "cannot reach postgres");
                        self.lost(&ctx, &m);
                        connect_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            if let (Some(r), Some(c)) = (reader.as_mut(), cursor.as_mut())
                && batch.is_empty()
                && want_read
            {
                match tokio::time::timeout(QUERY_TIMEOUT, r.read(c.after, limit)).await {
                    Ok(Ok((rows, fence_waiting))) => {
                        // Only a successful read proves the connection healthy enough to reset the backoff.
                        backoff = BACKOFF_MIN;
                        let full = rows.len() as i64 >= limit;
                        for (id, payload) in rows {
                            let Ok(por) = u64::try_from(id) else {
                                return Err(SourceError::Config(format!(
                                    "spec.source.postgres.idColumn: id {id} is negative; ids must be >= 0"
                                )));
                            };
                            c.after = id;
                            batch.push(Record { por, key: None, payload });
                        }
                        want_read = full;
                        if fence_waiting && !full {
                            wait = fence_wait;
                            fence_wait = (fence_wait * 2).min(poll);
                        } else {
                            fence_wait = FENCE_RECHECK_MIN;
                            wait = poll;
                        }
                    }
                    Ok(Err(ReadError::Fatal(m))) => return Err(SourceError::Config(m)),
                    Ok(Err(ReadError::Transient(m))) => {
                        tracing::warn!(error = %m, "postgres read failed; reconnecting");
                        ctx.metrics.error("transient", "read");
                        reader = None;
                        self.lost(&ctx, &m);
                        connect_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    Err(_) => {
                        tracing::warn!("postgres read timed out; reconnecting");
                        ctx.metrics.error("timeout", "read");
                        reader = None;
                        self.lost(&ctx, "timeout");
                        connect_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            let wake = reader.as_ref().map(|r| r.wake.clone());
            let sleep_for = if reader.is_none() { connect_at.saturating_duration_since(Instant::now()) } else { wait };
            tokio::select! {
                biased;
                cmd = ctx.commands.recv() => match cmd {
                    None => return Ok(()),
                    Some(Command::Start { from, generation, .. }) => {
                        let after = match from {
                            Position::Beginning => -1,
                            Position::After(p) => i64::try_from(p).unwrap_or(i64::MAX),
                        };
                        tracing::info!(stream = %name, ?from, generation, "reading");
                        cursor = Some(Cursor { generation, after });
                        batch.clear();
                        want_read = true;
                    }
                    // The worker's acknowledged id is the only state this source needs: nothing to commit.
                    Some(Command::Durable { through, .. }) => tracing::debug!(through, "durable"),
                    Some(Command::Finished { .. }) => return Ok(()),
                },
                _ = ctx.shutdown.cancelled() => return Ok(()),
                permit = ctx.emit.reserve(), if !batch.is_empty() => {
                    let permit = permit.map_err(|_| SourceError::RuntimeGone)?;
                    let generation = cursor.as_ref().map_or(0, |c| c.generation);
                    permit.send(Emit::Records { stream, generation, records: std::mem::take(&mut batch) });
                }
                _ = async { if let Some(w) = &wake { w.notified().await } }, if wake.is_some() && !want_read => {
                    want_read = true;
                }
                _ = tokio::time::sleep(sleep_for), if !want_read || reader.is_none() => {
                    want_read = true;
                }
            }
        }
    }
}

impl PostgresSource {
    fn lost(&self, ctx: &SourceContext, why: &str) {
        tracing::debug!(reason = why, "postgres unavailable");
        ctx.health.set_external(false);
        ctx.metrics.external_connected.set(0);
        ctx.metrics.reconnects_total.with_label_values(&["postgres"]).inc();
    }
}
