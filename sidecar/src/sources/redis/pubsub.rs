//! Mode `pubsub` (upstream `redis_subscriber_source`): one stream per configured channel or pattern, named
//! `redis:<channel-or-pattern>`; the record key is the channel the message was published on.
//!
//! Pub/sub keeps nothing: a message published while nobody listens is gone. Messages therefore stay in a
//! bounded in-memory buffer per stream until the worker acknowledges them, and are sent again after a worker
//! reconnect or RESTART. That is at-least-once across worker reconnects while the buffer holds, and
//! at-most-once across a sidecar crash or a Redis disconnect (messages published meanwhile are lost).
use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wallaroo_crds::RedisSource as RedisSourceConfig;

use super::Backoff;
use crate::runtime::source_api::{Command, Emit, Position, Record, SourceContext, SourceError, stream_id_for};
use crate::runtime::{Health, Metrics};

const BATCH: usize = 1024;
/// Messages between the subscriber task and the main loop.
const CHANNEL_CAPACITY: usize = 4096;

/// True when Redis treats the name as a PSUBSCRIBE pattern.
pub fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// The stream name for one configured channel or pattern.
pub fn stream_name(channel: &str) -> String {
    format!("redis:{channel}")
}

/// One received message: which subscription (channel or pattern) it belongs to, and the channel it came from.
struct Incoming {
    subscription: String,
    channel: Bytes,
    payload: Bytes,
}

#[derive(Default)]
struct StreamState {
    generation: Option<u64>,
    next_por: u64,
    /// Messages not yet acknowledged by the worker, oldest first (por strictly increasing).
    unacked: VecDeque<Record>,
    /// The first point of reference not yet handed to the runtime in the current generation.
    next_send: u64,
}

impl StreamState {
    /// Up to [`BATCH`] records the runtime has not been handed yet.
    fn sendable(&self) -> Vec<Record> {
        let from = self.unacked.partition_point(|r| r.por < self.next_send);
        self.unacked.range(from..).take(BATCH).cloned().collect()
    }
    fn has_sendable(&self) -> bool {
        self.generation.is_some() && self.unacked.back().is_some_and(|r| r.por >= self.next_send)
    }
    fn drop_through(&mut self, through: u64) {
        while self.unacked.front().is_some_and(|r| r.por <= through) {
            self.unacked.pop_front();
        }
    }
}

pub async fn run(cfg: RedisSourceConfig, client: redis::Client, mut ctx: SourceContext) -> Result<(), SourceError> {
    let capacity = cfg.buffer.unwrap_or(65536).max(1) as usize;
    let mut streams: HashMap<u64, StreamState> = HashMap::new();
    let mut by_subscription: HashMap<String, u64> = HashMap::new();
    for ch in &cfg.channels {
        let name = stream_name(ch);
        let id = stream_id_for(name.as_bytes());
        streams.insert(id, StreamState::default());
        by_subscription.insert(ch.clone(), id);
        ctx.emit.send(Emit::Stream { name }).await.map_err(|_| SourceError::RuntimeGone)?;
    }

    let (tx, mut rx) = mpsc::channel::<Incoming>(CHANNEL_CAPACITY);
    let stop = ctx.shutdown.child_token();
    let subscriber = tokio::spawn(subscribe_loop(
        client,
        cfg.channels.clone(),
        tx,
        ctx.health.clone(),
        ctx.metrics.clone(),
        stop.clone(),
    ));
    let _stop_subscriber = stop.clone().drop_guard();

    loop {
        let ready = streams.iter().find(|(_, s)| s.has_sendable()).map(|(id, _)| *id);
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => {
                stop.cancel();
                // Hand over what was received; the runtime drains it to the worker.
                for (id, s) in streams.iter_mut() {
                    while s.has_sendable() {
                        let records = s.sendable();
                        s.next_send = records.last().map_or(s.next_send, |r| r.por + 1);
                        let generation = s.generation.unwrap_or_default();
                        if ctx.emit.send(Emit::Records { stream: *id, generation, records }).await.is_err() {
                            break;
                        }
                    }
                }
                let _ = subscriber.await;
                return Ok(());
            }
            cmd = ctx.commands.recv() => match cmd {
                None => return Ok(()),
                Some(Command::Start { stream, from, generation }) => {
                    let Some(s) = streams.get_mut(&stream) else { continue };
                    s.generation = Some(generation);
                    match from {
                        Position::Beginning => s.next_send = 0,
                        Position::After(p) => {
                            s.drop_through(p);
                            s.next_por = s.next_por.max(p.saturating_add(1));
                            s.next_send = p.saturating_add(1);
                        }
                    }
                    // Everything still unacknowledged is sent again, then new messages follow.
                    s.next_send = s.next_send.min(s.unacked.front().map_or(s.next_send, |r| r.por));
                }
                Some(Command::Durable { stream, through }) => {
                    if let Some(s) = streams.get_mut(&stream) {
                        s.drop_through(through);
                    }
                }
                Some(Command::Finished { .. }) => {}
            },
            permit = ctx.emit.reserve(), if ready.is_some() => {
                let permit = permit.map_err(|_| SourceError::RuntimeGone)?;
                let id = ready.unwrap_or_default();
                if let Some(s) = streams.get_mut(&id) {
                    let records = s.sendable();
                    s.next_send = records.last().map_or(s.next_send, |r| r.por + 1);
                    permit.send(Emit::Records { stream: id, generation: s.generation.unwrap_or_default(), records });
                }
            }
            msg = rx.recv() => {
                let Some(msg) = msg else {
                    // The subscriber only ends on shutdown.
                    return Ok(());
                };
                let Some(id) = by_subscription.get(&msg.subscription) else {
                    tracing::warn!(subscription = %msg.subscription, "message for an unknown subscription");
                    continue;
                };
                let Some(s) = streams.get_mut(id) else { continue };
                let rec = Record { por: s.next_por, key: Some(msg.channel), payload: msg.payload };
                s.next_por += 1;
                if s.unacked.len() >= capacity {
                    s.unacked.pop_front();
                    ctx.metrics.error("buffer_overflow", "source");
                }
                s.unacked.push_back(rec);
            }
        }
    }
}

