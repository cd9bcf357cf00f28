//! Mode `stream`: a Redis Streams consumer group, at-least-once. One stream named `redis:<stream key>`.
//!
//! - `XGROUP CREATE <key> <group> 0 MKSTREAM` (a new group reads the stream from its first entry; an existing
//!   group keeps its position; BUSYGROUP is ignored).
//! - After every (re)start of the stream by the worker, this consumer's pending entries list (PEL) is read
//!   first (`XREADGROUP ... STREAMS <key> <id>`): entries delivered before a crash or a worker reconnect come
//!   again. Entries at or before the worker's point of reference are acknowledged instead (the worker has
//!   them). Then new entries (`>`) follow.
//! - `XAUTOCLAIM` moves entries that sat idle for `claimMinIdleMs` at other (dead) consumers into this
//!   consumer's PEL, from just after this consumer's position on (claiming older ones would put them behind
//!   points of reference the worker already passed).
//! - `XACK` only on `Command::Durable`: every entry with a point of reference at or below `through`.
//!
//! Point of reference = the entry id packed by [`super::por`].
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;
use wallaroo_crds::RedisSource as RedisSourceConfig;

use super::por::EntryId;
use super::{Backoff, connection_config};
use crate::runtime::source_api::{Command, Emit, Position, Record, SourceContext, SourceError, stream_id_for};

/// Entries per XREADGROUP.
const COUNT: usize = 1000;
/// How long a `>` read waits for new entries (ms); commands are handled meanwhile.
const BLOCK_MS: u64 = 2000;
/// Entries handed to the worker but not yet durable; reading pauses beyond this.
const MAX_UNACKED: usize = 100_000;
/// Ids per XACK.
const ACK_CHUNK: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cursor {
    /// Re-reading this consumer's pending entries with ids greater than this one.
    Pending(EntryId),
    /// Reading entries never delivered to any consumer of the group.
    New,
}

struct Conns {
    /// Blocking XREADGROUP only (a blocked command holds up everything behind it on a connection).
    read: MultiplexedConnection,
    /// XACK, XAUTOCLAIM, XGROUP.
    ctl: MultiplexedConnection,
}

/// One parsed stream entry; `fields` is `None` for entries deleted from the stream while pending.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    pub fields: Option<Vec<(Bytes, Bytes)>>,
}

type ReadFuture = Pin<Box<dyn Future<Output = (u64, Cursor, redis::RedisResult<Value>)> + Send>>;

struct Settings {
    key: String,
    group: String,
    consumer: String,
    payload_field: Option<String>,
    claim_min_idle: Duration,
}

struct State {
    generation: Option<u64>,
    cursor: Cursor,
    /// Entries at or before this id are durable in the worker (from the latest Start).
    skip_through: Option<EntryId>,
    last_emitted: Option<EntryId>,
    /// Emitted, not yet durable: (por, id), oldest first.
    unacked: VecDeque<(u64, String)>,
    /// Read, not yet handed to the runtime.
    outbox: Vec<Record>,
    /// Ids to XACK (durable in the worker, or undeliverable).
    to_ack: Vec<String>,
    /// Bumped on every Start: reads started before it are stale.
    epoch: u64,
    next_claim: Option<Instant>,
}

impl State {
    /// Where to resume reading this consumer's PEL without repeating what this generation already got.
    fn floor(&self) -> EntryId {
        self.last_emitted.or(self.skip_through).unwrap_or(EntryId { ms: 0, seq: 0 })
    }
}

