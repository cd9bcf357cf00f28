//! `sink.kinesis`: each message becomes one Kinesis record (upstream kinesis_sink did `put_record` per message),
//! sent with PutRecords in batches of at most 500 records / 5 MiB. Records that Kinesis refuses individually
//! (`FailedRecordCount`, per-record `ErrorCode`, e.g. throttling) are sent again with backoff. Phase 1 votes
//! commit only once every staged record is acknowledged by Kinesis, so the guarantee is at-least-once: a round
//! that aborts after some of its records reached Kinesis is replayed, and those records appear twice.
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tokio::sync::Mutex;
use wallaroo_crds::{KinesisSink as KinesisSinkConfig, PayloadMapping};

use crate::aws::{AwsSettings, classify, sdk_config};
use crate::runtime::Health;
use crate::runtime::sink_api::{Guarantee, Recovery, SinkError, SinkIntegration, SinkRecord, Txn};
use crate::sinks::payload;

pub mod batch;

use batch::{MAX_RECORD_BYTES, Outgoing, next_batch_len, partition_key};

/// Attempts for records Kinesis refused individually, within one stage/prepare call; after that the call fails
/// as transient and the runtime retries it (the refused records stay queued).
const RECORD_ATTEMPTS: u32 = 8;

pub struct KinesisSink {
    client: Client,
    stream: String,
    mapping: PayloadMapping,
    health: Health,
    /// Per worker: records staged but not yet acknowledged by Kinesis, in order.
    queues: std::sync::Mutex<HashMap<String, Arc<Mutex<VecDeque<Outgoing>>>>>,
}

impl KinesisSink {
    pub async fn connect(cfg: KinesisSinkConfig, health: Health) -> Result<Self, SinkError> {
        let settings = AwsSettings {
            base: "spec.sink.kinesis",
            region: &cfg.region,
            endpoint: cfg.endpoint.as_deref(),
            access_key_id_from: &cfg.access_key_id_from,
            secret_access_key_from: &cfg.secret_access_key_from,
        };
        let shared = sdk_config(&settings).await.map_err(SinkError::Permanent)?;
        let client = Client::new(&shared);
        match client.describe_stream_summary().stream_name(&cfg.stream).send().await {
            Ok(_) => {
                health.set_external(true);
                tracing::info!(stream = %cfg.stream, "Kinesis stream reachable");
            }
            Err(e) => {
                health.set_external(false);
                tracing::warn!(stream = %cfg.stream, error = %classify("DescribeStreamSummary", &e).message, "Kinesis stream not usable yet; rounds will vote abort until it is");
            }
        }
        Ok(Self {
            client,
            stream: cfg.stream.clone(),
            mapping: cfg.mapping(),
            health,
            queues: std::sync::Mutex::new(HashMap::new()),
        })
    }

    fn queue(&self, worker: &str) -> Arc<Mutex<VecDeque<Outgoing>>> {
        let mut map = match self.queues.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.entry(worker.to_string()).or_default().clone()
    }

