//! `sink.redisHash`: `HSET <key> <message key> <message value>` (upstream `redis_hash_sink`), exactly once
//! as far as Redis persistence goes. See `docs/redis-hash-sink.md`.
//!
//! Per worker and target hash, three Redis keys ([`Keys`]):
//! - `wallaroo:stage:<key>:<worker>`: the pairs of the prepared round, one string ([`encode_stage`]),
//! - `wallaroo:txn:<key>:<worker>`: the pending marker (`id`, `start`, `end`) of a round that voted commit,
//! - `wallaroo:offset:<key>:<worker>`: the end offset of the last committed round.
//!
//! Rounds are buffered in memory while staged. Phase 1 writes the staging blob and the marker in one
//! MULTI/EXEC (so both exist or neither). Phase 2 runs one Lua script that checks the marker, applies the
//! round to the target (from the pairs the sidecar sends along, or, after a restart, from the staging blob),
//! sets the offset and deletes staging and marker; it does nothing if the marker is gone or names another
//! transaction, which makes it idempotent. Abort deletes staging and marker.
//!
//! Why a blob rather than a staging hash: Phase 1 then costs Redis one memory copy, and the common Phase 2
//! applies the pairs with multi-field HSETs, so the 2PC round costs little more than the writes themselves.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use wallaroo_crds::{PayloadMapping, RedisHashSink as RedisHashSinkConfig};

use crate::runtime::sink_api::{Guarantee, Recovery, SinkError, SinkIntegration, SinkRecord, Txn};
use crate::runtime::{Health, Metrics};
use crate::sinks::payload;

/// Phase 2: KEYS = target, stage, txn marker, offset; ARGV = txn id, end offset, then either the round's
/// field/value pairs (the sidecar still holds the round) or nothing (after a restart: decode the staged blob).
/// Returns 1 when applied, 0 when already applied (marker gone, offset at or past end), -1 when there is
/// nothing prepared for this transaction.
const COMMIT_SCRIPT: &str = r#"
local id = redis.call('HGET', KEYS[3], 'id')
if id ~= ARGV[1] then
  local committed = tonumber(redis.call('GET', KEYS[4]) or '0')
  if committed >= tonumber(ARGV[2]) then return 0 end
  return -1
end
local chunk = 2000
if #ARGV > 2 then
  for i = 3, #ARGV, chunk do
    redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + chunk - 1, #ARGV)))
  end
