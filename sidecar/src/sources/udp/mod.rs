//! `source.udp`: each datagram becomes one message, byte for byte (upstream stripped whitespace, which
//! corrupted binary payloads). Point of reference = a datagram counter.
//!
//! UDP cannot replay, so datagrams stay in a bounded in-memory buffer until the worker acknowledges them:
//! after a worker reconnect or RESTART they are sent again from the worker's point of reference. That makes the
//! source at-least-once across worker restarts (while the buffer holds) and at-most-once across a sidecar crash.
use std::collections::VecDeque;

use bytes::Bytes;
use tokio::net::UdpSocket;
use wallaroo_crds::{DEFAULT_UDP_BUFFER_BYTES, UdpSource as UdpSourceConfig};

use crate::runtime::source_api::{
    Command, Emit, Position, Record, SourceContext, SourceError, SourceIntegration, stream_id_for,
};

pub struct UdpSource {
    cfg: UdpSourceConfig,
}

impl UdpSource {
    pub fn new(cfg: UdpSourceConfig) -> Self {
        Self { cfg }
    }
}

const MAX_DATAGRAM: usize = 65536;
const BATCH: usize = 1024;

/// Datagrams not yet acknowledged by the worker (oldest first), for replay after a reconnect; bounded by count
/// and by payload bytes, the oldest dropped first.
struct Replay {
    records: VecDeque<Record>,
    bytes: u64,
    max_count: usize,
    max_bytes: u64,
}

impl Replay {
    fn new(max_count: usize, max_bytes: u64) -> Self {
        Self { records: VecDeque::new(), bytes: 0, max_count: max_count.max(1), max_bytes }
    }

    /// Adds a record; returns how many old ones were dropped to make room.
    fn push(&mut self, r: Record) -> usize {
        let len = r.payload.len() as u64;
        let mut dropped = 0;
        while !self.records.is_empty()
            && (self.records.len() >= self.max_count || self.bytes.saturating_add(len) > self.max_bytes)
        {
            self.pop_front();
            dropped += 1;
        }
        self.bytes += len;
        self.records.push_back(r);
        dropped
    }

    fn pop_front(&mut self) {
        if let Some(r) = self.records.pop_front() {
            self.bytes -= r.payload.len() as u64;
        }
    }

    /// Drops everything through point of reference `p` (acknowledged by the worker).
    fn release_through(&mut self, p: u64) {
        while self.records.front().is_some_and(|r| r.por <= p) {
            self.pop_front();
        }
    }
}

