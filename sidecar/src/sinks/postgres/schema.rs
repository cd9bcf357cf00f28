//! The sink's bookkeeping tables and catalog look-ups.
//!
//! - `wallaroo_sink_offsets(target, worker, committed_end)`: end offset of each worker's last committed
//!   checkpoint, updated in the same transaction that publishes the rows (both modes).
//! - `wallaroo_sink_txn(target, worker, txn, start_offset, end_offset, state)`: staging mode's transaction log.
//! - `wallaroo_sink_staging(target, worker, start_offset, end_offset, rows, data)`: staging mode's staged
//!   payloads, framed (`u32` length + bytes) in chunks of a few MiB.
//!
//! `target` is the sink's table name as configured, so several sinks can share the tables.
use tokio_postgres::{Client, GenericClient};

use super::conn::classify;
use super::rows::ColumnTypes;
use crate::runtime::sink_api::SinkError;

/// Serialises concurrent `CREATE TABLE IF NOT EXISTS` of several sidecars (it can fail on a catalog race).
const DDL_LOCK: i64 = 0x5741_4c4c_5347; // "WALLSG"

const DDL: &str = "
CREATE TABLE IF NOT EXISTS wallaroo_sink_offsets (
    target text NOT NULL,
    worker text NOT NULL,
    committed_end bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, worker)
);
CREATE TABLE IF NOT EXISTS wallaroo_sink_txn (
    target text NOT NULL,
    worker text NOT NULL,
    txn text NOT NULL,
    start_offset bigint NOT NULL,
    end_offset bigint NOT NULL,
    state text NOT NULL CHECK (state IN ('prepared', 'committed')),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, worker, txn)
);
CREATE TABLE IF NOT EXISTS wallaroo_sink_staging (
    target text NOT NULL,
    worker text NOT NULL,
    start_offset bigint NOT NULL,
    end_offset bigint NOT NULL,
    rows integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (target, worker, start_offset)
);
ALTER TABLE wallaroo_sink_staging ALTER COLUMN data SET STORAGE EXTERNAL;
";

pub async fn ensure_tables(client: &mut Client) -> Result<(), SinkError> {
    let tx = client.transaction().await.map_err(|e| classify(e, "begin"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DDL_LOCK]).await.map_err(|e| classify(e, "ddl lock"))?;
    tx.batch_execute(DDL).await.map_err(|e| classify(e, "creating bookkeeping tables"))?;
    tx.commit().await.map_err(|e| classify(e, "commit ddl"))
}

/// `max_prepared_transactions` of the server (0 disables PREPARE TRANSACTION).
pub async fn max_prepared(client: &Client) -> Result<i64, SinkError> {
    let row = client.query_one("SHOW max_prepared_transactions", &[]).await.map_err(|e| classify(e, "SHOW"))?;
    let v: String = row.get(0);
    v.trim().parse().map_err(|_| SinkError::Permanent(format!("max_prepared_transactions = {v:?} is not a number")))
}

/// The target's columns; a missing table is a permanent error (vote abort until someone creates it).
pub async fn column_types(client: &Client, table: &str) -> Result<ColumnTypes, SinkError> {
    let quoted = super::conn::quote_ident(table);
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname = 'bytea', to_regclass($1) IS NOT NULL
               FROM (SELECT to_regclass($1) AS rel) r
               LEFT JOIN pg_attribute a ON a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN pg_type t ON t.oid = a.atttypid",
            &[&quoted],
        )
        .await
        .map_err(|e| classify(e, "reading the table's columns"))?;
    let exists = rows.first().is_some_and(|r| r.get::<_, bool>(2));
    if !exists {
        return Err(SinkError::Permanent(format!("postgres: table {table} does not exist")));
    }
    let mut types = ColumnTypes::default();
    for r in rows {
        if let (Some(name), Some(bytea)) = (r.get::<_, Option<String>>(0), r.get::<_, Option<bool>>(1)) {
            types.0.insert(name, bytea);
        }
    }
    Ok(types)
}

pub async fn committed_end(client: &impl GenericClient, target: &str, worker: &str) -> Result<Option<u64>, SinkError> {
    let row = client
        .query_opt(
            "SELECT committed_end FROM wallaroo_sink_offsets WHERE target = $1 AND worker = $2",
            &[&target, &worker],
        )
        .await
        .map_err(|e| classify(e, "reading offsets"))?;
    Ok(row.map(|r| r.get::<_, i64>(0) as u64))
}

pub async fn set_committed_end(
    client: &impl GenericClient,
    target: &str,
    worker: &str,
    end: u64,
) -> Result<(), SinkError> {
    client
        .execute(
            "INSERT INTO wallaroo_sink_offsets (target, worker, committed_end) VALUES ($1, $2, $3)
             ON CONFLICT (target, worker) DO UPDATE SET committed_end = EXCLUDED.committed_end, updated_at = now()",
            &[&target, &worker, &(end as i64)],
        )
        .await
        .map_err(|e| classify(e, "updating offsets"))?;
    Ok(())
}