    /// Sends queued records until the queue is empty (`all`) or holds less than one full batch. Acknowledged
    /// records leave the queue; refused ones stay at the front, in order, and are retried with backoff.
    async fn drain(&self, q: &mut VecDeque<Outgoing>, all: bool) -> Result<(), SinkError> {
        let mut refused_rounds = 0u32;
        let mut delay = Duration::from_millis(100);
        loop {
            let n = next_batch_len(q.iter());
            if n == 0 || (!all && n == q.len() && n < batch::MAX_RECORDS) {
                return Ok(());
            }
            let entries = q
                .iter()
                .take(n)
                .map(|r| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&r.partition_key)
                        .data(Blob::new(r.data.to_vec()))
                        .build()
                        .map_err(|e| SinkError::Permanent(format!("PutRecords entry: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = match self.client.put_records().stream_name(&self.stream).set_records(Some(entries)).send().await
            {
                Ok(out) => out,
                Err(e) => {
                    let c = classify(&format!("PutRecords to {}", self.stream), &e);
                    if matches!(
                        e,
                        aws_sdk_kinesis::error::SdkError::DispatchFailure(_)
                            | aws_sdk_kinesis::error::SdkError::TimeoutError(_)
                    ) {
                        self.health.set_external(false);
                    }
                    return Err(if c.permanent {
                        SinkError::Permanent(c.message)
                    } else {
                        SinkError::Transient(c.message)
                    });
                }
            };
            self.health.set_external(true);
            let results = out.records();
            if results.len() != n {
                return Err(SinkError::Transient(format!(
                    "PutRecords answered {} results for {n} records",
                    results.len()
                )));
            }
            // Keep refused records (in order) at the front; drop acknowledged ones.
            let sent: Vec<Outgoing> = q.drain(..n).collect();
            let mut refused = Vec::new();
            let mut first_error = None;
            for (r, res) in sent.into_iter().zip(results) {
                if let Some(code) = res.error_code() {
                    first_error.get_or_insert_with(|| format!("{code}: {}", res.error_message().unwrap_or("")));
                    refused.push(r);
                }
            }
            if refused.is_empty() {
                refused_rounds = 0;
                delay = Duration::from_millis(100);
                continue;
            }
            let count = refused.len();
            for r in refused.into_iter().rev() {
                q.push_front(r);
            }
            refused_rounds += 1;
            let error = first_error.unwrap_or_default();
            if refused_rounds >= RECORD_ATTEMPTS {
                return Err(SinkError::Transient(format!(
                    "Kinesis refused {count} records {refused_rounds} times; last: {error}"
                )));
            }
            tracing::info!(stream = %self.stream, refused = count, attempt = refused_rounds, %error, "retrying refused records");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

#[async_trait::async_trait]
impl SinkIntegration for KinesisSink {
    fn guarantee(&self) -> Guarantee {
        Guarantee::AtLeastOnce
    }

    async fn recover(&self, worker: &str) -> Result<Recovery, SinkError> {
        // Nothing is held back: the worker's own offset is the truth. Drop what an old connection left queued.
        self.queue(worker).lock().await.clear();
        Ok(Recovery { committed: None, pending: None })
    }

    async fn stage(&self, worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        let queue = self.queue(worker);
        let mut q = queue.lock().await;
        for r in records {
            let (key, value) = payload::split_bytes(&self.mapping, &r.payload)
                .map_err(|e| SinkError::Permanent(format!("message at offset {}: {e}", r.offset)))?;
            let out = Outgoing { partition_key: partition_key(key.as_deref(), &r.payload), data: value };
            if out.size() > MAX_RECORD_BYTES {
                return Err(SinkError::Permanent(format!(
                    "message at offset {} is {} bytes with its partition key; Kinesis takes at most {MAX_RECORD_BYTES}",
                    r.offset,
                    out.size()
                )));
            }
            q.push_back(out);
        }
        // Full batches go out now, so Phase 1 only waits for the tail.
        self.drain(&mut q, false).await
    }

    async fn prepare(&self, worker: &str, _txn: &Txn) -> Result<(), SinkError> {
        let queue = self.queue(worker);
        let mut q = queue.lock().await;
        self.drain(&mut q, true).await
    }

    async fn commit(&self, _worker: &str, _txn: &Txn) -> Result<(), SinkError> {
        Ok(())
    }

    async fn abort(&self, worker: &str, _txn: &Txn) -> Result<(), SinkError> {
        // Records already acknowledged by Kinesis stay there (at-least-once); the rest is dropped and replayed.
        self.queue(worker).lock().await.clear();
        Ok(())
    }

    async fn forget(&self, worker: &str) -> Result<(), SinkError> {
        let mut map = match self.queues.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.remove(worker);
        Ok(())
    }
}
