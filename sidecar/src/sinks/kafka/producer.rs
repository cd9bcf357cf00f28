//! [`TxnProducer`] over librdkafka. One `FutureProducer` per worker when transactional (each needs its own
//! `transactional.id`); one shared producer otherwise, with per-worker delivery tracking.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::Mutex;

use super::txn::TxnProducer;
use crate::runtime::sink_api::SinkError;
use crate::runtime::{Health, Metrics};

/// Deliveries awaited per worker before more records are handed to librdkafka: bounds memory and makes
/// backpressure reach the worker.
pub const MAX_IN_FLIGHT: usize = 20_000;
/// How long blocking transaction calls may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// Tracks broker reachability for `/readyz`.
pub struct HealthContext {
    pub health: Health,
    pub metrics: Metrics,
}

impl ClientContext for HealthContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                tracing::warn!(%reason, "lost every Kafka broker; librdkafka keeps reconnecting");
                self.health.set_external(false);
                self.metrics.external_connected.set(0);
            }
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                tracing::debug!(%reason, "broker connection dropped")
            }
            _ => {
                self.metrics.error("kafka", "sink");
                tracing::warn!(error = %error, %reason, "kafka client error");
            }
        }
    }
}

pub type Rd = FutureProducer<HealthContext>;

pub fn create(cfg: &ClientConfig, health: Health, metrics: Metrics) -> Result<Rd, SinkError> {
    cfg.create_with_context(HealthContext { health, metrics })
        .map_err(|e| SinkError::Permanent(format!("spec.sink.kafka: cannot create the producer: {e}")))
}

fn classify(e: &KafkaError) -> SinkError {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidRecord,
        ) => SinkError::Permanent(format!("kafka: {e}")),
        _ => SinkError::Transient(format!("kafka: {e}")),
    }
}

/// One worker's view of a producer.
pub struct RdProducer {
    /// Replaced by a new client from `config` when a transactional producer is initialized a second time.
    producer: std::sync::Mutex<Rd>,
    /// The transactional producer's configuration, to create a new one after a fatal error.
    config: Option<ClientConfig>,
    initialized: std::sync::atomic::AtomicBool,
    topic: Arc<str>,
    health: Health,
    metrics: Metrics,
    in_flight: Mutex<VecDeque<DeliveryFuture>>,
}

impl RdProducer {
    /// A view of the shared, non-transactional producer.
    pub fn shared(producer: Rd, topic: Arc<str>, health: Health, metrics: Metrics) -> Self {
        Self::new(producer, None, topic, health, metrics)
    }

    /// A worker's own transactional producer, created from `config` (which holds its `transactional.id`).
    pub fn transactional(
        config: ClientConfig,
        topic: Arc<str>,
        health: Health,
        metrics: Metrics,
    ) -> Result<Self, SinkError> {
        let producer = create(&config, health.clone(), metrics.clone())?;
        Ok(Self::new(producer, Some(config), topic, health, metrics))
    }

    fn new(producer: Rd, config: Option<ClientConfig>, topic: Arc<str>, health: Health, metrics: Metrics) -> Self {
        Self {
            producer: std::sync::Mutex::new(producer),
            config,
            initialized: std::sync::atomic::AtomicBool::new(false),
            topic,
            health,
            metrics,
            in_flight: Mutex::new(VecDeque::new()),
        }
    }

    fn transactional_mode(&self) -> bool {
        self.config.is_some()
    }

