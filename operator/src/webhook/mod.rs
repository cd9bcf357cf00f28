//! The mutating admission webhook: `AdmissionReview` in, JSON patch out, over HTTPS.
pub mod certs;
pub mod client;
pub mod server;
pub mod tls;

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Resource;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use kube::runtime::reflector::Store;
use tokio::sync::mpsc;
use wallaroo_crds::Connector;

use crate::inject::{InjectConfig, inject_pod, matching, wants_injection};
use crate::metrics::{Metrics, Outcome};

/// Where the webhook finds the Connectors of a namespace. Production reads the controller's reflector cache, so
/// admission makes no API calls; tests and benchmarks use a fixed list.
pub trait ConnectorLookup: Send + Sync + 'static {
    fn in_namespace(&self, namespace: &str) -> Vec<Arc<Connector>>;
}

impl ConnectorLookup for Store<Connector> {
    fn in_namespace(&self, namespace: &str) -> Vec<Arc<Connector>> {
        self.state().into_iter().filter(|c| c.metadata.namespace.as_deref() == Some(namespace)).collect()
    }
}

impl ConnectorLookup for Vec<Arc<Connector>> {
    fn in_namespace(&self, namespace: &str) -> Vec<Arc<Connector>> {
        self.iter().filter(|c| c.metadata.namespace.as_deref() == Some(namespace)).cloned().collect()
    }
}

/// An injection to publish as a Kubernetes Event on the Connector (the pod has no uid yet at admission time).
#[derive(Debug, Clone)]
pub struct InjectionEvent {
    pub connector: ObjectReference,
    pub pod: String,
    pub warning: Option<String>,
}

pub struct Webhook {
    connectors: Arc<dyn ConnectorLookup>,
    config: Arc<InjectConfig>,
    metrics: Metrics,
    events: Option<mpsc::Sender<InjectionEvent>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("AdmissionReview has no request")]
    NoRequest,
}

impl Webhook {
    pub fn new(
        connectors: Arc<dyn ConnectorLookup>,
        config: Arc<InjectConfig>,
        metrics: Metrics,
        events: Option<mpsc::Sender<InjectionEvent>>,
    ) -> Self {
        Self { connectors, config, metrics, events }
    }