/// Keeps a subscription open, reconnecting with backoff, and forwards every message.
async fn subscribe_loop(
    client: redis::Client,
    subscriptions: Vec<String>,
    tx: mpsc::Sender<Incoming>,
    health: Health,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = subscribe(&client, &subscriptions) => r,
        };
        match connected {
            Ok(pubsub) => {
                tracing::info!(subscriptions = ?subscriptions, "redis pubsub subscribed");
                health.set_external(true);
                metrics.external_connected.set(1);
                backoff.reset();
                let mut messages = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(msg) = msg else { break };
                    let subscription = if msg.from_pattern() {
                        msg.get_pattern::<String>().unwrap_or_default()
                    } else {
                        msg.get_channel_name().to_string()
                    };
                    let incoming = Incoming {
                        subscription,
                        channel: Bytes::copy_from_slice(msg.get_channel_name().as_bytes()),
                        payload: Bytes::copy_from_slice(msg.get_payload_bytes()),
                    };
                    metrics.messages_total.inc();
                    metrics.bytes_total.inc_by(incoming.payload.len() as u64);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = tx.send(incoming) => if r.is_err() { return },
                    }
                }
                tracing::warn!("redis pubsub connection lost; messages published until reconnect are lost");
            }
            Err(e) => tracing::warn!(error = %e, "redis pubsub: cannot subscribe"),
        }
        health.set_external(false);
        metrics.external_connected.set(0);
        metrics.error("connection", "source");
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn subscribe(client: &redis::Client, subscriptions: &[String]) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = tokio::time::timeout(std::time::Duration::from_secs(5), client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
    for s in subscriptions {
        if is_pattern(s) {
            pubsub.psubscribe(s).await?;
        } else {
            pubsub.subscribe(s).await?;
        }
    }
    Ok(pubsub)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(por: u64) -> Record {
        Record { por, key: None, payload: Bytes::from(por.to_string()) }
    }

    #[test]
    fn patterns_are_recognised() {
        assert!(is_pattern("news.*"));
        assert!(is_pattern("h?llo"));
        assert!(is_pattern("h[ae]llo"));
        assert!(!is_pattern("plain.channel"));
    }

    #[test]
    fn sendable_starts_at_next_send_and_is_bounded() {
        let mut s = StreamState { generation: Some(1), ..Default::default() };
        for p in 0..(BATCH as u64 + 10) {
            s.unacked.push_back(rec(p));
        }
        s.next_send = 5;
        let b = s.sendable();
        assert_eq!(b.len(), BATCH);
        assert_eq!(b[0].por, 5);
        s.next_send = BATCH as u64 + 10;
        assert!(!s.has_sendable());
        s.drop_through(100);
        assert_eq!(s.unacked.front().map(|r| r.por), Some(101));
    }
}
