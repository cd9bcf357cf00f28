//! One connection to the source table: LISTEN for wake-ups, the commit-order fence, and batched reads by id.
//!
//! **The fence.** Serial ids are handed out when a row is inserted but become visible when its transaction
//! commits, so id 10 can commit after id 11 was read; a reader that moved its cursor past 11 would never see 10.
//! An INSERT takes `RowExclusiveLock` on the table *before* it draws its id from the sequence and keeps the lock
//! until its transaction ends. So: read the sequence's last value `L`, then the set `V` of transactions holding
//! a write lock on the table. Every id `<= L` was drawn by a transaction that held the lock before we read `L`;
//! if it is still running it is in `V`. Once no transaction of `V` is alive, every row with id `<= L` is either
//! committed (and visible to a new snapshot) or rolled back for good, and the reader may pass it. Rows above the
//! fence wait for the next one. The cost is two small catalog queries per fence and a delay of about one
//! transaction length; a long-running writer of the table holds the source back for as long as it runs.
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use crate::runtime::source_api::SourceError;

/// What went wrong, and whether reconnecting can help.
#[derive(Debug)]
pub enum ReadError {
    /// Connection lost, server restarting, timeouts: reconnect with backoff.
    Transient(String),
    /// Missing table or column, permissions, bad SQL: reconnecting cannot fix it.
    Fatal(String),
}

