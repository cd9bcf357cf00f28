//! `source.rabbitmq`: consume one queue with manual acknowledgements, at-least-once. One stream named
//! `rabbitmq:<queue>`. See the README section "RabbitMQ source".
//!
//! Points of reference are a counter kept by the sidecar, mapped in order to (channel epoch, delivery tag).
//! Delivery tags restart at 1 on every new channel, so they cannot be the point of reference themselves; the
//! counter keeps increasing across broker reconnects, and after a sidecar restart it continues after the
//! worker's point of reference. On `Command::Durable { through }` the sidecar sends one `basic.ack` with
//! `multiple = true` for the highest delivery tag of the current channel covered by `through`.
//!
//! Deliveries stay in memory until the worker acknowledges them (at most `prefetch`, the broker stops there),
//! so a worker reconnect or RESTART gets them again without involving the broker. Deliveries of a channel that
//! died are redelivered by the broker with new tags and new points of reference.
use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use tokio::time::Instant;
use wallaroo_crds::RabbitmqSource as RabbitmqSourceConfig;

use crate::runtime::source_api::{
    Command, Emit, Position, Record, SourceContext, SourceError, SourceIntegration, stream_id_for,
};
use crate::sources::redis::resolve_url;

const BATCH: usize = 1024;

pub struct RabbitmqSource {
    cfg: RabbitmqSourceConfig,
}

impl RabbitmqSource {
    pub fn new(cfg: RabbitmqSourceConfig) -> Self {
        Self { cfg }
    }
}

/// One delivery not yet durable in the worker.
#[derive(Debug, Clone)]
struct Pending {
    epoch: u64,
    tag: u64,
    record: Record,
}

struct Link {
    conn: Connection,
    channel: Channel,
    consumer: Consumer,
}

/// The stream's bookkeeping, independent of the broker connection (unit-tested below).
#[derive(Debug, Default)]
struct Ledger {
    generation: Option<u64>,
    next_por: u64,
    /// First point of reference not yet handed to the runtime in this generation.
    next_send: u64,
    /// Deliveries not yet durable, por strictly increasing.
    unacked: VecDeque<Pending>,
}

impl Ledger {
    fn push(&mut self, epoch: u64, tag: u64, key: Option<Bytes>, payload: Bytes) {
        let record = Record { por: self.next_por, key, payload };
        self.next_por += 1;
        self.unacked.push_back(Pending { epoch, tag, record });
    }

    fn start(&mut self, generation: u64, from: Position) -> Option<u64> {
        self.generation = Some(generation);
        let ack = match from {
            Position::Beginning => None,
            Position::After(p) => {
                self.next_por = self.next_por.max(p.saturating_add(1));
                Some(p)
            }
        };
        // Everything still unacknowledged is sent again.
        self.next_send = self.unacked.front().map_or(self.next_por, |d| d.record.por);
        ack
    }

    /// Removes everything through `through`; returns the delivery tag to ack (multiple) on channel `epoch`.
    fn durable(&mut self, through: u64, epoch: u64) -> Option<u64> {
        let mut tag = None;
        while self.unacked.front().is_some_and(|d| d.record.por <= through) {
            if let Some(d) = self.unacked.pop_front()
                && d.epoch == epoch
            {
                tag = Some(d.tag);
            }
        }
        self.next_send = self.next_send.max(through.saturating_add(1).min(self.next_por));
        tag
    }

    /// The channel died: its deliveries go back to the queue and will come again with new tags. Those not yet
    /// handed to the worker are forgotten (handed-over ones too, as they can no longer be acked).
    fn channel_lost(&mut self, epoch: u64) {
        self.unacked.retain(|d| d.epoch != epoch);
    }

    fn has_sendable(&self) -> bool {
        self.generation.is_some() && self.unacked.back().is_some_and(|d| d.record.por >= self.next_send)
    }

    fn sendable(&self) -> Vec<Record> {
        let from = self.unacked.partition_point(|d| d.record.por < self.next_send);
        self.unacked.range(from..).take(BATCH).map(|d| d.record.clone()).collect()
    }
}

