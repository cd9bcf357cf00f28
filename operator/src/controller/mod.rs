//! The Connector controller (kube-runtime): watches Connectors and the metadata of opted-in pods, and reconciles.
pub mod leader;
pub mod pods;
mod reconcile;
pub mod rollout;
pub mod status;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use wallaroo_crds::Connector;

use crate::connector_cache::ConnectorCache;
use crate::inject::names::INJECT_LABEL;
use crate::inject::{injected_annotation, matching};
use crate::metrics::Metrics;
use crate::watch_merge::{Merged, watch_namespaces};
use pods::PodIndex;

pub use reconcile::{FINALIZER, REMOVED, reconcile};

pub struct Context {
    pub client: Client,
    /// Pods labelled for injection, as much of them as reconciles read.
    pub pods: PodIndex,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// `None` watches every namespace.
    pub namespaces: Option<BTreeSet<String>>,
    /// Check that referenced Secrets and keys exist (needs `get` on Secrets).
    pub validate_secrets: bool,
}

impl Context {
    pub fn watches(&self, ns: &str) -> bool {
        self.namespaces.as_ref().is_none_or(|set| set.contains(ns))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("Connector has no namespace")]
    NoNamespace,
}

impl Error {
    /// Bounded label value for `reconcile_errors_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "api_unreachable",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.reason()
                }
                _ => "finalizer",
            },
            Error::NoNamespace => "invalid_object",
        }
    }
}

pub fn error_policy(c: Arc<Connector>, err: &Error, ctx: Arc<Context>) -> Action {
    let reason = err.reason();
    ctx.metrics.reconcile_errors_total.with_label_values(&[reason]).inc();
    tracing::warn!(connector = c.name_any(), namespace = c.namespace(), reason, error = %err, "reconcile failed");
    // Conflicts resolve on the next read; anything else gets a little more room.
    Action::requeue(if reason == "conflict" { Duration::from_millis(200) } else { Duration::from_secs(10) })
}

/// Connectors a pod event concerns: those whose selector matches it now, and those it already runs.
pub fn connectors_for_pod(store: &Store<Connector>, pod: &PartialObjectMeta<Pod>) -> Vec<ObjectRef<Connector>> {
    let Some(ns) = pod.metadata.namespace.as_deref() else {
        return Vec::new();
    };
    let in_ns: Vec<Arc<Connector>> =
        store.state().into_iter().filter(|c| c.metadata.namespace.as_deref() == Some(ns)).collect();
    let mut names: BTreeSet<String> =
        matching(&pod.metadata, in_ns.iter().map(Arc::as_ref)).into_iter().map(|c| c.name_any()).collect();
    names.extend(injected_annotation(&pod.metadata).into_keys());
    names.into_iter().map(|n| ObjectRef::new(&n).within(ns)).collect()
}

/// Runs the controller until `shutdown` resolves, fed by the process's Connector cache.
pub async fn run(
    ctx: Arc<Context>,
    connectors: &ConnectorCache,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let pod_cfg = watcher::Config::default().labels(&format!("{INJECT_LABEL}=true"));
    let index = ctx.pods.clone();
    let pod_events = watch_namespaces::<PartialObjectMeta<Pod>>(&ctx.client, &ctx.namespaces, pod_cfg)
        .inspect_ok(move |m| index.apply_merged(m))
        .try_filter_map(|m| {
            futures::future::ready(Ok(match m {
                Merged::Event(ev) => Some(ev),
                Merged::Gone { .. } => None,
            }))
        })
        .touched_objects();
    let controller = Controller::for_shared_stream(connectors.triggers(), connectors.store())
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(500)).concurrency(8));
    let store = controller.store();
    controller
        .watches_stream(pod_events, move |pod| connectors_for_pod(&store, &pod))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