impl ReadError {
    fn from_pg(e: tokio_postgres::Error, what: &str) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let msg = format!("postgres {what}: {} ({code})", db.message());
            return match code.get(..2).unwrap_or("") {
                "42" => ReadError::Fatal(msg),
                _ => ReadError::Transient(msg),
            };
        }
        ReadError::Transient(format!("postgres {what}: {e}"))
    }

    pub fn into_source_error(self) -> SourceError {
        match self {
            ReadError::Transient(m) => SourceError::External { system: "postgres", message: m },
            ReadError::Fatal(m) => SourceError::Config(m),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub url: String,
    pub table: String,
    pub id_column: String,
    pub payload_column: Option<String>,
    pub channel: String,
    pub install_trigger: bool,
}

struct Fence {
    last: i64,
    holders: Vec<String>,
}

pub struct Reader {
    client: Client,
    /// Woken by every NOTIFY on the channel (a stored permit covers notifications that arrive mid-read).
    pub wake: Arc<Notify>,
    select: Statement,
    /// Quoted table name, for the lock look-up.
    table: String,
    /// The id column's sequence, when it has one (no sequence: no fence, see the docs).
    sequence: Option<String>,
    fence: Option<Fence>,
    /// Every row with an id up to this is committed or gone for good.
    safe_through: i64,
}

pub fn quote_ident(name: &str) -> String {
    name.split('.').map(|p| format!("\"{}\"", p.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

/// The default LISTEN channel: `wallaroo_<table>` with dots made underscores.
pub fn default_channel(table: &str) -> String {
    format!("wallaroo_{}", table.replace('.', "_"))
}

/// The trigger function and trigger that NOTIFY `channel` after each INSERT statement (statement level: one
/// wake-up per statement, not per row; NOTIFY is delivered at commit, after the rows became visible).
pub fn trigger_sql(table: &str, channel: &str) -> String {
    let base = table.replace('.', "_");
    let func = quote_ident(&format!("wallaroo_notify_{base}"));
    let trigger = quote_ident(&format!("wallaroo_notify_{base}"));
    let chan = channel.replace('\'', "''");
    format!(
        "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql AS $wallaroo$
         BEGIN PERFORM pg_notify('{chan}', ''); RETURN NULL; END $wallaroo$;
         CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT ON {tbl} FOR EACH STATEMENT EXECUTE FUNCTION {func}();",
        tbl = quote_ident(table)
    )
}

impl Reader {
    pub async fn connect(cfg: &ReaderConfig) -> Result<Self, ReadError> {
        let (client, mut connection) =
            tokio_postgres::connect(&cfg.url, NoTls).await.map_err(|e| ReadError::from_pg(e, "connect"))?;
        let wake = Arc::new(Notify::new());
        let w = wake.clone();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(_)) => w.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "postgres connection ended");
                        break;
                    }
                }
            }
            // Wake the reader so it notices the closed connection at once.
            w.notify_one();
        });
        let table = quote_ident(&cfg.table);
        let id = quote_ident(&cfg.id_column);
        client
            .batch_execute("SET application_name = 'wallaroo-connector'")
            .await
            .map_err(|e| ReadError::from_pg(e, "session setup"))?;
        if cfg.install_trigger {
            client
                .batch_execute(&trigger_sql(&cfg.table, &cfg.channel))
                .await
                .map_err(|e| ReadError::from_pg(e, "installing the NOTIFY trigger"))?;
        }
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(&cfg.channel)))
            .await
            .map_err(|e| ReadError::from_pg(e, "LISTEN"))?;
        let payload = match &cfg.payload_column {
            None => "row_to_json(wallaroo_row)::text".to_string(),
            Some(col) => {
                let row = client
                    .query_opt(
                        "SELECT t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                          WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
                        &[&table, col],
                    )
                    .await
                    .map_err(|e| ReadError::from_pg(e, "reading the payload column's type"))?;
                let Some(row) = row else {
                    return Err(ReadError::Fatal(format!(
                        "spec.source.postgres.payloadColumn: table {} has no column {col:?} (or does not exist)",
                        cfg.table
                    )));
                };
                let typ: String = row.get(0);
                if typ == "bytea" { quote_ident(col) } else { format!("{}::text", quote_ident(col)) }
            }
        };
        let select = client
            .prepare(&format!(
                "SELECT {id}::bigint, {payload} FROM {table} AS wallaroo_row
                  WHERE {id} > $1::bigint AND {id} <= $2::bigint ORDER BY {id} LIMIT $3::bigint"
            ))
            .await
            .map_err(|e| ReadError::from_pg(e, "preparing the read query"))?;
        let sequence: Option<String> = client
            .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&table, &cfg.id_column])
            .await
            .map_err(|e| ReadError::from_pg(e, "looking up the id sequence"))?
            .get(0);
        if sequence.is_none() {
            tracing::warn!(
                table = %cfg.table,
                column = %cfg.id_column,
                "the id column has no sequence (serial/identity): reading without the commit-order fence; \
                 rows committed out of id order can be missed"
            );
        }
        Ok(Self { client, wake, select, table, sequence, fence: None, safe_through: i64::MIN })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Moves the fence forward as far as possible; `true` while a fence waits for running writers.
    async fn advance(&mut self) -> Result<bool, ReadError> {
        let Some(seq) = &self.sequence else {
            self.safe_through = i64::MAX;
            return Ok(false);
        };
        if let Some(f) = &self.fence {
            let alive: bool = self
                .client
                .query_one("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE virtualtransaction = ANY($1))", &[&f.holders])
                .await
                .map_err(|e| ReadError::from_pg(e, "checking the fence"))?
                .get(0);
            if alive {
                return Ok(true);
            }
            self.safe_through = self.safe_through.max(f.last);
            self.fence = None;
        }
        let last: i64 = self
            .client
            .query_one(&format!("SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {seq}"), &[])
            .await
            .map_err(|e| ReadError::from_pg(e, "reading the id sequence"))?
            .get(0);
        if last <= self.safe_through {
            return Ok(false);
        }
        let holders: Vec<String> = self
            .client
            .query_one(
                "SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{}') FROM pg_locks
                  WHERE locktype = 'relation' AND relation = to_regclass($1)
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
                    AND pid IS DISTINCT FROM pg_backend_pid()",
                &[&self.table],
            )
            .await
            .map_err(|e| ReadError::from_pg(e, "reading the table's writers"))?
            .get(0);
        if holders.is_empty() {
            self.safe_through = last;
            Ok(false)
        } else {
            self.fence = Some(Fence { last, holders });
            Ok(true)
        }
    }

    /// Up to `limit` rows with id greater than `after`, in id order, that the fence lets through; the flag says
    /// a fence is still waiting for running writers (poll again soon).
    pub async fn read(&mut self, after: i64, limit: i64) -> Result<(Vec<(i64, Bytes)>, bool), ReadError> {
        let waiting = self.advance().await?;
        if self.safe_through <= after {
            return Ok((Vec::new(), waiting));
        }
        let rows = self
            .client
            .query(&self.select, &[&after, &self.safe_through, &limit])
            .await
            .map_err(|e| ReadError::from_pg(e, "reading rows"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get(0).map_err(|e| ReadError::Fatal(format!("id column: {e}")))?;
            let payload = match r.try_get::<_, Option<Vec<u8>>>(1) {
                Ok(v) => Bytes::from(v.unwrap_or_default()),
                Err(_) => Bytes::from(
                    r.try_get::<_, Option<String>>(1)
                        .map_err(|e| ReadError::Fatal(format!("payload: {e}")))?
                        .unwrap_or_default(),
                ),
            };
            out.push((id, payload));
        }
        Ok((out, waiting))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_trigger() {
        assert_eq!(default_channel("public.orders"), "wallaroo_public_orders");
        assert_eq!(quote_ident("public.Orders"), "\"public\".\"Orders\"");
        let sql = trigger_sql("public.orders", "it's");
        assert!(sql.contains("pg_notify('it''s', '')"), "{sql}");
        assert!(sql.contains("AFTER INSERT ON \"public\".\"orders\" FOR EACH STATEMENT"), "{sql}");
        assert!(sql.contains("CREATE OR REPLACE FUNCTION \"wallaroo_notify_public_orders\"()"), "{sql}");
    }
}