pub async fn run(cfg: RedisSourceConfig, client: redis::Client, mut ctx: SourceContext) -> Result<(), SourceError> {
    let settings = Settings {
        key: cfg.stream.clone().unwrap_or_default(),
        group: cfg.group.clone().unwrap_or_default(),
        consumer: cfg.consumer.clone().unwrap_or_else(|| ctx.instance.clone()),
        payload_field: cfg.payload_field.clone(),
        claim_min_idle: Duration::from_millis(cfg.claim_min_idle_ms.unwrap_or(60_000)),
    };
    let name = format!("redis:{}", settings.key);
    let stream = stream_id_for(name.as_bytes());
    ctx.emit.send(Emit::Stream { name }).await.map_err(|_| SourceError::RuntimeGone)?;
    tracing::info!(key = %settings.key, group = %settings.group, consumer = %settings.consumer, "redis stream source");

    let mut st = State {
        generation: None,
        cursor: Cursor::Pending(EntryId { ms: 0, seq: 0 }),
        skip_through: None,
        last_emitted: None,
        unacked: VecDeque::new(),
        outbox: Vec::new(),
        to_ack: Vec::new(),
        epoch: 0,
        next_claim: None,
    };
    let mut conns: Option<Conns> = None;
    let mut backoff = Backoff::new();
    let mut retry_at = Instant::now();
    let mut read: Option<ReadFuture> = None;

    loop {
        if let Some(c) = conns.as_mut()
            && !st.to_ack.is_empty()
            && let Err(e) = xack(&mut c.ctl, &settings, &mut st.to_ack).await
        {
            disconnected(&ctx, &mut conns, &mut read, &mut st, &mut retry_at, &mut backoff, &e);
        }
        if conns.is_some()
            && read.is_none()
            && st.generation.is_some()
            && st.outbox.is_empty()
            && st.unacked.len() < MAX_UNACKED
        {
            if st.next_claim.is_some_and(|t| t <= Instant::now())
                && let Some(c) = conns.as_mut()
            {
                match claim(&mut c.ctl, &settings, st.floor().next()).await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::info!(claimed = n, "claimed idle entries of other consumers");
                            st.cursor = Cursor::Pending(st.floor());
                        }
                        st.next_claim = Some(Instant::now() + settings.claim_min_idle);
                    }
                    Err(e) => {
                        disconnected(&ctx, &mut conns, &mut read, &mut st, &mut retry_at, &mut backoff, &e);
                        continue;
                    }
                }
            }
            if let Some(c) = conns.as_ref() {
                read = Some(start_read(c.read.clone(), &settings, st.epoch, st.cursor));
            }
        }

        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => {
                if let (Some(g), false) = (st.generation, st.outbox.is_empty()) {
                    let records = std::mem::take(&mut st.outbox);
                    let _ = ctx.emit.send(Emit::Records { stream, generation: g, records }).await;
                }
                if let Some(c) = conns.as_mut() {
                    let _ = xack(&mut c.ctl, &settings, &mut st.to_ack).await;
                }
                return Ok(());
            }
            cmd = ctx.commands.recv() => match cmd {
                None => return Ok(()),
                Some(Command::Start { from, generation, .. }) => {
                    st.generation = Some(generation);
                    st.epoch += 1;
                    read = None;
                    st.outbox.clear();
                    st.last_emitted = None;
                    st.skip_through = match from {
                        Position::Beginning => None,
                        Position::After(p) => Some(EntryId::from_por(p)),
                    };
                    // Unacknowledged entries are either durable now (acked) or re-read from the PEL below.
                    let through = st.skip_through;
                    for (por, id) in std::mem::take(&mut st.unacked) {
                        if through.is_some_and(|t| EntryId::from_por(por) <= t) {
                            st.to_ack.push(id);
                        }
                    }
                    st.cursor = Cursor::Pending(EntryId { ms: 0, seq: 0 });
                    st.next_claim = Some(Instant::now());
                    tracing::info!(generation, from = ?from, "stream (re)started: re-reading pending entries first");
                }
                Some(Command::Durable { through, .. }) => {
                    while st.unacked.front().is_some_and(|(p, _)| *p <= through) {
                        if let Some((_, id)) = st.unacked.pop_front() {
                            st.to_ack.push(id);
                        }
                    }
                }
                Some(Command::Finished { .. }) => {}
            },
            permit = ctx.emit.reserve(), if st.generation.is_some() && !st.outbox.is_empty() => {
                let permit = permit.map_err(|_| SourceError::RuntimeGone)?;
                let records = std::mem::take(&mut st.outbox);
                permit.send(Emit::Records { stream, generation: st.generation.unwrap_or_default(), records });
            }
            (epoch, cursor, res) = maybe(read.as_mut()), if read.is_some() => {
                read = None;
                if epoch != st.epoch {
                    continue;
                }
                match res.and_then(|v| parse_read_reply(v).map_err(parse_error)) {
                    Ok(entries) => {
                        accept(&mut st, &settings, cursor, entries, &ctx)?
                    }
                    Err(e) => disconnected(&ctx, &mut conns, &mut read, &mut st, &mut retry_at, &mut backoff, &e),
                }
            }
            _ = tokio::time::sleep_until(retry_at), if conns.is_none() => {
                match connect(&client, &settings).await {
                    Ok(c) => {
                        tracing::info!(key = %settings.key, "redis connected");
                        conns = Some(c);
                        backoff.reset();
                        ctx.health.set_external(true);
                        ctx.metrics.external_connected.set(1);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "redis: cannot connect");
                        ctx.metrics.error("connection", "source");
                        retry_at = Instant::now() + backoff.next_delay();
                    }
                }
            }
        }
    }
}

async fn maybe<F: Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn parse_error(msg: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Parse, "unexpected reply", msg))
}

