//! Prepared mode: a round is one transaction on the worker's connection; Phase 1 is `PREPARE TRANSACTION`.
use std::pin::Pin;

use bytes::Bytes;
use futures::SinkExt;
use tokio_postgres::{Client, CopyInSink};

use super::conn::{classify, quote_literal};
use super::rows::ColumnTypes;
use super::{PostgresSink, Worker, gid, schema};
use crate::runtime::sink_api::{SinkError, Txn};

/// This worker's prepared transactions for this table: `(gid, txn)`.
pub async fn list(client: &Client, worker: &str, tag: &str) -> Result<Vec<(String, Txn)>, SinkError> {
    let rows = client
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, $1)",
            &[&gid::worker_prefix(worker)],
        )
        .await
        .map_err(|e| classify(e, "reading pg_prepared_xacts"))?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let g: String = r.get(0);
            gid::parse(&g, worker, tag).map(|t| (g, t))
        })
        .collect())
}

pub async fn rollback(client: &Client, g: &str) -> Result<(), SinkError> {
    match client.batch_execute(&format!("ROLLBACK PREPARED {}", quote_literal(g))).await {
        Ok(()) => Ok(()),
        // Already resolved by someone else (undefined_object): nothing left to discard.
        Err(e) if e.code().is_some_and(|c| c.code() == "42704") => Ok(()),
        Err(e) => Err(classify(e, "ROLLBACK PREPARED")),
    }
}

pub(super) async fn stage(
    sink: &PostgresSink,
    w: &mut Worker,
    types: &ColumnTypes,
    offset: u64,
    payloads: &[Bytes],
) -> Result<(), SinkError> {
    if offset != w.next {
        return Err(SinkError::Permanent(format!("records start at offset {offset}, expected {}", w.next)));
    }
    let batches = sink.encode(types, payloads)?;
    let had_tx = w.in_tx;
    sink.ensure_client(w).await?;
    if had_tx && !w.in_tx {
        return Err(SinkError::Permanent("the connection holding this round was lost".into()));
    }
    let client = w.client.as_ref().ok_or_else(|| SinkError::Transient("postgres: no connection".into()))?;
    if !w.in_tx {
        client.batch_execute("BEGIN").await.map_err(|e| classify(e, "BEGIN"))?;
        w.in_tx = true;
        w.tx_ok = true;
        w.round_start = offset;
    }
    let r = async {
        for b in batches {
            if w.copy.as_ref().is_some_and(|c| c.columns != b.columns) {
                finish_copy(&mut w.copy).await?;
            }
            if w.copy.is_none() {
                let copy = client.copy_in::<_, Bytes>(&b.sql(&sink.table)).await.map_err(|e| classify(e, "COPY"))?;
                w.copy = Some(OpenCopy { columns: b.columns.clone(), sink: Box::pin(copy) });
            }
            if let Some(c) = w.copy.as_mut() {
                c.sink.send(Bytes::from(b.data)).await.map_err(|e| classify(e, "COPY data"))?;
            }
        }
        Ok(())
    }
    .await;
    if r.is_err() {
        w.tx_ok = false;
        // Dropping the sink aborts the COPY (CopyFail); the transaction is rolled back by abort.
        w.copy = None;
    }
    r
}

/// A `COPY ... FROM STDIN` kept open across stage calls, so a round streams to the server without waiting
/// for it batch by batch; it is finished (and its errors seen) at Phase 1 or when the column list changes.
pub(super) struct OpenCopy {
    columns: Vec<String>,
    sink: Pin<Box<CopyInSink<Bytes>>>,
}

async fn finish_copy(copy: &mut Option<OpenCopy>) -> Result<(), SinkError> {
    if let Some(mut c) = copy.take() {
        c.sink.as_mut().finish().await.map_err(|e| classify(e, "COPY"))?;
    }
    Ok(())
}

pub(super) async fn prepare(sink: &PostgresSink, worker: &str, w: &mut Worker, txn: &Txn) -> Result<(), SinkError> {
    let g = gid::gid(worker, txn, &sink.tag).map_err(SinkError::Permanent)?;
    let has_rows = txn.end > txn.start;
    if has_rows
        && !(w.in_tx && w.tx_ok && w.round_start == txn.start && w.client.as_ref().is_some_and(|c| !c.is_closed()))
    {
        return Err(SinkError::Permanent(format!(
            "rows of {} are not all in the open transaction (connection lost or a statement failed)",
            txn.id_str()
        )));
    }
    if !has_rows && w.in_tx {
        return Err(SinkError::Permanent(format!("{} is empty but rows are staged", txn.id_str())));
    }
    if !w.in_tx {
        sink.ensure_client(w).await?;
    }
    let client = w.client.as_ref().ok_or_else(|| SinkError::Transient("postgres: no connection".into()))?;
    let r = async {
        if !w.in_tx {
            client.batch_execute("BEGIN").await.map_err(|e| classify(e, "BEGIN"))?;
        }
        finish_copy(&mut w.copy).await?;
        schema::set_committed_end(client, &sink.table, worker, txn.end).await?;
        client
            .batch_execute(&format!("PREPARE TRANSACTION {}", quote_literal(&g)))
            .await
            .map_err(|e| classify(e, "PREPARE TRANSACTION"))
    }
    .await;
    if r.is_err() {
        // PREPARE failing ends the transaction; an earlier failure leaves it aborted: either way roll back.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    w.in_tx = false;
    w.tx_ok = false;
    match r {
        // The rows went with the transaction: a retry cannot bring them back.
        Err(SinkError::Transient(e)) if has_rows => Err(SinkError::Permanent(e)),
        other => other,
    }
}

pub(super) async fn commit(sink: &PostgresSink, worker: &str, txn: &Txn) -> Result<(), SinkError> {
    let g = gid::gid(worker, txn, &sink.tag).map_err(SinkError::Permanent)?;
    let client = sink.control.get().await?;
    match client.batch_execute(&format!("COMMIT PREPARED {}", quote_literal(&g))).await {
        Ok(()) => Ok(()),
        Err(e) if e.code().is_some_and(|c| c.code() == "42704") => {
            // No such prepared transaction: fine if it was committed before (a retried Phase 2).
            let committed = schema::committed_end(&*client, &sink.table, worker).await?.unwrap_or(0);
            if committed >= txn.end {
                Ok(())
            } else {
                Err(SinkError::Permanent(format!(
                    "{} is neither prepared nor committed (committed through {committed}, txn ends at {})",
                    txn.id_str(),
                    txn.end
                )))
            }
        }
        Err(e) => Err(classify(e, "COMMIT PREPARED")),
    }
}
