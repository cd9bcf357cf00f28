//! Staging mode, for servers without prepared transactions: payloads go to `wallaroo_sink_staging` as the
//! round goes; Phase 1 commits the last chunk and a `prepared` row in `wallaroo_sink_txn` together (after a
//! rolled-back test load into the table, so rows the table would refuse vote abort instead of wedging Phase 2);
//! Phase 2 moves the rows into the table, deletes the chunks, marks the txn committed and advances the offset,
//! all in one transaction.
use bytes::Bytes;
use tokio_postgres::{Client, GenericClient};

use super::conn::classify;
use super::rows::{ColumnTypes, frame_into, unframe};
use super::{CHUNK_BYTES, PostgresSink, Worker, copy_batches, schema};
use crate::runtime::sink_api::{SinkError, Txn};

/// Transactions of `worker` logged as prepared and not yet resolved.
pub async fn prepared(client: &impl GenericClient, table: &str, worker: &str) -> Result<Vec<Txn>, SinkError> {
    let rows = client
        .query(
            "SELECT txn, start_offset, end_offset FROM wallaroo_sink_txn
              WHERE target = $1 AND worker = $2 AND state = 'prepared'",
            &[&table, &worker],
        )
        .await
        .map_err(|e| classify(e, "reading wallaroo_sink_txn"))?;
    Ok(rows
        .into_iter()
        .map(|r| Txn {
            id: r.get::<_, String>(0).into(),
            start: r.get::<_, i64>(1) as u64,
            end: r.get::<_, i64>(2) as u64,
        })
        .collect())
}

/// Drops staged chunks from `from` on (leftovers of a round that never reached Phase 1).
pub async fn delete_from(client: &impl GenericClient, table: &str, worker: &str, from: u64) -> Result<(), SinkError> {
    client
        .execute(
            "DELETE FROM wallaroo_sink_staging WHERE target = $1 AND worker = $2 AND start_offset >= $3",
            &[&table, &worker, &(from as i64)],
        )
        .await
        .map_err(|e| classify(e, "deleting staged rows"))?;
    Ok(())
}

/// Discards everything staged or prepared from `from` on.
pub async fn abort_from(client: &impl GenericClient, table: &str, worker: &str, from: u64) -> Result<(), SinkError> {
    delete_from(client, table, worker, from).await?;
    client
        .execute(
            "DELETE FROM wallaroo_sink_txn WHERE target = $1 AND worker = $2 AND state = 'prepared' AND start_offset >= $3",
            &[&table, &worker, &(from as i64)],
        )
        .await
        .map_err(|e| classify(e, "discarding prepared txn"))?;
    Ok(())
}

async fn write_chunk(client: &Client, table: &str, worker: &str, w: &Worker, end: u64) -> Result<(), SinkError> {
    client
        .execute(
            "INSERT INTO wallaroo_sink_staging (target, worker, start_offset, end_offset, rows, data)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (target, worker, start_offset)
             DO UPDATE SET end_offset = EXCLUDED.end_offset, rows = EXCLUDED.rows, data = EXCLUDED.data",
            &[&table, &worker, &(w.chunk_start as i64), &(end as i64), &w.chunk_rows, &w.chunk.as_slice()],
        )
        .await
        .map_err(|e| classify(e, "writing staged rows"))?;
    Ok(())
}

fn clear_chunk(w: &mut Worker, end: u64) {
    w.chunk.clear();
    w.chunk_rows = 0;
    w.chunk_start = end;
}

/// Loads the rows staged for `[start, end)` into the table, one chunk at a time (memory stays bounded by a
/// chunk however large the round), after checking the chunks cover the range exactly.
async fn copy_staged(
    sink: &PostgresSink,
    client: &Client,
    worker: &str,
    types: &ColumnTypes,
    start: u64,
    end: u64,
) -> Result<(), SinkError> {
    let table = &sink.table;
    let ranges = client
        .query(
            "SELECT start_offset, end_offset FROM wallaroo_sink_staging
              WHERE target = $1 AND worker = $2 AND start_offset >= $3 AND start_offset < $4
              ORDER BY start_offset",
            &[table, &worker, &(start as i64), &(end as i64)],
        )
        .await
        .map_err(|e| classify(e, "reading staged chunks"))?;
    let mut at = start;
    for r in &ranges {
        let (s, e) = (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64);
        if s != at {
            return Err(SinkError::Permanent(format!(
                "staged rows have a gap at offset {at} (next chunk starts at {s})"
            )));
        }
        at = e;
    }
    if at != end {
        return Err(SinkError::Permanent(format!("staged rows end at offset {at}, the transaction at {end}")));
    }
    for r in ranges {
        let s: i64 = r.get(0);
        let data: Vec<u8> = client
            .query_one(
                "SELECT data FROM wallaroo_sink_staging WHERE target = $1 AND worker = $2 AND start_offset = $3",
                &[table, &worker, &s],
            )
            .await
            .map_err(|e| classify(e, "reading staged rows"))?
            .get(0);
        let payloads = unframe(&Bytes::from(data)).map_err(SinkError::Permanent)?;
        let batches = sink.encode(types, &payloads)?;
        copy_batches(client, table, batches).await?;
    }
    Ok(())
}