#[async_trait::async_trait]
impl SourceIntegration for UdpSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        let addr = format!("{}:{}", self.cfg.host, self.cfg.port);
        let socket = UdpSocket::bind(&addr)
            .await
            .map_err(|e| SourceError::Config(format!("spec.source.udp: cannot bind {addr}: {e}")))?;
        tracing::info!(%addr, "udp source listening");
        ctx.health.set_external(true);
        ctx.metrics.external_connected.set(1);
        let name = self.cfg.stream_name.clone().unwrap_or_else(|| format!("udp:{}", self.cfg.port));
        let stream = stream_id_for(name.as_bytes());
        ctx.emit.send(Emit::Stream { name }).await.map_err(|_| SourceError::RuntimeGone)?;

        let capacity = self.cfg.buffer.unwrap_or(65536).max(1) as usize;
        let mut unacked = Replay::new(capacity, self.cfg.buffer_bytes.unwrap_or(DEFAULT_UDP_BUFFER_BYTES));
        let mut next_por: u64 = 0;
        let mut generation: Option<u64> = None;
        // Records read but not yet handed to the runtime.
        let mut outbox: Vec<Record> = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let sendable = generation.is_some() && !outbox.is_empty();
            tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => {
                    if let (Some(g), false) = (generation, outbox.is_empty()) {
                        let _ = ctx.emit.send(Emit::Records { stream, generation: g, records: std::mem::take(&mut outbox) }).await;
                    }
                    return Ok(());
                }
                cmd = ctx.commands.recv() => match cmd {
                    None => return Ok(()),
                    Some(Command::Start { from, generation: g, .. }) => {
                        let after = match from { Position::Beginning => None, Position::After(p) => Some(p) };
                        if generation.is_none() {
                            // First grant in this process: the worker may remember points from an earlier run of
                            // the sidecar, so number what arrived while waiting from just after its point.
                            let base = after.map_or(0, |p| p.saturating_add(1));
                            for (i, r) in unacked.records.iter_mut().enumerate() {
                                r.por = base + i as u64;
                            }
                            next_por = base + unacked.records.len() as u64;
                        } else if let Some(p) = after {
                            next_por = next_por.max(p.saturating_add(1));
                            unacked.release_through(p);
                        }
                        generation = Some(g);
                        // Everything unacknowledged is sent again, then new datagrams follow.
                        outbox = unacked.records.iter().cloned().collect();
                    }
                    Some(Command::Durable { through, .. }) => unacked.release_through(through),
                    Some(Command::Finished { .. }) => {}
                },
                permit = ctx.emit.reserve(), if sendable => {
                    let permit = permit.map_err(|_| SourceError::RuntimeGone)?;
                    let g = generation.unwrap_or_default();
                    permit.send(Emit::Records { stream, generation: g, records: std::mem::take(&mut outbox) });
                }
                r = socket.recv_from(&mut buf), if outbox.len() < BATCH => {
                    let (n, _) = r?;
                    let mut first = Some(Bytes::copy_from_slice(&buf[..n]));
                    // Drain what else is already queued on the socket into the same batch.
                    while outbox.len() < BATCH {
                        let payload = match first.take() {
                            Some(p) => p,
                            None => match socket.try_recv_from(&mut buf) {
                                Ok((n, _)) => Bytes::copy_from_slice(&buf[..n]),
                                Err(_) => break,
                            },
                        };
                        let rec = Record { por: next_por, key: None, payload };
                        next_por += 1;
                        for _ in 0..unacked.push(rec.clone()) {
                            ctx.metrics.error("buffer_overflow", "source");
                        }
                        outbox.push(rec);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(por: u64, len: usize) -> Record {
        Record { por, key: None, payload: Bytes::from(vec![0u8; len]) }
    }

    #[test]
    fn the_replay_buffer_is_bounded_by_bytes_as_well_as_count() {
        let mut r = Replay::new(1000, 1000);
        let dropped: usize = (0..20).map(|i| r.push(rec(i, 100))).sum();
        assert_eq!((r.records.len(), r.bytes, dropped), (10, 1000, 10));
        assert_eq!(r.records.front().map(|r| r.por), Some(10), "the oldest are dropped");
        // One record larger than the whole budget is still kept alone rather than dropped on arrival.
        r.push(rec(20, 5000));
        assert_eq!((r.records.len(), r.bytes), (1, 5000));
        r.release_through(20);
        assert_eq!((r.records.len(), r.bytes), (0, 0));
        let mut by_count = Replay::new(3, u64::MAX);
        for i in 0..5 {
            by_count.push(rec(i, 1));
        }
        assert_eq!(by_count.records.len(), 3);
    }

    #[tokio::test]
    async fn datagrams_beyond_buffer_bytes_are_dropped_oldest_first() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg: UdpSourceConfig = serde_json::from_value(
            serde_json::json!({"host": "127.0.0.1", "port": port, "streamName": "u", "bufferBytes": 1000}),
        )
        .unwrap();
        let (emit_tx, mut emit) = tokio::sync::mpsc::channel(16);
        let (commands, cmd_rx) = tokio::sync::mpsc::channel(16);
        let ctx = SourceContext {
            emit: emit_tx,
            commands: cmd_rx,
            health: crate::runtime::Health::new(),
            metrics: crate::runtime::Metrics::new("t", "udp", "source").unwrap(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            instance: "test".into(),
        };
        let health = ctx.health.clone();
        let overflow = ctx.metrics.errors_total.with_label_values(&["buffer_overflow", "source"]);
        let task = tokio::spawn(Box::new(UdpSource::new(cfg)).run(ctx));
        let Some(Emit::Stream { .. }) = emit.recv().await else { panic!("stream first") };
        assert!(health.external(), "bound");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..20u8 {
            tx.send_to(&[i; 100], ("127.0.0.1", port)).unwrap();
        }
        // Let the source take them all in before the worker grants the stream: ten are dropped on the way.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while overflow.get() < 10 {
            assert!(std::time::Instant::now() < deadline, "the source took in the datagrams");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        commands
            .send(Command::Start { stream: stream_id_for(b"u"), from: Position::Beginning, generation: 1 })
            .await
            .unwrap();
        let Some(Emit::Records { records, .. }) = emit.recv().await else { panic!("records") };
        assert_eq!(records.len(), 10, "1000 bytes hold ten 100-byte datagrams");
        assert_eq!(records[0].payload[0], 10, "the oldest were dropped");
        task.abort();
    }
}
