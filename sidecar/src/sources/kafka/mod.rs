//! `source.kafka`: a consumer-group member. Each topic-partition it is assigned becomes one stream named
//! `topic:partition`; point of reference = offset; the message key is the record key (headers are ignored).
//!
//! At-least-once, driven by the worker: auto-commit is off and offset `P + 1` is committed to the group only
//! when the worker reports `Durable { through: P }`. A partition starts where the worker says (`After(p)` →
//! offset `p + 1`; from the beginning → the group's committed offset, else `startFrom`). Partitions revoked
//! by a rebalance are drained first: their streams end, the worker's acknowledgements are committed, and only
//! then (or after `revokeTimeoutSeconds`) does the revoke proceed. Several sidecars in one group split the
//! partitions between them.
//!
//! Layout: [`consumer`] is the thread that owns the librdkafka consumer; [`partitions`] makes every decision
//! (unit-tested, no I/O); this file moves messages between them and the runtime.
use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use tokio::sync::mpsc;
use wallaroo_crds::KafkaSource as KafkaSourceConfig;

use crate::runtime::source_api::{Emit, SourceContext, SourceError, SourceIntegration};

pub mod client_config;
pub mod consumer;
pub mod partitions;

use consumer::{Control, Ctx, Event};
use partitions::{Book, Out};

/// Properties this source sets itself: overriding them would break at-least-once or the start positions.
const RESERVED: &[&str] = &["enable.auto.commit", "enable.auto.offset.store", "group.id", "bootstrap.servers"];

/// Record batches in flight between the consumer thread and the runtime.
const RECORD_EVENTS: usize = 16;

pub struct KafkaSource {
    cfg: KafkaSourceConfig,
}

impl KafkaSource {
    pub fn new(cfg: KafkaSourceConfig) -> Self {
        Self { cfg }
    }

    fn client_config(&self, instance: &str) -> Result<rdkafka::ClientConfig, SourceError> {
        let c = &self.cfg;
        client_config::check_reserved("spec.source.kafka", &c.properties, RESERVED).map_err(SourceError::Config)?;
        let mut cfg = client_config::base_config(&client_config::Connection {
            field: "spec.source.kafka",
            brokers: &c.brokers,
            properties: &c.properties,
            sasl_mechanism: c.sasl_mechanism.as_deref(),
            sasl_username: c.sasl_username.as_deref(),
            sasl_password_from: c.sasl_password_from.as_ref(),
        })
        .map_err(SourceError::Config)?;
        if cfg.get("client.id").is_none() {
            cfg.set("client.id", instance);
        }
        cfg.set("group.id", &c.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match c.start_from {
                    wallaroo_crds::StartFrom::Earliest => "earliest",
                    wallaroo_crds::StartFrom::Latest => "latest",
                },
            );
        Ok(cfg)
    }
}

