//! Rolling the workloads that own a Connector's pods, the way `kubectl rollout restart` does: by changing a
//! pod-template annotation, which makes the workload controller replace its pods at its own pace.
use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::pods::Owner;
use serde_json::json;

/// A workload whose pod template can be rolled.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    Deployment(String),
    StatefulSet(String),
    DaemonSet(String),
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Deployment(n) => write!(f, "Deployment/{n}"),
            Workload::StatefulSet(n) => write!(f, "StatefulSet/{n}"),
            Workload::DaemonSet(n) => write!(f, "DaemonSet/{n}"),
        }
    }
}

fn controller_of(refs: Option<&Vec<OwnerReference>>) -> Option<&OwnerReference> {
    refs.into_iter().flatten().find(|r| r.controller == Some(true))
}

/// The rollable workload that owns a pod, if any. A ReplicaSet is followed to its Deployment (one GET).
pub async fn owner(
    client: &Client,
    namespace: &str,
    pod_owner: Option<&Owner>,
) -> Result<Option<Workload>, kube::Error> {
    let Some(o) = pod_owner else {
        return Ok(None);
    };
    if !o.api_version.starts_with("apps/") {
        return Ok(None);
    }
    Ok(match &*o.kind {
        "StatefulSet" => Some(Workload::StatefulSet(o.name.to_string())),
        "DaemonSet" => Some(Workload::DaemonSet(o.name.to_string())),
        "ReplicaSet" => {
            let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
            rs.get_opt(&o.name).await?.and_then(|rs| {
                controller_of(rs.metadata.owner_references.as_ref())
                    .filter(|d| d.kind == "Deployment")
                    .map(|d| Workload::Deployment(d.name.clone()))
            })
        }
        _ => None,
    })
}

fn template_annotation<T>(obj: &T, key: &str) -> Option<String>
where
    T: serde::Serialize,
{
    serde_json::to_value(obj)
        .ok()?
        .pointer(&format!("/spec/template/metadata/annotations/{}", key.replace('~', "~0").replace('/', "~1")))
        .and_then(|v| v.as_str().map(str::to_string))
}

/// Sets `key: value` on the workload's pod template unless it is already there (so repeated reconciles of the same
/// change roll once). Returns whether a rollout was started.
pub async fn roll(client: &Client, namespace: &str, w: &Workload, key: &str, value: &str) -> Result<bool, kube::Error> {
    let patch = Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {key: value}}}}}));
    let pp = PatchParams::default();
    macro_rules! roll_kind {
        ($t:ty, $name:expr) => {{
            let api: Api<$t> = Api::namespaced(client.clone(), namespace);
            match api.get_opt($name).await? {
                None => false,
                Some(obj) if template_annotation(&obj, key).as_deref() == Some(value) => false,
                Some(_) => {
                    api.patch($name, &pp, &patch).await?;
                    true
                }
            }
        }};
    }
    Ok(match w {
        Workload::Deployment(n) => roll_kind!(Deployment, n),
        Workload::StatefulSet(n) => roll_kind!(StatefulSet, n),
        Workload::DaemonSet(n) => roll_kind!(DaemonSet, n),
    })
}

/// Distinct workloads in a deterministic order, so a reconcile's API calls are reproducible.
pub fn distinct(ws: impl IntoIterator<Item = Workload>) -> Vec<Workload> {
    ws.into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}