/// Drops the connections after an error; the reconnect re-reads the PEL from where this generation stands.
fn disconnected(
    ctx: &SourceContext,
    conns: &mut Option<Conns>,
    read: &mut Option<ReadFuture>,
    st: &mut State,
    retry_at: &mut Instant,
    backoff: &mut Backoff,
    e: &redis::RedisError,
) {
    tracing::warn!(error = %e, "redis stream: connection lost or command failed; reconnecting");
    ctx.metrics.error("connection", "source");
    ctx.health.set_external(false);
    ctx.metrics.external_connected.set(0);
    *conns = None;
    *read = None;
    st.epoch += 1;
    st.cursor = Cursor::Pending(st.floor());
    *retry_at = Instant::now() + backoff.next_delay();
}

async fn connect(client: &redis::Client, s: &Settings) -> redis::RedisResult<Conns> {
    let cfg = connection_config();
    let read = client.get_multiplexed_async_connection_with_config(&cfg).await?;
    let mut ctl = client.get_multiplexed_async_connection_with_config(&cfg).await?;
    let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&s.key)
        .arg(&s.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut ctl)
        .await;
    match created {
        Ok(_) => tracing::info!(key = %s.key, group = %s.group, "consumer group created"),
        Err(e) if e.code() == Some("BUSYGROUP") => {}
        Err(e) => return Err(e),
    }
    Ok(Conns { read, ctl })
}

fn start_read(mut conn: MultiplexedConnection, s: &Settings, epoch: u64, cursor: Cursor) -> ReadFuture {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(&s.group).arg(&s.consumer).arg("COUNT").arg(COUNT);
    match cursor {
        Cursor::New => {
            cmd.arg("BLOCK").arg(BLOCK_MS).arg("STREAMS").arg(&s.key).arg(">");
        }
        Cursor::Pending(id) => {
            cmd.arg("STREAMS").arg(&s.key).arg(id.to_string());
        }
    }
    Box::pin(async move {
        let r = cmd.query_async::<Value>(&mut conn).await;
        (epoch, cursor, r)
    })
}

/// Turns a read into records (and acks), advancing the cursor.
fn accept(
    st: &mut State,
    s: &Settings,
    cursor: Cursor,
    entries: Vec<Entry>,
    ctx: &SourceContext,
) -> Result<(), SourceError> {
    if entries.is_empty() {
        // The PEL is exhausted: from now on only new entries.
        st.cursor = Cursor::New;
        return Ok(());
    }
    let mut last = None;
    for e in entries {
        let id =
            EntryId::parse(&e.id).map_err(|err| SourceError::External { system: "redis", message: err.to_string() })?;
        last = Some(id);
        if st.skip_through.is_some_and(|t| id <= t) {
            // Durable in the worker already; a crash lost the XACK.
            st.to_ack.push(e.id);
            continue;
        }
        if st.last_emitted.is_some_and(|l| id <= l) {
            continue;
        }
        let por = id.to_por().map_err(|err| SourceError::External { system: "redis", message: err.to_string() })?;
        let Some(fields) = e.fields else {
            tracing::warn!(id = %e.id, "pending entry was deleted from the stream; acknowledging it");
            ctx.metrics.error("entry_deleted", "source");
            st.to_ack.push(e.id);
            continue;
        };
        let payload = match payload_of(&fields, s.payload_field.as_deref()) {
            Ok(p) => p,
            Err(msg) => {
                tracing::warn!(id = %e.id, error = %msg, "entry skipped");
                ctx.metrics.error("missing_field", "source");
                st.to_ack.push(e.id);
                continue;
            }
        };
        ctx.metrics.messages_total.inc();
        ctx.metrics.bytes_total.inc_by(payload.len() as u64);
        st.last_emitted = Some(id);
        st.unacked.push_back((por, e.id.clone()));
        st.outbox.push(Record { por, key: Some(Bytes::from(e.id)), payload });
    }
    if let (Cursor::Pending(_), Some(l)) = (cursor, last) {
        st.cursor = Cursor::Pending(l);
    }
    Ok(())
}

/// The payload of an entry: `payload_field` when configured, else the only field's value, else a JSON object
/// of all fields (sorted by name, values as UTF-8 text).
pub fn payload_of(fields: &[(Bytes, Bytes)], payload_field: Option<&str>) -> Result<Bytes, String> {
    if let Some(f) = payload_field {
        return fields
            .iter()
            .find(|(k, _)| k.as_ref() == f.as_bytes())
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("entry has no field {f:?}"));
    }
    if let [(_, v)] = fields {
        return Ok(v.clone());
    }
    let object: BTreeMap<String, String> = fields
        .iter()
        .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    serde_json::to_vec(&object).map(Bytes::from).map_err(|e| e.to_string())
}

fn bytes_of(v: &Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        Value::Int(i) => Some(Bytes::from(i.to_string())),
        _ => None,
    }
}

