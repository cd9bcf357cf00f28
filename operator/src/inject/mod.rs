//! The pure mutation: (pod metadata + spec, Connectors, settings) -> mutated pod. Both the admission webhook and
//! the offline `inject` command call [`inject_pod`], so they cannot disagree.
mod container;
pub mod names;
pub mod offline;
pub mod selector;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
use kube::api::ObjectMeta;
use wallaroo_crds::Connector;

pub use container::connector_json;
use names::{CONNECTOR_ENV, INJECTED_ANNOTATION, SKIPPED_ANNOTATION, container_name};

/// Seconds the pod keeps for the main container after the sidecars' drain budget.
const GRACE_MARGIN_SECONDS: i64 = 5;
const DEFAULT_DRAIN_SECONDS: i64 = 20;
const DEFAULT_POD_GRACE_SECONDS: i64 = 30;

/// How the sidecar is placed: native sidecars (init containers with `restartPolicy: Always`) start before and stop
/// after the worker, which is what a connector wants; they need Kubernetes >= 1.29.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SidecarMode {
    Auto,
    Always,
    Never,
}

impl SidecarMode {
    /// Resolves `auto` against a server version such as `("1", "30+")`.
    pub fn native_for(self, major: &str, minor: &str) -> bool {
        match self {
            SidecarMode::Always => true,
            SidecarMode::Never => false,
            SidecarMode::Auto => {
                let num = |s: &str| s.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().ok();
                matches!((num(major), num(minor)), (Some(ma), Some(mi)) if ma > 1 || (ma == 1 && mi >= 29))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct InjectConfig {
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub default_resources: ResourceRequirements,
    pub native_sidecars: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("cannot encode Connector {name} as JSON: {source}")]
    Encode { name: String, source: serde_json::Error },
}

/// What happened to one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InjectOutcome {
    /// Connector name -> spec hash, for every sidecar now in the pod.
    pub injected: BTreeMap<String, String>,
    /// Connectors that matched but were not injected, with the reason (shown to the user as a warning).
    pub skipped: Vec<(String, String)>,
    /// Sidecars of Connectors that no longer match, removed on re-invocation.
    pub removed: Vec<String>,
    pub changed: bool,
}

impl InjectOutcome {
    pub fn warnings(&self) -> Vec<String> {
        self.skipped.iter().map(|(c, why)| format!("Connector {c} not injected: {why}")).collect()
    }
}

/// Whether the pod opted in with `wallaroo.dev/inject: "true"`.
pub fn wants_injection(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().and_then(|l| l.get(names::INJECT_LABEL)).is_some_and(|v| v == "true")
}

/// Connectors whose selector matches the pod's labels. A Connector without a selector matches no pod.
pub fn matching<'a>(meta: &ObjectMeta, connectors: impl IntoIterator<Item = &'a Connector>) -> Vec<&'a Connector> {
    let mut out: Vec<&Connector> = connectors
        .into_iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .filter(|c| c.spec.selector.as_ref().is_some_and(|s| selector::matches(s, meta.labels.as_ref())))
        .collect();
    out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out.dedup_by(|a, b| a.metadata.name == b.metadata.name);
    out
}

/// A matching Connector the pod did not take, as recorded on the pod.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Skip {
    pub spec_hash: String,
    pub reason: String,
}

/// The `{connector: skip}` map recorded on a pod, empty when absent or unreadable.
pub fn skipped_annotation(meta: &ObjectMeta) -> BTreeMap<String, Skip> {
    meta.annotations.as_ref().and_then(|a| a.get(SKIPPED_ANNOTATION)).map(|v| parse_skips(v)).unwrap_or_default()
}

/// Parses the value of the `wallaroo.dev/skipped` annotation; empty when unreadable.
pub fn parse_skips(raw: &str) -> BTreeMap<String, Skip> {
    serde_json::from_str(raw).unwrap_or_default()
}

/// The `{connector: spec hash}` map recorded on a pod, empty when absent or unreadable.
pub fn injected_annotation(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(INJECTED_ANNOTATION))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

fn is_ours(c: &Container) -> bool {
    c.env.iter().flatten().any(|e| e.name == CONNECTOR_ENV)
}

enum Slot {
    Init(usize),
    Main(usize),
}

fn find(spec: &PodSpec, name: &str) -> Option<Slot> {
    if let Some(i) = spec.init_containers.iter().flatten().position(|c| c.name == name) {
        return Some(Slot::Init(i));
    }
    spec.containers.iter().position(|c| c.name == name).map(Slot::Main)
}

