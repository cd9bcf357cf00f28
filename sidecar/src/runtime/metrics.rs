//! One metrics vocabulary for every connector (architecture.md): prefix `wallaroo_connector_`, const labels
//! `connector`, `kind`, `direction` on every series, nothing unbounded.
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub messages_total: IntCounter,
    pub bytes_total: IntCounter,
    pub errors_total: IntCounterVec,
    pub credits_available: IntGauge,
    pub acked_point_of_reference: GaugeVec,
    pub twopc_rounds_total: IntCounterVec,
    pub reconnects_total: IntCounterVec,
    pub worker_connected: IntGauge,
    pub external_connected: IntGauge,
    pub batch_duration_seconds: HistogramVec,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new(connector: &str, kind: &str, direction: &str) -> Result<Self, MetricsError> {
        let mut labels = std::collections::HashMap::new();
        labels.insert("connector".to_string(), connector.to_string());
        labels.insert("kind".to_string(), kind.to_string());
        labels.insert("direction".to_string(), direction.to_string());
        let registry = Registry::new_custom(Some("wallaroo_connector".to_string()), Some(labels))?;
        let messages_total =
            IntCounter::new("messages_total", "Messages moved between the worker and the external system")?;
        let bytes_total =
            IntCounter::new("bytes_total", "Payload bytes moved between the worker and the external system")?;
        let errors_total =
            IntCounterVec::new(Opts::new("errors_total", "Errors by type and stage"), &["error_type", "stage"])?;
        let credits_available = IntGauge::new("credits_available", "Source credits currently available")?;
        let acked_point_of_reference = GaugeVec::new(
            Opts::new("acked_point_of_reference", "Last point of reference the worker acknowledged, per stream"),
            &["stream"],
        )?;
        let twopc_rounds_total =
            IntCounterVec::new(Opts::new("twopc_rounds_total", "Two-phase-commit rounds by outcome"), &["outcome"])?;
        let reconnects_total = IntCounterVec::new(Opts::new("reconnects_total", "Reconnects by peer"), &["peer"])?;
        let worker_connected = IntGauge::new("worker_connected", "Worker connections up")?;
        let external_connected = IntGauge::new("external_connected", "1 when the external system is reachable")?;
        let batch_duration_seconds = HistogramVec::new(
            HistogramOpts::new("batch_duration_seconds", "Duration of batch operations against the external system")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["operation"],
        )?;
        registry.register(Box::new(messages_total.clone()))?;
        registry.register(Box::new(bytes_total.clone()))?;
        registry.register(Box::new(errors_total.clone()))?;
        registry.register(Box::new(credits_available.clone()))?;
        registry.register(Box::new(acked_point_of_reference.clone()))?;
        registry.register(Box::new(twopc_rounds_total.clone()))?;
        registry.register(Box::new(reconnects_total.clone()))?;
        registry.register(Box::new(worker_connected.clone()))?;
        registry.register(Box::new(external_connected.clone()))?;
        registry.register(Box::new(batch_duration_seconds.clone()))?;
        Ok(Self {
            registry,
            messages_total,
            bytes_total,
            errors_total,
            credits_available,
            acked_point_of_reference,
            twopc_rounds_total,
            reconnects_total,
            worker_connected,
            external_connected,
            batch_duration_seconds,
        })
    }

    /// A registry for tests and the simulator, where labels do not matter.
    pub fn unlabelled() -> Self {
        // Only fails on duplicate registration, which cannot happen on a fresh registry.
        Self::new("", "", "").unwrap_or_else(|e| panic!("fresh metrics registry: {e}"))
    }

    pub fn error(&self, error_type: &str, stage: &str) {
        self.errors_total.with_label_values(&[error_type, stage]).inc();
    }

    pub fn acked(&self, stream: &str, por: u64) {
        // f64 is exact up to 2^53; beyond that the gauge is approximate, which is fine for dashboards.
        let g: Gauge = self.acked_point_of_reference.with_label_values(&[stream]);
        g.set(por as f64);
    }

    pub fn observe(&self, operation: &str, started: std::time::Instant) {
        self.batch_duration_seconds.with_label_values(&[operation]).observe(started.elapsed().as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
