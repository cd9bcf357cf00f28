//! One task per running shard: GetRecords in a loop, records to the runtime, End when the shard is closed and
//! read to its last record.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::por::{PorClock, resume_ms, seq_cmp};
use crate::aws::classify;
use crate::runtime::source_api::{Emit, Record, SourceError};
use crate::runtime::{Health, Metrics};

/// Unacknowledged points of reference of one shard and their sequence numbers (bounded).
pub type SeqMap = Arc<Mutex<BTreeMap<u64, String>>>;
/// Shard id -> EndingSequenceNumber for closed shards, refreshed by discovery (emulators that never end an
/// iterator need it to see the end of a closed shard).
pub type Closed = Arc<RwLock<HashMap<String, String>>>;

/// Bound of a [`SeqMap`]; beyond it the oldest entries go (a resume then recounts from the timestamp).
pub const SEQ_MAP_MAX: usize = 200_000;
/// Records per GetRecords call (the API maximum).
const GET_LIMIT: i32 = 10_000;

/// Where a reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    TrimHorizon,
    Latest,
    /// At a record we know: the first one read after a LATEST start, when the worker rewinds to the beginning
    /// before acknowledging anything (LATEST again would skip what was read since).
    AtSequence(String),
    /// Exactly after a record we know (from the [`SeqMap`]); the clock continues after `por`.
    AfterSequence {
        seq: String,
        por: u64,
    },
    /// After `por`, recounted from its timestamp.
    AfterPor(u64),
}

pub struct Reader {
    pub client: Client,
    pub stream_name: String,
    pub shard: String,
    pub stream: u64,
    pub generation: u64,
    pub start: StartAt,
    pub emit: mpsc::Sender<Emit>,
    pub seqs: SeqMap,
    pub closed: Closed,
    pub poll: Duration,
    pub health: Health,
    pub metrics: Metrics,
}

fn transient(what: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::External { system: "kinesis", message: format!("{what}: {e}") }
}

