//! `sink.udp`: each message goes out as one datagram as soon as it arrives (best effort: UDP cannot hold a
//! prepared transaction, so this sink always votes commit and a rolled-back round may be sent twice).
use tokio::net::UdpSocket;
use wallaroo_crds::UdpSink as UdpSinkConfig;

use crate::runtime::Health;
use crate::runtime::sink_api::{Guarantee, Recovery, SinkError, SinkIntegration, SinkRecord, Txn};

pub struct UdpSink {
    socket: UdpSocket,
}

impl UdpSink {
    pub async fn connect(cfg: UdpSinkConfig, health: Health) -> Result<Self, SinkError> {
        let target = format!("{}:{}", cfg.host, cfg.port);
        let bind = if cfg.host.contains(':') { "[::]:0" } else { "0.0.0.0:0" };
        let socket = UdpSocket::bind(bind).await.map_err(|e| SinkError::Permanent(format!("udp bind: {e}")))?;
        socket
            .connect(&target)
            .await
            .map_err(|e| SinkError::Permanent(format!("spec.sink.udp: cannot resolve {target}: {e}")))?;
        health.set_external(true);
        Ok(Self { socket })
    }
}

#[async_trait::async_trait]
impl SinkIntegration for UdpSink {
    fn guarantee(&self) -> Guarantee {
        Guarantee::BestEffort
    }
    async fn recover(&self, _worker: &str) -> Result<Recovery, SinkError> {
        Ok(Recovery { committed: None, pending: None })
    }
    async fn stage(&self, _worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        for r in records {
            // A refused datagram (nobody listening yet) is not an error for a best-effort sink.
            if let Err(e) = self.socket.send(&r.payload).await {
                tracing::debug!(error = %e, len = r.payload.len(), "datagram not sent");
            }
        }
        Ok(())
    }
    async fn prepare(&self, _worker: &str, _txn: &Txn) -> Result<(), SinkError> {
        Ok(())
    }
    async fn commit(&self, _worker: &str, _txn: &Txn) -> Result<(), SinkError> {
        Ok(())
    }
    async fn abort(&self, _worker: &str, _txn: &Txn) -> Result<(), SinkError> {
        Ok(())
    }
    async fn forget(&self, _worker: &str) -> Result<(), SinkError> {
        Ok(())
    }
}