#[async_trait::async_trait]
impl SourceIntegration for KafkaSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        let revoke_timeout = Duration::from_secs(u64::from(self.cfg.revoke_timeout_seconds.unwrap_or(10)));
        let client = self.client_config(&ctx.instance)?;
        let (rec_tx, mut rec_rx) = mpsc::channel::<Event>(RECORD_EVENTS);
        let (group_tx, mut group_rx) = mpsc::unbounded_channel::<Event>();
        let (ctl_tx, ctl_rx) = std_mpsc::channel::<Control>();
        let kctx = Ctx::new(rec_tx, group_tx, ctl_rx, revoke_timeout, ctx.health.clone(), ctx.metrics.clone());
        let consumer: BaseConsumer<Ctx> = client
            .create_with_context(kctx)
            .map_err(|e| SourceError::Config(format!("spec.source.kafka: cannot create the consumer: {e}")))?;
        let topics = self.cfg.topics.clone();
        let thread = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || consumer::run(consumer, consumer::ThreadArgs { topics }))
            .map_err(SourceError::Io)?;
        tracing::info!(group = %self.cfg.group_id, topics = ?self.cfg.topics, "kafka source started");

        let mut book = Book::new(self.cfg.start_from);
        let mut outbox: VecDeque<Emit> = VecDeque::new();
        let ctl = ControlTx(ctl_tx);
        let mut shutdown_seen = false;
        let result = loop {
            let deadline = book.revoke_deadline();
            tokio::select! {
                biased;
                cmd = ctx.commands.recv() => match cmd {
                    // The runtime finished its drain (or went away): done.
                    None => break Ok(()),
                    Some(c) => {
                        let outs = book.command(c);
                        if apply(&book, outs, &mut outbox, &ctl).is_err() { break Err(thread_gone()) }
                    }
                },
                _ = ctx.shutdown.cancelled(), if !shutdown_seen => {
                    shutdown_seen = true;
                    book.stop_intake();
                    outbox.retain(|e| !matches!(e, Emit::Records { .. }));
                    if ctl.send(Control::PauseAll).is_err() { break Err(thread_gone()) }
                    tracing::info!("shutdown: no new records; still committing acknowledgements until the runtime is done");
                }
                ev = group_rx.recv() => match ev {
                    None => break Err(thread_gone()),
                    Some(Event::Assigned(tps)) => {
                        let outs = book.assigned(tps);
                        if apply(&book, outs, &mut outbox, &ctl).is_err() { break Err(thread_gone()) }
                    }
                    Some(Event::Revoking(tps)) => {
                        let outs = book.revoking_started(tps, tokio::time::Instant::now().into_std() + revoke_timeout);
                        if apply(&book, outs, &mut outbox, &ctl).is_err() { break Err(thread_gone()) }
                    }
                    Some(Event::Records { .. }) => {}
                },
                _ = tokio::time::sleep_until(deadline.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std)), if deadline.is_some() => {
                    let outs = book.revoke_timed_out();
                    if apply(&book, outs, &mut outbox, &ctl).is_err() { break Err(thread_gone()) }
                }
                permit = ctx.emit.reserve(), if !outbox.is_empty() => {
                    let Ok(permit) = permit else { break Err(SourceError::RuntimeGone) };
                    if let Some(e) = outbox.pop_front() { permit.send(e) }
                }
                ev = rec_rx.recv(), if outbox.is_empty() => match ev {
                    None => break Err(thread_gone()),
                    Some(Event::Records { tp, epoch, records }) => {
                        let (first, n) = (records.first().map(|r| r.por), records.len());
                        match book.records(&tp, epoch, records) {
                            Some(e) => outbox.push_back(e),
                            None => tracing::debug!(topic = %tp.topic, partition = tp.partition, epoch, ?first, n, "records of a stale start or a partition not held; dropped"),
                        }
                    }
                    Some(_) => {}
                },
            }
        };
        // Closing the control channel stops the thread; it commits what was acknowledged and leaves the group.
        drop(ctl);
        drop(rec_rx);
        drop(group_rx);
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        match joined {
            Ok(Ok(Err(e))) => {
                return Err(SourceError::External { system: "kafka", message: e });
            }
            Ok(Err(_)) | Err(_) => {
                return Err(SourceError::External { system: "kafka", message: "the consumer thread panicked".into() });
            }
            Ok(Ok(Ok(()))) => {}
        }
        tracing::info!("kafka source stopped");
        result
    }
}

fn thread_gone() -> SourceError {
    SourceError::External { system: "kafka", message: "the consumer thread stopped".into() }
}

struct ControlTx(std_mpsc::Sender<Control>);

impl ControlTx {
    fn send(&self, c: Control) -> Result<(), ()> {
        self.0.send(c).map_err(|_| ())
    }
}

/// Carries out the book's decisions. After a revoke completes, records of streams no longer held are dropped
/// from the outbox (the new owner reads them again from the committed offset).
fn apply(book: &Book, outs: Vec<Out>, outbox: &mut VecDeque<Emit>, ctl: &ControlTx) -> Result<(), ()> {
    for o in outs {
        match o {
            Out::Emit(e) => outbox.push_back(e),
            Out::Control(c) => {
                let revoke_done = matches!(c, Control::RevokeDone);
                ctl.send(c)?;
                if revoke_done {
                    outbox.retain(|e| !matches!(e, Emit::Records { stream, .. } if !book.owns(*stream)));
                }
            }
        }
    }
    Ok(())
}

/// Shared with the sink, which builds its producer from the same connection fields.
pub use client_config::{Connection, base_config, check_reserved};