async fn connect(url: &str, cfg: &RabbitmqSourceConfig) -> lapin::Result<Link> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    if let Some(exchange) = &cfg.exchange {
        let kind = match cfg.exchange_type.as_deref().unwrap_or("direct") {
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            "direct" => ExchangeKind::Direct,
            other => ExchangeKind::Custom(other.to_string()),
        };
        let opts = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel.exchange_declare(exchange.as_str().into(), kind, opts, FieldTable::default()).await?;
    }
    if cfg.declare_queue || cfg.exchange.is_some() {
        let opts = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(cfg.queue.as_str().into(), opts, FieldTable::default()).await?;
    }
    if let Some(exchange) = &cfg.exchange {
        let key = cfg.routing_key.clone().unwrap_or_default();
        channel
            .queue_bind(
                cfg.queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel.basic_qos(cfg.prefetch.unwrap_or(1000), BasicQosOptions { global: false }).await?;
    let consumer = channel
        .basic_consume(
            cfg.queue.as_str().into(),
            "wallaroo-connector".into(),
            BasicConsumeOptions { no_ack: false, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    Ok(Link { conn, channel, consumer })
}

async fn next_delivery(link: &mut Option<Link>) -> Option<lapin::Result<lapin::message::Delivery>> {
    match link.as_mut() {
        Some(l) => l.consumer.next().await,
        None => std::future::pending().await,
    }
}

#[async_trait::async_trait]
impl SourceIntegration for RabbitmqSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        let cfg = self.cfg;
        let url = resolve_url(&cfg.url, &cfg.url_from, "spec.source.rabbitmq.url").map_err(SourceError::Config)?;
        let name = format!("rabbitmq:{}", cfg.queue);
        let stream = stream_id_for(name.as_bytes());
        ctx.emit.send(Emit::Stream { name }).await.map_err(|_| SourceError::RuntimeGone)?;
        let capacity = usize::from(cfg.prefetch.unwrap_or(1000)).max(1);

        let mut ledger = Ledger::default();
        let mut link: Option<Link> = None;
        let mut epoch: u64 = 0;
        let mut delay = Duration::from_millis(100);
        let mut retry_at = Instant::now();

        loop {
            let ready = ledger.has_sendable();
            // The broker bounds deliveries by prefetch; this bound only matters if prefetch is changed live.
            let take = link.is_some() && ledger.unacked.len() < capacity.max(BATCH);
            tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => {
                    while ledger.has_sendable() {
                        let records = ledger.sendable();
                        ledger.next_send = records.last().map_or(ledger.next_send, |r| r.por + 1);
                        let generation = ledger.generation.unwrap_or_default();
                        if ctx.emit.send(Emit::Records { stream, generation, records }).await.is_err() {
                            break;
                        }
                    }
                    if let Some(l) = link.take() {
                        let _ = l.conn.close(200, "shutdown".into()).await;
                    }
                    return Ok(());
                }
                cmd = ctx.commands.recv() => {
                    let ack = match cmd {
                        None => return Ok(()),
                        Some(Command::Start { from, generation, .. }) => {
                            let through = ledger.start(generation, from);
                            tracing::info!(generation, ?from, unacked = ledger.unacked.len(), "stream (re)started");
                            through.and_then(|p| ledger.durable(p, epoch))
                        }
                        Some(Command::Durable { through, .. }) => ledger.durable(through, epoch),
                        Some(Command::Finished { .. }) => None,
                    };
                    if let (Some(tag), Some(l)) = (ack, link.as_ref())
                        && let Err(e) = l.channel.basic_ack(tag, BasicAckOptions { multiple: true }).await
                    {
                        tracing::warn!(error = %e, "basic.ack failed; the broker will redeliver");
                        lost(&ctx, &mut link, &mut ledger, &mut epoch, &mut retry_at, &mut delay);
                    }
                }
                permit = ctx.emit.reserve(), if ready => {
                    let permit = permit.map_err(|_| SourceError::RuntimeGone)?;
                    let records = ledger.sendable();
                    ledger.next_send = records.last().map_or(ledger.next_send, |r| r.por + 1);
                    permit.send(Emit::Records { stream, generation: ledger.generation.unwrap_or_default(), records });
                }
                d = next_delivery(&mut link), if take => match d {
                    Some(Ok(d)) => {
                        ctx.metrics.messages_total.inc();
                        ctx.metrics.bytes_total.inc_by(d.data.len() as u64);
                        let key = (!d.routing_key.as_str().is_empty()).then(|| Bytes::copy_from_slice(d.routing_key.as_str().as_bytes()));
                        ledger.push(epoch, d.delivery_tag, key, Bytes::from(d.data));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "rabbitmq consumer failed");
                        lost(&ctx, &mut link, &mut ledger, &mut epoch, &mut retry_at, &mut delay);
                    }
                    None => {
                        tracing::warn!("rabbitmq consumer ended (cancelled or connection closed)");
                        lost(&ctx, &mut link, &mut ledger, &mut epoch, &mut retry_at, &mut delay);
                    }
                },
                // Consume only once the worker said where it stands: the counter must continue after its point.
                _ = tokio::time::sleep_until(retry_at), if link.is_none() && ledger.generation.is_some() => {
                    match connect(&url, &cfg).await {
                        Ok(l) => {
                            epoch += 1;
                            tracing::info!(queue = %cfg.queue, epoch, "rabbitmq consuming");
                            link = Some(l);
                            delay = Duration::from_millis(100);
                            ctx.health.set_external(true);
                            ctx.metrics.external_connected.set(1);
                        }
                        Err(e) => {
                            if matches!(e.kind(), lapin::ErrorKind::ProtocolError(_)) {
                                // e.g. NOT_FOUND for a missing queue: keep retrying, someone may create it.
                                tracing::error!(error = %e, queue = %cfg.queue, "rabbitmq refused the setup");
                            } else {
                                tracing::warn!(error = %e, "rabbitmq: cannot connect");
                            }
                            ctx.metrics.error("connection", "source");
                            retry_at = Instant::now() + delay;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        }
    }
}

fn lost(
    ctx: &SourceContext,
    link: &mut Option<Link>,
    ledger: &mut Ledger,
    epoch: &mut u64,
    retry_at: &mut Instant,
    delay: &mut Duration,
) {
    ctx.health.set_external(false);
    ctx.metrics.external_connected.set(0);
    ctx.metrics.error("connection", "source");
    ledger.channel_lost(*epoch);
    if let Some(l) = link.take() {
        // Closing in the background: the old connection may hang on a dead socket.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), l.conn.close(200, "reconnect".into())).await;
        });
    }
    *retry_at = Instant::now() + *delay;
    *delay = (*delay * 2).min(Duration::from_secs(5));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(v: &[Record]) -> Vec<u64> {
        v.iter().map(|r| r.por).collect()
    }

    #[test]
    fn counter_continues_after_the_workers_point() {
        let mut l = Ledger::default();
        assert_eq!(l.start(1, Position::After(41)), Some(41));
        l.push(1, 1, None, Bytes::from("a"));
        l.push(1, 2, None, Bytes::from("b"));
        assert_eq!(payloads(&l.sendable()), vec![42, 43]);
    }

    #[test]
    fn durable_acks_highest_tag_of_the_live_channel() {
        let mut l = Ledger::default();
        l.start(1, Position::Beginning);
        l.push(1, 1, None, Bytes::from("a")); // por 0
        l.push(1, 2, None, Bytes::from("b")); // por 1
        l.push(2, 1, None, Bytes::from("c")); // por 2, new channel: tags restart
        l.push(2, 2, None, Bytes::from("d")); // por 3
        assert_eq!(l.durable(0, 2), None, "por 0 is on a dead channel: nothing to ack");
        assert_eq!(l.durable(2, 2), Some(1));
        assert_eq!(l.unacked.len(), 1);
        assert_eq!(l.durable(10, 2), Some(2));
        assert!(l.unacked.is_empty());
    }

    #[test]
    fn restart_resends_unacked_and_channel_loss_forgets_its_deliveries() {
        let mut l = Ledger::default();
        l.start(1, Position::Beginning);
        for t in 1..=4 {
            l.push(1, t, None, Bytes::from("x"));
        }
        l.next_send = 4; // all handed over
        assert!(!l.has_sendable());
        assert_eq!(l.start(2, Position::After(1)), Some(1));
        assert_eq!(l.durable(1, 1), Some(2));
        assert_eq!(payloads(&l.sendable()), vec![2, 3]);
        l.channel_lost(1);
        assert!(l.unacked.is_empty());
        l.push(2, 1, None, Bytes::from("y"));
        assert_eq!(payloads(&l.sendable()), vec![4]);
    }
}