async fn finish<T>(client: &Client, r: Result<T, SinkError>) -> Result<T, SinkError> {
    match r {
        Ok(v) => {
            client.batch_execute("COMMIT").await.map_err(|e| classify(e, "COMMIT"))?;
            Ok(v)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

pub(super) async fn stage(
    sink: &PostgresSink,
    worker: &str,
    w: &mut Worker,
    types: &ColumnTypes,
    offset: u64,
    payloads: &[Bytes],
) -> Result<(), SinkError> {
    if offset < w.next {
        // Leftovers of a round that was aborted without our knowing: cut back to where this data belongs.
        sink.ensure_client(w).await?;
        let client = w.client.as_ref().ok_or_else(|| SinkError::Transient("postgres: no connection".into()))?;
        delete_from(client, &sink.table, worker, offset).await?;
        clear_chunk(w, offset);
    } else if offset > w.next {
        return Err(SinkError::Permanent(format!("records start at offset {offset}, expected {}", w.next)));
    }
    // Refuse what the mapping cannot turn into rows now, so the round votes abort.
    sink.encode(types, payloads)?;
    if w.chunk.is_empty() {
        w.chunk_start = offset;
    }
    let mut end = offset;
    for p in payloads {
        frame_into(&mut w.chunk, p);
        w.chunk_rows += 1;
        end += p.len() as u64;
    }
    if w.chunk.len() >= CHUNK_BYTES {
        sink.ensure_client(w).await?;
        let client = w.client.as_ref().ok_or_else(|| SinkError::Transient("postgres: no connection".into()))?;
        write_chunk(client, &sink.table, worker, w, end).await?;
        clear_chunk(w, end);
    }
    Ok(())
}

pub(super) async fn prepare(sink: &PostgresSink, worker: &str, w: &mut Worker, txn: &Txn) -> Result<(), SinkError> {
    let types = sink.types().await?;
    sink.ensure_client(w).await?;
    let client = w.client.as_ref().ok_or_else(|| SinkError::Transient("postgres: no connection".into()))?;
    client.batch_execute("BEGIN").await.map_err(|e| classify(e, "BEGIN"))?;
    let r = async {
        if !w.chunk.is_empty() {
            write_chunk(client, &sink.table, worker, w, txn.end).await?;
        }
        client.batch_execute("SAVEPOINT wallaroo_check").await.map_err(|e| classify(e, "SAVEPOINT"))?;
        copy_staged(sink, client, worker, &types, txn.start, txn.end).await?;
        client.batch_execute("ROLLBACK TO SAVEPOINT wallaroo_check").await.map_err(|e| classify(e, "ROLLBACK TO SAVEPOINT"))?;
        client
            .execute(
                "INSERT INTO wallaroo_sink_txn (target, worker, txn, start_offset, end_offset, state)
                 VALUES ($1, $2, $3, $4, $5, 'prepared')
                 ON CONFLICT (target, worker, txn) DO UPDATE
                 SET start_offset = EXCLUDED.start_offset, end_offset = EXCLUDED.end_offset, state = 'prepared', updated_at = now()",
                &[&sink.table, &worker, &txn.id_str(), &(txn.start as i64), &(txn.end as i64)],
            )
            .await
            .map_err(|e| classify(e, "logging the prepared txn"))?;
        Ok(())
    }
    .await;
    finish(client, r).await?;
    clear_chunk(w, txn.end);
    Ok(())
}

pub(super) async fn commit(sink: &PostgresSink, worker: &str, w: &mut Worker, txn: &Txn) -> Result<(), SinkError> {
    let types = sink.types().await?;
    sink.ensure_client(w).await?;
    let client = w.client.as_ref().ok_or_else(|| SinkError::Transient("postgres: no connection".into()))?;
    client.batch_execute("BEGIN").await.map_err(|e| classify(e, "BEGIN"))?;
    let r = async {
        let row = client
            .query_opt(
                "SELECT state, start_offset, end_offset FROM wallaroo_sink_txn
                  WHERE target = $1 AND worker = $2 AND txn = $3 FOR UPDATE",
                &[&sink.table, &worker, &txn.id_str()],
            )
            .await
            .map_err(|e| classify(e, "reading wallaroo_sink_txn"))?;
        let (start, end) = match row {
            Some(r) if r.get::<_, String>(0) == "prepared" => (r.get::<_, i64>(1) as u64, r.get::<_, i64>(2) as u64),
            Some(_) => return Ok(false),
            None => {
                let committed = schema::committed_end(client, &sink.table, worker).await?.unwrap_or(0);
                if committed >= txn.end {
                    return Ok(false);
                }
                return Err(SinkError::Permanent(format!(
                    "{} is neither prepared nor committed (committed through {committed}, txn ends at {})",
                    txn.id_str(),
                    txn.end
                )));
            }
        };
        copy_staged(sink, client, worker, &types, start, end).await?;
        client
            .execute(
                "DELETE FROM wallaroo_sink_staging WHERE target = $1 AND worker = $2 AND start_offset >= $3 AND start_offset < $4",
                &[&sink.table, &worker, &(start as i64), &(end as i64)],
            )
            .await
            .map_err(|e| classify(e, "deleting moved rows"))?;
        // Keep only the newest committed entry per worker: the log is for recovery, not history.
        client
            .execute(
                "DELETE FROM wallaroo_sink_txn WHERE target = $1 AND worker = $2 AND state = 'committed'",
                &[&sink.table, &worker],
            )
            .await
            .map_err(|e| classify(e, "pruning wallaroo_sink_txn"))?;
        client
            .execute(
                "UPDATE wallaroo_sink_txn SET state = 'committed', updated_at = now() WHERE target = $1 AND worker = $2 AND txn = $3",
                &[&sink.table, &worker, &txn.id_str()],
            )
            .await
            .map_err(|e| classify(e, "marking the txn committed"))?;
        schema::set_committed_end(client, &sink.table, worker, end).await?;
        Ok(true)
    }
    .await;
    let moved = finish(client, r).await?;
    if !moved {
        tracing::debug!(%worker, txn = %txn.id_str(), "already committed");
    }
    Ok(())
}
