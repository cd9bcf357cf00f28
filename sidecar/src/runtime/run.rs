//! From a Connector manifest to a running connector.
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wallaroo_crds::{Connector, Direction};

use super::sink_driver::{self, SinkDriverConfig};
use super::source_driver::{DriverError, SourceDriver, SourceDriverConfig, SourceOutcome};
use super::{Health, Metrics, admin};
use crate::protocol::sink::SinkSessionConfig;
use crate::protocol::source::SourceSessionConfig;
use crate::protocol::{SINK_VERSION, SOURCE_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Invalid(String),
    #[error("secret: {0}")]
    Secret(#[from] wallaroo_crds::SecretError),
    #[error("metrics: {0}")]
    Metrics(#[from] super::metrics::MetricsError),
    #[error("admin server on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("sink listener on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("source: {0}")]
    Source(#[from] DriverError),
    #[error("source: {0}")]
    SourceBuild(#[from] super::source_api::SourceError),
    #[error("sink: {0}")]
    Sink(#[from] super::sink_api::SinkError),
}

/// Overrides for people and tests; the manifest supplies everything else.
#[derive(Debug, Clone, Default)]
pub struct RunOverrides {
    /// Admin server address (default `<spec.admin.host, 0.0.0.0>:<metricsPort>`).
    pub admin_addr: Option<SocketAddr>,
    pub drain_timeout: Option<Duration>,
}

/// The identity this process announces: the pod name in Kubernetes, else the host name.
pub fn instance_name() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "wallaroo-connector".to_string())
}

/// Runs the connector until it completes (a finite source) or `shutdown` fires and the drain is over.
pub async fn run(connector: Connector, overrides: RunOverrides, shutdown: CancellationToken) -> Result<(), RunError> {
    let spec = &connector.spec;
    spec.validate().map_err(|e| RunError::Invalid(e.to_string()))?;
    let direction = spec.direction().ok_or_else(|| RunError::Invalid("spec: set one of source or sink".into()))?;
    let kind = spec.kind_name().unwrap_or("unknown");
    let metrics = Metrics::new(&spec.connector_name, kind, &direction.to_string())?;
    let health = Health::new();
    let admin_host: std::net::IpAddr = match spec.admin.as_ref().and_then(|a| a.host.as_deref()) {
        Some(h) => h
            .parse()
            .map_err(|_| RunError::Invalid(format!("spec.admin.host: {h:?} is not an IP address, e.g. 0.0.0.0")))?,
        None => std::net::Ipv4Addr::UNSPECIFIED.into(),
    };
    let admin_addr = overrides.admin_addr.unwrap_or_else(|| SocketAddr::new(admin_host, spec.metrics_port));
    let admin_stop = CancellationToken::new();
    let limits = admin::AdminLimits::from_settings(spec.admin.as_ref());
    let admin = admin::serve(admin_addr, limits, metrics.clone(), health.clone(), admin_stop.clone())
        .await
        .map_err(|source| RunError::Admin { addr: admin_addr, source })?;
    let bound = admin.addr;
    tracing::info!(connector = %spec.connector_name, %kind, %direction, admin = %bound, "starting");
    let cookie = spec.worker.resolve_cookie()?;
    // A cookie from a Secret is only seen now; HELLO carries it with a u16 length (validation checks inline ones).
    if cookie.len() > wallaroo_crds::MAX_SHORT_BYTES {
        return Err(RunError::Invalid(format!(
            "spec.worker.cookieFrom: the cookie is {} bytes long; at most {} fit HELLO's length field",
            cookie.len(),
            wallaroo_crds::MAX_SHORT_BYTES
        )));
    }
    let drain = overrides
        .drain_timeout
        .unwrap_or_else(|| Duration::from_secs(u64::from(spec.drain_timeout_seconds.unwrap_or(20))));
    let max_frame = spec.worker.max_frame_bytes.unwrap_or(wallaroo_crds::DEFAULT_MAX_FRAME_BYTES) as usize;
    let result = match direction {
        Direction::Source => {
            let source_spec = spec.source.as_ref().ok_or_else(|| RunError::Invalid("spec.source missing".into()))?;
            let integration = crate::sources::build(source_spec)?;
            let session = SourceSessionConfig {
                version: SOURCE_VERSION.to_string(),
                cookie,
                program_name: spec.worker.program_name.clone().unwrap_or_else(|| spec.connector_name.clone()),
                instance_name: spec.worker.instance_name.clone().unwrap_or_else(instance_name),
            };
            let mut cfg = SourceDriverConfig::new(format!("{}:{}", spec.worker.host, spec.worker.port), session);
            cfg.drain_timeout = drain;
            cfg.max_frame = max_frame;
            let driver = SourceDriver::start(cfg, integration, health.clone(), metrics.clone(), shutdown.clone());
            match driver.run(shutdown.clone()).await {
                Ok(SourceOutcome::Completed) => {
                    tracing::info!("every stream ended and was acknowledged; exiting");
                    Ok(())
                }
                Ok(SourceOutcome::Stopped { unacked }) => {
                    tracing::info!(unacked, "stopped");
                    Ok(())
                }
                Err(e) => Err(RunError::Source(e)),
            }
        }
        Direction::Sink => {
            let sink_spec = spec.sink.as_ref().ok_or_else(|| RunError::Invalid("spec.sink missing".into()))?;
            let sink = crate::sinks::build(sink_spec, health.clone(), metrics.clone()).await?;
            metrics.external_connected.set(i64::from(health.external()));
            let listen = format!("{}:{}", spec.worker.host, spec.worker.port);
            let mut cfg = SinkDriverConfig::new(
                listen.clone(),
                SinkSessionConfig { version: SINK_VERSION.to_string(), cookie, credits: 500 },
            );
            cfg.drain_timeout = drain;
            cfg.max_frame = max_frame;
            let w = &spec.worker;
            cfg.handshake_timeout = Duration::from_secs(u64::from(
                w.handshake_timeout_seconds.unwrap_or(wallaroo_crds::DEFAULT_HANDSHAKE_TIMEOUT_SECONDS),
            ));
            cfg.idle_timeout = w.idle_timeout_seconds.map(|s| Duration::from_secs(u64::from(s)));
            cfg.max_connections = w.max_connections.unwrap_or(wallaroo_crds::DEFAULT_MAX_CONNECTIONS) as usize;
            let (_addr, serving) = sink_driver::start(cfg, sink, health.clone(), metrics.clone(), shutdown.clone())
                .await
                .map_err(|source| RunError::Listen { addr: listen, source })?;
            let _ = serving.await;
            Ok(())
        }
    };
    health.set_stopping();
    admin_stop.cancel();
    let _ = admin.task.await;
    result
}
