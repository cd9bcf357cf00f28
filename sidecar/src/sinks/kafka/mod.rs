//! `sink.kafka`: every message of a worker's output becomes one Kafka record in `topic` (key and value from the
//! payload per `format`/`keyField`/`valueField`), produced by an idempotent producer (`acks=all`).
//!
//! - Default (at-least-once): records are produced as they are staged; Phase 1 votes commit only once every
//!   record of the round is acknowledged by the broker. Phase 2 is a no-op, so the records of a round that is
//!   aborted after they were produced stay visible (a replay writes them again).
//! - `transactional: true` (exactly-once for read_committed consumers): one Kafka transaction per round, with a
//!   stable `transactional.id` per worker (`<prefix>-<worker>`, prefix `properties.transactional.id` or
//!   `wallaroo-<topic>`); Phase 2 commits or aborts it. The producer of a worker outlives its connections:
//!   a transaction that voted commit stays open across a reconnect of the worker and `recover` reports it,
//!   so the worker's Phase 2 commits it (within the producer's `transaction.timeout.ms`, after which the
//!   broker aborts it). It is lost if the sidecar process dies before Phase 2: a Kafka transaction cannot
//!   outlive its producer, and the next instance's `init_transactions` aborts it.
//!
//! The round logic is [`txn::Round`], tested against a fake [`txn::TxnProducer`]; [`producer`] is librdkafka.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::Producer;
use tokio::sync::Mutex;
use wallaroo_crds::{KafkaSink as KafkaSinkConfig, PayloadMapping};

use crate::runtime::sink_api::{Guarantee, Recovery, SinkError, SinkIntegration, SinkRecord, Txn};
use crate::runtime::{Health, Metrics};
use crate::sinks::payload;
use crate::sources::kafka::client_config;

pub mod producer;
pub mod txn;

use producer::{Rd, RdProducer};
use txn::Round;

/// Properties this sink sets itself.
const RESERVED: &[&str] = &["enable.idempotence", "acks", "bootstrap.servers"];

pub struct KafkaSink {
    cfg: KafkaSinkConfig,
    mapping: PayloadMapping,
    client: ClientConfig,
    /// The shared producer (non-transactional mode).
    shared: Option<Rd>,
    /// `transactional.id` prefix (transactional mode).
    txn_prefix: String,
    health: Health,
    metrics: Metrics,
    workers: Mutex<HashMap<String, Arc<Mutex<Round<RdProducer>>>>>,
}

impl KafkaSink {
    /// Builds the producer and checks that the cluster answers (it may not yet: readiness says so).
    pub async fn connect(cfg: KafkaSinkConfig, health: Health, metrics: Metrics) -> Result<Self, SinkError> {
        let field = "spec.sink.kafka";
        client_config::check_reserved(field, &cfg.properties, RESERVED).map_err(SinkError::Permanent)?;
        let mut client = client_config::base_config(&client_config::Connection {
            field,
            brokers: &cfg.brokers,
            properties: &cfg.properties,
            sasl_mechanism: cfg.sasl_mechanism.as_deref(),
            sasl_username: cfg.sasl_username.as_deref(),
            sasl_password_from: cfg.sasl_password_from.as_ref(),
        })
        .map_err(SinkError::Permanent)?;
        client.set("enable.idempotence", "true").set("acks", "all");
        // A stable prefix: the same worker gets the same transactional.id after a restart, which fences the
        // old instance and aborts what it left open.
        let txn_prefix =
            client.get("transactional.id").map_or_else(|| format!("wallaroo-{}", cfg.topic), str::to_string);
        // A plain (non-transactional) client: the shared producer, or only a health probe in transactional mode.
        let mut plain_cfg = client.clone();
        plain_cfg.remove("transactional.id");
        let plain = producer::create(&plain_cfg, health.clone(), metrics.clone())?;
        probe(&plain, &cfg.topic, &health, &metrics).await;
        if !health.external() {
            tracing::warn!(brokers = ?cfg.brokers, "the Kafka cluster does not answer yet; not ready until it does");
        }
        watch_health(plain.clone(), cfg.topic.clone(), health.clone(), metrics.clone());
        let shared = if cfg.transactional { None } else { Some(plain) };
        let mapping = cfg.mapping();
        Ok(Self { cfg, mapping, client, shared, txn_prefix, health, metrics, workers: Mutex::new(HashMap::new()) })
    }