fn parse_entry(v: &Value) -> Result<Entry, String> {
    let Value::Array(parts) = v else {
        return Err(format!("entry is not an array: {v:?}"));
    };
    let id = parts.first().and_then(bytes_of).ok_or_else(|| format!("entry without id: {v:?}"))?;
    let id = String::from_utf8_lossy(&id).into_owned();
    let fields = match parts.get(1) {
        None | Some(Value::Nil) => None,
        Some(Value::Array(kv)) => {
            let mut out = Vec::with_capacity(kv.len() / 2);
            for pair in kv.chunks(2) {
                match pair {
                    [k, v] => out.push((
                        bytes_of(k).ok_or_else(|| format!("bad field name {k:?}"))?,
                        bytes_of(v).ok_or_else(|| format!("bad field value {v:?}"))?,
                    )),
                    _ => return Err(format!("odd field list in entry {id}")),
                }
            }
            Some(out)
        }
        Some(Value::Map(kv)) => {
            let mut out = Vec::with_capacity(kv.len());
            for (k, v) in kv {
                out.push((
                    bytes_of(k).ok_or_else(|| format!("bad field name {k:?}"))?,
                    bytes_of(v).ok_or_else(|| format!("bad field value {v:?}"))?,
                ));
            }
            Some(out)
        }
        Some(other) => return Err(format!("entry {id}: unexpected fields {other:?}")),
    };
    Ok(Entry { id, fields })
}

/// Parses an XREADGROUP reply for one stream (RESP2 array or RESP3 map); nil (a timed-out BLOCK) is empty.
pub fn parse_read_reply(v: Value) -> Result<Vec<Entry>, String> {
    let entries = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => match streams.into_iter().next() {
            None => return Ok(Vec::new()),
            Some(Value::Array(mut kv)) if kv.len() == 2 => kv.swap_remove(1),
            Some(other) => return Err(format!("unexpected stream reply {other:?}")),
        },
        Value::Map(streams) => match streams.into_iter().next() {
            None => return Ok(Vec::new()),
            Some((_, entries)) => entries,
        },
        other => return Err(format!("unexpected XREADGROUP reply {other:?}")),
    };
    match entries {
        Value::Array(list) => list.iter().map(parse_entry).collect(),
        Value::Nil => Ok(Vec::new()),
        other => Err(format!("unexpected entry list {other:?}")),
    }
}

async fn xack(conn: &mut MultiplexedConnection, s: &Settings, ids: &mut Vec<String>) -> redis::RedisResult<()> {
    while !ids.is_empty() {
        let n = ids.len().min(ACK_CHUNK);
        let _: Value = redis::cmd("XACK").arg(&s.key).arg(&s.group).arg(&ids[..n]).query_async(conn).await?;
        ids.drain(..n);
    }
    Ok(())
}

/// Claims idle entries of other consumers with ids from `start` on; returns how many were claimed.
async fn claim(conn: &mut MultiplexedConnection, s: &Settings, start: EntryId) -> redis::RedisResult<usize> {
    let mut next = start.to_string();
    let mut claimed = 0;
    // Bounded: at most 100 pages per round, the next round continues.
    for _ in 0..100 {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&s.key)
            .arg(&s.group)
            .arg(&s.consumer)
            .arg(s.claim_min_idle.as_millis() as u64)
            .arg(&next)
            .arg("COUNT")
            .arg(COUNT)
            .arg("JUSTID")
            .query_async(conn)
            .await?;
        let Value::Array(parts) = reply else {
            return Err(parse_error(format!("XAUTOCLAIM reply {reply:?}")));
        };
        let cursor = parts.first().and_then(bytes_of).map(|b| String::from_utf8_lossy(&b).into_owned());
        if let Some(Value::Array(ids)) = parts.get(1) {
            claimed += ids.len();
        }
        match cursor {
            Some(c) if c != "0-0" => next = c,
            _ => break,
        }
    }
    Ok(claimed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_resp2_read_reply_with_deleted_entry() {
        let v = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("f"), bulk("v")])]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let e = parse_read_reply(v).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].id, "1-0");
        assert_eq!(e[0].fields.as_ref().unwrap()[0], (Bytes::from("f"), Bytes::from("v")));
        assert_eq!(e[1].fields, None);
        assert!(parse_read_reply(Value::Nil).unwrap().is_empty());
        assert!(parse_read_reply(Value::Int(3)).is_err());
    }

    #[test]
    fn payload_rules() {
        let one = vec![(Bytes::from("data"), Bytes::from("\x00x"))];
        assert_eq!(payload_of(&one, None).unwrap(), Bytes::from("\x00x"));
        let two = vec![(Bytes::from("b"), Bytes::from("2")), (Bytes::from("a"), Bytes::from("1"))];
        assert_eq!(payload_of(&two, None).unwrap(), Bytes::from(r#"{"a":"1","b":"2"}"#));
        assert_eq!(payload_of(&two, Some("b")).unwrap(), Bytes::from("2"));
        assert!(payload_of(&two, Some("c")).unwrap_err().contains("\"c\""));
    }
}