else
  local blob = redis.call('GET', KEYS[2]) or ''
  local pos = 1
  local pairs = {}
  while pos <= #blob do
    local klen, vlen
    klen, pos = struct.unpack('>I4', blob, pos)
    pairs[#pairs + 1] = string.sub(blob, pos, pos + klen - 1)
    pos = pos + klen
    vlen, pos = struct.unpack('>I4', blob, pos)
    pairs[#pairs + 1] = string.sub(blob, pos, pos + vlen - 1)
    pos = pos + vlen
    if #pairs >= chunk then
      redis.call('HSET', KEYS[1], unpack(pairs))
      pairs = {}
    end
  end
  if #pairs > 0 then redis.call('HSET', KEYS[1], unpack(pairs)) end
end
redis.call('SET', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"#;

/// The staged round as one blob: per pair, u32 big-endian length and bytes of the field, then of the value.
pub fn encode_stage(pairs: &[(Bytes, Bytes)]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(pairs.iter().map(|(k, v)| 8 + k.len() + v.len()).sum());
    for (k, v) in pairs {
        blob.extend_from_slice(&(k.len() as u32).to_be_bytes());
        blob.extend_from_slice(k);
        blob.extend_from_slice(&(v.len() as u32).to_be_bytes());
        blob.extend_from_slice(v);
    }
    blob
}

/// The Redis keys the sink keeps for one worker writing one hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub target: String,
    pub stage: String,
    pub txn: String,
    pub offset: String,
}

impl Keys {
    pub fn new(target: &str, worker: &str) -> Self {
        Self {
            target: target.to_string(),
            stage: format!("wallaroo:stage:{target}:{worker}"),
            txn: format!("wallaroo:txn:{target}:{worker}"),
            offset: format!("wallaroo:offset:{target}:{worker}"),
        }
    }
}

/// The open round of one worker: (offset, field, value) in arrival order.
#[derive(Default)]
struct Round {
    entries: Vec<(u64, Bytes, Bytes)>,
    /// Offset just past the last staged message.
    end: u64,
    /// The round that passed Phase 1 (txn id and its pairs), for a Phase 2 that ships the pairs itself.
    prepared: Option<(Bytes, Vec<(Bytes, Bytes)>)>,
}

pub struct RedisHashSink {
    key: String,
    mapping: PayloadMapping,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    rounds: Mutex<HashMap<String, Round>>,
    script: redis::Script,
    health: Health,
    metrics: Metrics,
}

fn transient(e: redis::RedisError) -> SinkError {
    SinkError::Transient(format!("redis: {e}"))
}

/// Server replies that retrying cannot fix (a wrong key type, a script error, no permission) are permanent.
fn classify(e: redis::RedisError) -> SinkError {
    let permanent =
        matches!(e.code(), Some("WRONGTYPE" | "NOPERM" | "NOSCRIPT" | "ERR")) || e.to_string().contains("WRONGTYPE");
    if permanent { SinkError::Permanent(format!("redis: {e}")) } else { transient(e) }
}

impl RedisHashSink {
    /// Opens the client and tries a first connection; an unreachable Redis is not fatal (the runtime retries).
    pub async fn connect(cfg: RedisHashSinkConfig, health: Health, metrics: Metrics) -> Result<Self, SinkError> {
        let url = crate::sources::redis::resolve_url(&cfg.url, &cfg.url_from, "spec.sink.redisHash.url")
            .map_err(SinkError::Permanent)?;
        let client = redis::Client::open(url.as_str())
            .map_err(|e| SinkError::Permanent(format!("spec.sink.redisHash.url: {e}")))?;
        let sink = Self {
            key: cfg.key.clone(),
            mapping: cfg.mapping(),
            client,
            conn: tokio::sync::Mutex::new(None),
            rounds: Mutex::new(HashMap::new()),
            script: redis::Script::new(COMMIT_SCRIPT),
            health,
            metrics,
        };
        if let Err(e) = sink.conn().await {
            tracing::warn!(error = %e, "redis not reachable yet; will retry on the first transaction");
        }
        Ok(sink)
    }

    async fn conn(&self) -> Result<MultiplexedConnection, SinkError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(60)));
        match self.client.get_multiplexed_async_connection_with_config(&cfg).await {
            Ok(c) => {
                self.health.set_external(true);
                self.metrics.external_connected.set(1);
                *guard = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                self.lost();
                Err(transient(e))
            }
        }
    }

    fn lost(&self) {
        self.health.set_external(false);
        self.metrics.external_connected.set(0);
    }

    /// Maps an error, forgetting the connection when it is the connection that failed.
    async fn fail(&self, e: redis::RedisError) -> SinkError {
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
            *self.conn.lock().await = None;
            self.lost();
            self.metrics.error("connection", "sink");
            return transient(e);
        }
        classify(e)
    }

    fn keys(&self, worker: &str) -> Keys {
        Keys::new(&self.key, worker)
    }
}

fn unknown(worker: &str) -> SinkError {
    SinkError::Permanent(format!("unknown worker {worker}: stage before recover"))
}