    fn producer_for(&self, worker: &str) -> Result<RdProducer, SinkError> {
        let topic: Arc<str> = Arc::from(self.cfg.topic.as_str());
        match &self.shared {
            Some(p) => Ok(RdProducer::shared(p.clone(), topic, self.health.clone(), self.metrics.clone())),
            None => {
                let mut c = self.client.clone();
                c.set("transactional.id", transactional_id(&self.txn_prefix, worker));
                RdProducer::transactional(c, topic, self.health.clone(), self.metrics.clone())
            }
        }
    }

    async fn round(&self, worker: &str) -> Result<Arc<Mutex<Round<RdProducer>>>, SinkError> {
        let mut w = self.workers.lock().await;
        if let Some(r) = w.get(worker) {
            return Ok(r.clone());
        }
        let r = Arc::new(Mutex::new(Round::new(self.producer_for(worker)?)));
        w.insert(worker.to_string(), r.clone());
        Ok(r)
    }
}

/// The `transactional.id` of one worker: stable across restarts, one per worker.
pub fn transactional_id(prefix: &str, worker: &str) -> String {
    format!("{prefix}-{worker}")
}

async fn probe(p: &Rd, topic: &str, health: &Health, metrics: &Metrics) {
    let p = p.clone();
    let topic = topic.to_string();
    let ok = tokio::task::spawn_blocking(move || p.client().fetch_metadata(Some(&topic), Duration::from_secs(5)))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    if !ok {
        tracing::debug!("the Kafka cluster does not answer; not ready until it does");
    } else if !health.external() {
        tracing::info!("the Kafka cluster answers");
    }
    health.set_external(ok);
    metrics.external_connected.set(i64::from(ok));
}

/// While the cluster is marked unreachable, asks it for metadata every two seconds so `/readyz` recovers even
/// when no records flow. Runs for the life of the process (one metadata request per 2 s, only while down).
fn watch_health(p: Rd, topic: String, health: Health, metrics: Metrics) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !health.external() {
                probe(&p, &topic, &health, &metrics).await;
            }
        }
    });
}

#[async_trait::async_trait]
impl SinkIntegration for KafkaSink {
    fn guarantee(&self) -> Guarantee {
        if self.cfg.transactional { Guarantee::ExactlyOnce } else { Guarantee::AtLeastOnce }
    }

    async fn recover(&self, worker: &str) -> Result<Recovery, SinkError> {
        let r = self.round(worker).await?;
        let pending = r.lock().await.recover().await?;
        // Kafka keeps no per-worker offset here: the session adopts the worker's point of reference. A pending
        // transaction is one this process prepared for the worker on an earlier connection.
        Ok(Recovery { committed: None, pending })
    }

    async fn stage(&self, worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        let r = self.round(worker).await?;
        let mut round = r.lock().await;
        let mut kv = Vec::with_capacity(records.len());
        for rec in &records {
            match payload::split_bytes(&self.mapping, &rec.payload) {
                Ok(x) => kv.push(x),
                Err(e) => {
                    let reason = format!("record at offset {}: {e}", rec.offset);
                    round.poison(reason.clone());
                    return Err(SinkError::Permanent(reason));
                }
            }
        }
        round.stage(kv).await
    }

    async fn prepare(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let r = self.round(worker).await?;
        let mut round = r.lock().await;
        round.prepare(txn).await
    }

    async fn commit(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        let r = self.round(worker).await?;
        let mut round = r.lock().await;
        round.commit(txn).await
    }

    async fn abort(&self, worker: &str, _txn: &Txn) -> Result<(), SinkError> {
        let r = self.round(worker).await?;
        let mut round = r.lock().await;
        round.abort().await
    }

    async fn forget(&self, worker: &str) -> Result<(), SinkError> {
        if let Some(r) = self.workers.lock().await.remove(worker) {
            r.lock().await.abort().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactional_ids_are_stable_per_worker() {
        assert_eq!(transactional_id("wallaroo-out", "worker-1"), "wallaroo-out-worker-1");
        assert_ne!(transactional_id("p", "a"), transactional_id("p", "b"));
    }
}
