//! `source.udp`: each datagram becomes one message, byte for byte (upstream stripped whitespace, which
//! corrupted binary payloads). Point of reference = a datagram counter.
//!
//! UDP cannot replay, so datagrams stay in a bounded in-memory buffer until the worker acknowledges them:
//! after a worker reconnect or RESTART they are sent again from the worker's point of reference. That makes the
//! source at-least-once across worker restarts (while the buffer holds) and at-most-once across a sidecar crash.
use std::collections::VecDeque;

use bytes::Bytes;
use tokio::net::UdpSocket;
use wallaroo_crds::UdpSource as UdpSourceConfig;

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
        // Datagrams not yet acknowledged by the worker (oldest first), for replay after a reconnect.
        let mut unacked: VecDeque<Record> = VecDeque::new();
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
                            for (i, r) in unacked.iter_mut().enumerate() {
                                r.por = base + i as u64;
                            }
                            next_por = base + unacked.len() as u64;
                        } else if let Some(p) = after {
                            next_por = next_por.max(p.saturating_add(1));
                            while unacked.front().is_some_and(|r| r.por <= p) {
                                unacked.pop_front();
                            }
                        }
                        generation = Some(g);
                        // Everything unacknowledged is sent again, then new datagrams follow.
                        outbox = unacked.iter().cloned().collect();
                    }
                    Some(Command::Durable { through, .. }) => {
                        while unacked.front().is_some_and(|r| r.por <= through) {
                            unacked.pop_front();
                        }
                    }
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
                        if unacked.len() >= capacity {
                            unacked.pop_front();
                            ctx.metrics.error("buffer_overflow", "source");
                        }
                        unacked.push_back(rec.clone());
                        outbox.push(rec);
                    }
                }
            }
        }
    }
}