fn take(spec: &mut PodSpec, slot: Slot) -> Container {
    match slot {
        Slot::Init(i) => spec.init_containers.get_or_insert_default().remove(i),
        Slot::Main(i) => spec.containers.remove(i),
    }
}

/// Puts `sidecar` in place of the container it replaces (keeping its position, so re-invocation is a no-op), or
/// appends it: native sidecars after the user's init containers, regular ones after the user's containers.
fn place(spec: &mut PodSpec, sidecar: Container, native: bool) {
    match (find(spec, &sidecar.name), native) {
        (Some(Slot::Init(i)), true) => spec.init_containers.get_or_insert_default()[i] = sidecar,
        (Some(Slot::Main(i)), false) => spec.containers[i] = sidecar,
        (Some(slot), _) => {
            take(spec, slot);
            place(spec, sidecar, native);
        }
        (None, true) => spec.init_containers.get_or_insert_default().push(sidecar),
        (None, false) => spec.containers.push(sidecar),
    }
}

/// Injects one sidecar per matching Connector into the pod (or pod template) and records the outcome in the
/// `wallaroo.dev/injected` annotation. Idempotent: running it on its own output changes nothing.
pub fn inject_pod(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    namespace: &str,
    connectors: &[&Connector],
    cfg: &InjectConfig,
) -> Result<InjectOutcome, InjectError> {
    let before_meta = meta.clone();
    let before_spec = spec.clone();
    let previous = injected_annotation(meta);
    let mut out = InjectOutcome::default();
    let mut skips: BTreeMap<String, Skip> = BTreeMap::new();
    let mut drain = 0_i64;

    for c in matching(meta, connectors.iter().copied()) {
        let name = c.metadata.name.clone().unwrap_or_default();
        let spec_hash = c.spec.spec_hash();
        let cname = container_name(&name);
        let clash = || {
            find(spec, &cname).is_some_and(|slot| match slot {
                Slot::Init(i) => spec.init_containers.iter().flatten().nth(i).is_some_and(|c| !is_ours(c)),
                Slot::Main(i) => spec.containers.get(i).is_some_and(|c| !is_ours(c)),
            })
        };
        let refusal = match c.spec.validate() {
            Err(e) => Some(format!("invalid spec: {e}")),
            Ok(()) if clash() => Some(format!("the pod already has a container named {cname}")),
            Ok(()) => container::check_volumes(c, spec).err(),
        };
        if let Some(reason) = refusal {
            skips.insert(name.clone(), Skip { spec_hash, reason: reason.clone() });
            out.skipped.push((name, reason));
            continue;
        }
        let sidecar = container::sidecar(c, namespace, cfg)
            .map_err(|source| InjectError::Encode { name: name.clone(), source })?;
        place(spec, sidecar, cfg.native_sidecars);
        drain = drain.max(c.spec.drain_timeout_seconds.map_or(DEFAULT_DRAIN_SECONDS, i64::from));
        out.injected.insert(name, spec_hash);
    }

    for stale in previous.keys().filter(|n| !out.injected.contains_key(*n)) {
        let cname = container_name(stale);
        if let Some(slot) = find(spec, &cname) {
            let ours = match &slot {
                Slot::Init(i) => spec.init_containers.iter().flatten().nth(*i).is_some_and(is_ours),
                Slot::Main(i) => spec.containers.get(*i).is_some_and(is_ours),
            };
            if ours {
                take(spec, slot);
                out.removed.push(stale.clone());
            }
        }
    }
    if spec.init_containers.as_ref().is_some_and(Vec::is_empty) {
        spec.init_containers = None;
    }

    let annotations = meta.annotations.get_or_insert_default();
    // Map serialization cannot fail; the fallback keeps the function total without a panic path.
    let mut record = |key: &str, value: Option<String>| match value {
        Some(v) => annotations.insert(key.to_string(), v),
        None => annotations.remove(key),
    };
    record(
        INJECTED_ANNOTATION,
        (!out.injected.is_empty()).then(|| serde_json::to_string(&out.injected).unwrap_or_default()),
    );
    record(SKIPPED_ANNOTATION, (!skips.is_empty()).then(|| serde_json::to_string(&skips).unwrap_or_default()));
    if annotations.is_empty() {
        meta.annotations = None;
    }

    // The sidecars drain outstanding acks on SIGTERM; the pod must give them that long.
    if !out.injected.is_empty() {
        let grace = spec.termination_grace_period_seconds.unwrap_or(DEFAULT_POD_GRACE_SECONDS);
        if grace < drain + GRACE_MARGIN_SECONDS {
            spec.termination_grace_period_seconds = Some(drain + GRACE_MARGIN_SECONDS);
        }
    }

    out.changed = *meta != before_meta || *spec != before_spec;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