#[async_trait::async_trait]
impl SinkIntegration for RedisHashSink {
    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }

    async fn recover(&self, worker: &str) -> Result<Recovery, SinkError> {
        let keys = self.keys(worker);
        let mut conn = self.conn().await?;
        let (offset, marker): (Option<u64>, (Option<String>, Option<u64>, Option<u64>)) = match redis::pipe()
            .get(&keys.offset)
            .cmd("HMGET")
            .arg(&keys.txn)
            .arg(&["id", "start", "end"])
            .query_async(&mut conn)
            .await
        {
            Ok(v) => v,
            Err(e) => return Err(self.fail(e).await),
        };
        let committed = offset.unwrap_or(0);
        let pending = match marker {
            (Some(id), Some(start), Some(end)) => Some(Txn { id: Bytes::from(id), start, end }),
            _ => None,
        };
        let end = pending.as_ref().map_or(committed, |p| p.end);
        self.rounds
            .lock()
            .map_err(|_| SinkError::Permanent("poisoned state".into()))?
            .insert(worker.to_string(), Round { entries: Vec::new(), end, prepared: None });
        tracing::info!(worker, committed, pending = ?pending.as_ref().map(|t| t.id_str()), "redis hash sink recovered");
        Ok(Recovery { committed: Some(committed), pending })
    }

    async fn stage(&self, worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        let Some(first) = records.first().map(|r| r.offset) else {
            return Ok(());
        };
        // Parse first (no lock held), so a bad payload fails the whole call before anything is kept.
        let mut parsed = Vec::with_capacity(records.len());
        for r in &records {
            let (k, v) = payload::split_bytes(&self.mapping, &r.payload)
                .map_err(|e| SinkError::Permanent(format!("message at offset {}: {e}", r.offset)))?;
            let k = k.ok_or_else(|| {
                SinkError::Permanent("the payload format gives no key: use lengthPrefixed or json with keyField".into())
            })?;
            parsed.push((r.offset, r.offset + r.payload.len() as u64, k, v));
        }
        let mut rounds = self.rounds.lock().map_err(|_| SinkError::Permanent("poisoned state".into()))?;
        let round = rounds.get_mut(worker).ok_or_else(|| unknown(worker))?;
        if first != round.end {
            // Leftovers of a round aborted without our abort being called: keep only what precedes `first`.
            round.entries.retain(|(o, _, _)| *o < first);
        }
        for (offset, end, k, v) in parsed {
            round.entries.push((offset, k, v));
            round.end = end;
        }
        Ok(())
    }

    async fn prepare(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let started = Instant::now();
        let keys = self.keys(worker);
        let entries: Vec<(Bytes, Bytes)> = {
            let rounds = self.rounds.lock().map_err(|_| SinkError::Permanent("poisoned state".into()))?;
            let round = rounds.get(worker).ok_or_else(|| unknown(worker))?;
            if round.end != txn.end {
                return Err(SinkError::Permanent(format!(
                    "staged messages end at offset {}, transaction ends at {}",
                    round.end, txn.end
                )));
            }
            round.entries.iter().filter(|(o, _, _)| *o >= txn.start).map(|(_, k, v)| (k.clone(), v.clone())).collect()
        };
        let mut conn = self.conn().await?;
        // A target that is not a hash would fail Phase 2: refuse now so the worker aborts instead.
        let kind: String = match redis::cmd("TYPE").arg(&keys.target).query_async(&mut conn).await {
            Ok(k) => k,
            Err(e) => return Err(self.fail(e).await),
        };
        if kind != "hash" && kind != "none" {
            return Err(SinkError::Permanent(format!("WRONGTYPE: key {:?} holds a {kind}, not a hash", keys.target)));
        }
        // Staging and marker in one MULTI/EXEC: both exist or neither.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set(&keys.stage, encode_stage(&entries))
            .ignore()
            .del(&keys.txn)
            .ignore()
            .hset_multiple(
                &keys.txn,
                &[("id", txn.id_str()), ("start", txn.start.to_string()), ("end", txn.end.to_string())],
            )
            .ignore();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            return Err(self.fail(e).await);
        }
        if let Ok(mut rounds) = self.rounds.lock()
            && let Some(round) = rounds.get_mut(worker)
        {
            round.prepared = Some((txn.id.clone(), entries));
        }
        self.metrics.observe("prepare", started);
        Ok(())
    }

    async fn commit(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let started = Instant::now();
        let keys = self.keys(worker);
        // The pairs of the round when this process prepared it; none after a restart (the script then reads
        // the staged blob).
        let pairs = self.rounds.lock().ok().and_then(|mut rounds| {
            let round = rounds.get_mut(worker)?;
            match round.prepared.take() {
                Some((id, pairs)) if id == txn.id => Some(pairs),
                _ => None,
            }
        });
        let mut conn = self.conn().await?;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&keys.target)
            .key(&keys.stage)
            .key(&keys.txn)
            .key(&keys.offset)
            .arg(txn.id.as_ref())
            .arg(txn.end);
        for (k, v) in pairs.iter().flatten() {
            invocation.arg(k.as_ref()).arg(v.as_ref());
        }
        let r: i64 = match invocation.invoke_async(&mut conn).await {
            Ok(r) => r,
            Err(e) => return Err(self.fail(e).await),
        };
        if r < 0 {
            return Err(SinkError::Permanent(format!("nothing prepared for transaction {}", txn.id_str())));
        }
        if let Ok(mut rounds) = self.rounds.lock()
            && let Some(round) = rounds.get_mut(worker)
        {
            round.entries.retain(|(o, _, _)| *o >= txn.end);
        }
        self.metrics.observe("commit", started);
        Ok(())
    }

    async fn abort(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let keys = self.keys(worker);
        let mut conn = self.conn().await?;
        if let Err(e) = redis::cmd("DEL").arg(&keys.stage).arg(&keys.txn).query_async::<Value>(&mut conn).await {
            return Err(self.fail(e).await);
        }
        if let Ok(mut rounds) = self.rounds.lock()
            && let Some(round) = rounds.get_mut(worker)
        {
            round.entries.retain(|(o, _, _)| *o < txn.start);
            round.end = txn.start;
            round.prepared = None;
        }
        Ok(())
    }

    async fn forget(&self, worker: &str) -> Result<(), SinkError> {
        let keys = self.keys(worker);
        let mut conn = self.conn().await?;
        if let Err(e) =
            redis::cmd("DEL").arg(&keys.stage).arg(&keys.txn).arg(&keys.offset).query_async::<Value>(&mut conn).await
        {
            return Err(self.fail(e).await);
        }
        if let Ok(mut rounds) = self.rounds.lock() {
            rounds.remove(worker);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_per_target_and_worker() {
        let k = Keys::new("h", "w1");
        assert_eq!(k.stage, "wallaroo:stage:h:w1");
        assert_eq!(k.txn, "wallaroo:txn:h:w1");
        assert_eq!(k.offset, "wallaroo:offset:h:w1");
        assert_ne!(Keys::new("h", "w2").offset, k.offset);
    }
}