    /// Answers one AdmissionReview body. An undecodable body is an error (HTTP 400); everything else gets a response,
    /// and only a pod we cannot read is denied, since letting it through would hide the problem.
    pub fn review(&self, body: &[u8]) -> Result<Vec<u8>, ReviewError> {
        let start = Instant::now();
        let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                let out = self.fallback(body, e);
                self.metrics.admission(Outcome::Invalid, start.elapsed().as_secs_f64());
                return out;
            }
        };
        let request: AdmissionRequest<Pod> = review.try_into().map_err(|_| ReviewError::NoRequest)?;
        let (response, outcome) = self.mutate(&request);
        self.metrics.admission(outcome, start.elapsed().as_secs_f64());
        Ok(serde_json::to_vec(&ReviewOut::new(response))?)
    }

    /// A body that names a request uid but whose pod does not decode still gets a proper denial, so the API server
    /// reports our message instead of a generic webhook failure.
    fn fallback(&self, body: &[u8], err: serde_json::Error) -> Result<Vec<u8>, ReviewError> {
        let value: serde_json::Value = serde_json::from_slice(body)?;
        let uid = value.pointer("/request/uid").and_then(|v| v.as_str()).ok_or(ReviewError::Decode(err))?;
        tracing::warn!(uid, "undecodable pod in AdmissionReview");
        let response = Response::new(uid).deny(400, "pod does not decode; see the operator's logs");
        Ok(serde_json::to_vec(&ReviewOut::new(response))?)
    }

    fn mutate(&self, req: &AdmissionRequest<Pod>) -> (Response, Outcome) {
        let response = Response::new(&req.uid);
        let Some(pod) = req.object.as_ref() else {
            return (response, Outcome::Ignored);
        };
        if req.operation != Operation::Create || req.kind.kind != "Pod" || req.sub_resource.is_some() {
            return (response, Outcome::Ignored);
        }
        // The object selector should make this unreachable; checking again keeps a misconfigured webhook harmless.
        if !wants_injection(&pod.metadata) {
            return (response, Outcome::Ignored);
        }
        let namespace = req.namespace.clone().or_else(|| pod.metadata.namespace.clone()).unwrap_or_default();
        let pod_name = pod.metadata.name.clone().or_else(|| pod.metadata.generate_name.clone()).unwrap_or_default();
        let available = self.connectors.in_namespace(&namespace);
        let refs: Vec<&Connector> = available.iter().map(Arc::as_ref).collect();
        if matching(&pod.metadata, refs.iter().copied()).is_empty() {
            tracing::warn!(namespace, pod = pod_name, "pod asks for injection but no Connector selects it");
            let warning = format!(
                "wallaroo.dev/inject is true but no Connector in namespace {namespace} selects this pod; admitted unchanged"
            );
            return (response.warn(vec![warning]), Outcome::NoMatch);
        }

        let mut mutated = pod.clone();
        let spec = mutated.spec.get_or_insert_default();
        let outcome = match inject_pod(&mut mutated.metadata, spec, &namespace, &refs, &self.config) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(namespace, pod = pod_name, error = %e, "injection failed");
                return (response.deny(500, format!("wallaroo connector injection failed: {e}")), Outcome::Error);
            }
        };
        let warnings = outcome.warnings();
        if !outcome.changed {
            return (response.warn(warnings), Outcome::Unchanged);
        }
        let patch = match (serde_json::to_value(pod), serde_json::to_value(&mutated)) {
            (Ok(before), Ok(after)) => json_patch::diff(&before, &after),
            (Err(e), _) | (_, Err(e)) => {
                return (response.deny(500, format!("cannot encode pod: {e}")), Outcome::Error);
            }
        };
        let response = match serde_json::to_vec(&patch) {
            Ok(p) => response.patch(&p),
            Err(e) => {
                return (response.deny(500, format!("cannot encode patch: {e}")), Outcome::Error);
            }
        };
        if !req.dry_run {
            self.metrics.injected_sidecars_total.inc_by(outcome.injected.len() as u64);
            self.publish(&available, &outcome, &pod_name);
        }
        tracing::debug!(namespace, pod = pod_name, connectors = ?outcome.injected.keys().collect::<Vec<_>>(), "injected");
        (response.warn(warnings), Outcome::Injected)
    }

    fn publish(&self, available: &[Arc<Connector>], outcome: &crate::inject::InjectOutcome, pod: &str) {
        let Some(tx) = &self.events else { return };
        for c in available {
            let Some(name) = c.metadata.name.as_deref() else {
                continue;
            };
            let warning = outcome.skipped.iter().find(|(n, _)| n == name).map(|(_, why)| why.clone());
            if !outcome.injected.contains_key(name) && warning.is_none() {
                continue;
            }
            // Events are best effort: when the publisher lags, dropping one beats slowing admission down.
            let _ = tx.try_send(InjectionEvent { connector: c.object_ref(&()), pod: pod.to_string(), warning });
        }
    }
}

/// `admission.k8s.io/v1` AdmissionReview response, written out here so the patch is base64 as the API server
/// decodes Go's `[]byte`.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut {
    api_version: &'static str,
    kind: &'static str,
    response: Response,
}

impl ReviewOut {
    fn new(response: Response) -> Self {
        Self { api_version: "admission.k8s.io/v1", kind: "AdmissionReview", response }
    }
}

#[derive(serde::Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Response {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<DenyStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

#[derive(serde::Serialize, Debug)]
struct DenyStatus {
    code: u16,
    message: String,
}

impl Response {
    fn new(uid: &str) -> Self {
        Self { uid: uid.to_string(), allowed: true, status: None, patch: None, patch_type: None, warnings: Vec::new() }
    }

    fn deny(mut self, code: u16, message: impl Into<String>) -> Self {
        self.allowed = false;
        self.status = Some(DenyStatus { code, message: message.into() });
        self
    }

    fn patch(mut self, json_patch: &[u8]) -> Self {
        use base64::Engine as _;
        self.patch = Some(base64::engine::general_purpose::STANDARD.encode(json_patch));
        self.patch_type = Some("JSONPatch");
        self
    }

    fn warn(mut self, warnings: Vec<String>) -> Self {
        self.warnings.extend(warnings);
        self
    }
}

#[cfg(test)]
mod tests;
