//! The operator's Prometheus series (`wallaroo_operator_*`), all with bounded label values.
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconcile_total: IntCounter,
    pub reconcile_errors_total: IntCounterVec,
    pub reconcile_duration_seconds: Histogram,
    pub admission_requests_total: IntCounterVec,
    pub admission_duration_seconds: Histogram,
    pub injected_sidecars_total: IntCounter,
    pub rollouts_total: IntCounter,
}

/// Admission outcomes, the only values of the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Unchanged,
    NoMatch,
    Ignored,
    Invalid,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Unchanged => "unchanged",
            Outcome::NoMatch => "no_match",
            Outcome::Ignored => "ignored",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let ns = "wallaroo_operator";
        let counter = |name: &str, help: &str| IntCounter::with_opts(Opts::new(name, help).namespace(ns));
        let reconcile_total = counter("reconcile_total", "Connector reconciliations run")?;
        let reconcile_errors_total = IntCounterVec::new(
            Opts::new("reconcile_errors_total", "Failed reconciliations by reason").namespace(ns),
            &["reason"],
        )?;
        // Reconciles make a few API calls; admission is in-memory work plus TLS, hence the finer buckets.
        let reconcile_duration_seconds = Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "Time spent reconciling one Connector")
                .namespace(ns)
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let admission_requests_total = IntCounterVec::new(
            Opts::new("admission_requests_total", "AdmissionReview requests by outcome").namespace(ns),
            &["outcome"],
        )?;
        let admission_duration_seconds = Histogram::with_opts(
            HistogramOpts::new("admission_duration_seconds", "Time to answer one AdmissionReview")
                .namespace(ns)
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 1.0]),
        )?;
        let injected_sidecars_total = counter("injected_sidecars_total", "Sidecar containers injected into pods")?;
        let rollouts_total = counter("rollouts_total", "Workload rollouts triggered by Connector changes")?;
        registry.register(Box::new(reconcile_total.clone()))?;
        registry.register(Box::new(reconcile_errors_total.clone()))?;
        registry.register(Box::new(reconcile_duration_seconds.clone()))?;
        registry.register(Box::new(admission_requests_total.clone()))?;
        registry.register(Box::new(admission_duration_seconds.clone()))?;
        registry.register(Box::new(injected_sidecars_total.clone()))?;
        registry.register(Box::new(rollouts_total.clone()))?;
        for o in [
            Outcome::Injected,
            Outcome::Unchanged,
            Outcome::NoMatch,
            Outcome::Ignored,
            Outcome::Invalid,
            Outcome::Error,
        ] {
            admission_requests_total.with_label_values(&[o.as_str()]);
        }
        Ok(Self {
            registry,
            reconcile_total,
            reconcile_errors_total,
            reconcile_duration_seconds,
            admission_requests_total,
            admission_duration_seconds,
            injected_sidecars_total,
            rollouts_total,
        })
    }

    pub fn admission(&self, outcome: Outcome, seconds: f64) {
        self.admission_requests_total.with_label_values(&[outcome.as_str()]).inc();
        self.admission_duration_seconds.observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which `Metrics::new` cannot build.
        if TextEncoder::new().encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_use_the_agreed_names() {
        let m = Metrics::new().expect("metrics");
        m.admission(Outcome::Injected, 0.001);
        m.reconcile_errors_total.with_label_values(&["kube_api"]).inc();
        let text = m.render();
        for name in [
            "wallaroo_operator_reconcile_total",
            "wallaroo_operator_reconcile_errors_total{reason=\"kube_api\"} 1",
            "wallaroo_operator_reconcile_duration_seconds_bucket",
            "wallaroo_operator_admission_requests_total{outcome=\"injected\"} 1",
            "wallaroo_operator_admission_duration_seconds_count 1",
            "wallaroo_operator_injected_sidecars_total",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