impl Reader {
    async fn iterator(&self, start: &StartAt) -> Result<Option<String>, (bool, SourceError)> {
        let req = self.client.get_shard_iterator().stream_name(&self.stream_name).shard_id(&self.shard);
        let req = match start {
            StartAt::TrimHorizon => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            StartAt::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
            StartAt::AtSequence(seq) => {
                req.shard_iterator_type(ShardIteratorType::AtSequenceNumber).starting_sequence_number(seq)
            }
            StartAt::AfterSequence { seq, .. } => {
                req.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).starting_sequence_number(seq)
            }
            StartAt::AfterPor(p) => req
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from_millis(resume_ms(*p) as i64)),
        };
        match req.send().await {
            Ok(out) => Ok(out.shard_iterator),
            Err(e) => {
                let c = classify(&format!("GetShardIterator {}", self.shard), &e);
                Err((c.permanent, transient("GetShardIterator", c.message)))
            }
        }
    }

    /// Reads until the shard ends (then sends End) or the task is aborted.
    pub async fn run(self) -> Result<(), SourceError> {
        let mut clock = match &self.start {
            StartAt::AfterSequence { por, .. } => PorClock::after(*por),
            _ => PorClock::default(),
        };
        // Recounting after a restart: records up to this point were delivered before.
        let skip_through = match &self.start {
            StartAt::AfterPor(p) => Some(*p),
            _ => None,
        };
        let mut last_seq: Option<String> = match &self.start {
            StartAt::AfterSequence { seq, .. } => Some(seq.clone()),
            _ => None,
        };
        let mut backoff = Duration::from_millis(200);
        let mut iterator: Option<String> = None;
        loop {
            let it = match iterator.take() {
                Some(it) => it,
                None => {
                    // (Re)position: at the start, or after the last record seen when an iterator expired.
                    let start = match &last_seq {
                        Some(seq) => StartAt::AfterSequence { seq: seq.clone(), por: 0 },
                        None => self.start.clone(),
                    };
                    match self.iterator(&start).await {
                        Ok(Some(it)) => it,
                        Ok(None) => return self.end().await,
                        Err((permanent, e)) => {
                            self.metrics.error(if permanent { "permanent" } else { "transient" }, "get_shard_iterator");
                            if permanent {
                                return Err(e);
                            }
                            self.health.set_external(false);
                            tracing::warn!(shard = %self.shard, error = %e, "retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                            continue;
                        }
                    }
                }
            };
            let out = match self.client.get_records().shard_iterator(&it).limit(GET_LIMIT).send().await {
                Ok(out) => out,
                Err(e) => {
                    let c = classify(&format!("GetRecords {}", self.shard), &e);
                    self.metrics.error(if c.permanent { "permanent" } else { "transient" }, "get_records");
                    match c.code.as_deref() {
                        // The iterator is older than 5 minutes: get a new one after the last record seen.
                        Some("ExpiredIteratorException") => {}
                        _ if c.permanent => return Err(transient("GetRecords", c.message)),
                        _ => {
                            if !matches!(c.code.as_deref(), Some("ProvisionedThroughputExceededException")) {
                                self.health.set_external(false);
                            }
                            tracing::info!(shard = %self.shard, error = %c.message, "GetRecords failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                            iterator = Some(it);
                        }
                    }
                    continue;
                }
            };
            self.health.set_external(true);
            backoff = Duration::from_millis(200);
            let got = out.records.len();
            let mut batch = Vec::with_capacity(got);
            let mut new_seqs = Vec::with_capacity(got);
            for r in out.records {
                let ms = r.approximate_arrival_timestamp.as_ref().and_then(|t| t.to_millis().ok()).unwrap_or(0).max(0)
                    as u64;
                let por = clock.next(ms);
                last_seq = Some(r.sequence_number.clone());
                if skip_through.is_some_and(|p| por <= p) {
                    continue;
                }
                new_seqs.push((por, r.sequence_number));
                batch.push(Record {
                    por,
                    key: r.partition_key.map(|k| Bytes::from(k.into_bytes())),
                    payload: Bytes::from(r.data.into_inner()),
                });
            }
            if !batch.is_empty() {
                self.remember(new_seqs);
                self.emit
                    .send(Emit::Records { stream: self.stream, generation: self.generation, records: batch })
                    .await
                    .map_err(|_| SourceError::RuntimeGone)?;
            }
            let behind = out.millis_behind_latest.unwrap_or(0);
            let Some(next) = out.next_shard_iterator else {
                return self.end().await;
            };
            if got == 0 && behind == 0 && self.closed_and_read(last_seq.as_deref()) {
                return self.end().await;
            }
            iterator = Some(next);
            // Catching up: go on at once. At the tip: wait, within the 5 reads/s per shard Kinesis allows.
            if got == 0 || behind == 0 {
                tokio::time::sleep(self.poll).await;
            }
        }
    }

    /// The shard is closed and everything up to its last record was read.
    fn closed_and_read(&self, last_seq: Option<&str>) -> bool {
        let closed = match self.closed.read() {
            Ok(c) => c.get(&self.shard).cloned(),
            Err(p) => p.into_inner().get(&self.shard).cloned(),
        };
        match (closed, last_seq) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(ending), Some(last)) => seq_cmp(last, &ending) != std::cmp::Ordering::Less,
        }
    }

    fn remember(&self, entries: Vec<(u64, String)>) {
        let mut m = match self.seqs.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.extend(entries);
        while m.len() > SEQ_MAP_MAX {
            m.pop_first();
        }
    }

    async fn end(&self) -> Result<(), SourceError> {
        tracing::info!(shard = %self.shard, "shard closed and read to its end");
        self.emit
            .send(Emit::End { stream: self.stream, generation: self.generation })
            .await
            .map_err(|_| SourceError::RuntimeGone)
    }
}