    fn current(&self) -> Rd {
        // A poisoned lock only means a panic elsewhere while swapping; the producer inside is still whole.
        self.producer.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Awaits the oldest `n` deliveries; the first failure is returned (the rest are still awaited so the
    /// queue does not keep stale futures).
    async fn settle(&self, q: &mut VecDeque<DeliveryFuture>, n: usize) -> Result<(), SinkError> {
        let mut first_err = None;
        for _ in 0..n.min(q.len()) {
            let Some(f) = q.pop_front() else { break };
            match f.await {
                Ok(Ok(_)) => {
                    if !self.health.external() {
                        self.health.set_external(true);
                        self.metrics.external_connected.set(1);
                    }
                }
                Ok(Err((e, _))) => {
                    self.metrics.error("delivery", "sink");
                    first_err.get_or_insert_with(|| classify(&e));
                }
                Err(_) => {
                    first_err.get_or_insert_with(|| SinkError::Transient("kafka: producer dropped a delivery".into()));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn blocking<F>(&self, what: &'static str, f: F) -> Result<(), SinkError>
    where
        F: FnOnce(&Rd) -> Result<(), KafkaError> + Send + 'static,
    {
        let p = self.current();
        let r = tokio::task::spawn_blocking(move || f(&p))
            .await
            .map_err(|e| SinkError::Transient(format!("{what}: {e}")))?;
        r.map_err(|e| {
            // Fatal: the producer is unusable. Requires abort: this transaction can never commit. Neither heals
            // by asking again.
            let fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal() || t.txn_requires_abort());
            let msg = format!("kafka {what}: {e}");
            if fatal { SinkError::Permanent(msg) } else { SinkError::Transient(msg) }
        })
    }
}

#[async_trait::async_trait]
impl TxnProducer for RdProducer {
    async fn init(&self) -> Result<(), SinkError> {
        self.in_flight.lock().await.clear();
        let Some(config) = &self.config else { return Ok(()) };
        // librdkafka initializes a transactional producer once; after a fatal error it is unusable. A second
        // initialization therefore starts a new client with the same transactional.id, which fences the old
        // one and aborts whatever it left open.
        if self.initialized.load(std::sync::atomic::Ordering::Acquire) {
            let fresh = create(config, self.health.clone(), self.metrics.clone())?;
            let old = std::mem::replace(&mut *self.producer.lock().unwrap_or_else(|e| e.into_inner()), fresh);
            // Dropping a producer purges and flushes it (up to half a second): not on an async worker thread.
            tokio::task::spawn_blocking(move || drop(old));
        }
        self.blocking("init_transactions", |p| p.init_transactions(TXN_TIMEOUT)).await?;
        self.initialized.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    async fn begin(&self) -> Result<(), SinkError> {
        if self.transactional_mode() {
            self.blocking("begin_transaction", |p| p.begin_transaction()).await?;
        }
        Ok(())
    }

    async fn send(&self, records: Vec<(Option<Bytes>, Bytes)>) -> Result<(), SinkError> {
        let mut q = self.in_flight.lock().await;
        let producer = self.current();
        for (key, value) in &records {
            loop {
                if q.len() >= MAX_IN_FLIGHT {
                    self.settle(&mut q, MAX_IN_FLIGHT / 2).await?;
                }
                let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).payload(&value[..]);
                if let Some(k) = key {
                    rec = rec.key(&k[..]);
                }
                match producer.send_result(rec) {
                    Ok(f) => {
                        q.push_back(f);
                        break;
                    }
                    Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                        // librdkafka's own queue is full: wait for some deliveries, then try again.
                        if q.is_empty() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        } else {
                            let n = (q.len() / 2).max(1);
                            self.settle(&mut q, n).await?;
                        }
                    }
                    Err((e, _)) => {
                        self.metrics.error("produce", "sink");
                        return Err(classify(&e));
                    }
                }
            }
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), SinkError> {
        let mut q = self.in_flight.lock().await;
        let n = q.len();
        self.settle(&mut q, n).await
    }

    async fn commit(&self) -> Result<(), SinkError> {
        if self.transactional_mode() {
            self.blocking("commit_transaction", |p| p.commit_transaction(TXN_TIMEOUT)).await?;
        }
        Ok(())
    }

    async fn abort(&self) -> Result<(), SinkError> {
        // Records of the round still in flight are abandoned (and, without transactions, may still land).
        self.in_flight.lock().await.clear();
        if self.transactional_mode() {
            self.blocking("abort_transaction", |p| p.abort_transaction(TXN_TIMEOUT)).await?;
        }
        Ok(())
    }
}
