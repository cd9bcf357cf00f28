//! Offline injection for GitOps and for trying the operator without a cluster: reads workloads from multi-document
//! YAML, runs [`super::inject_pod`] on every pod template that opts in, and returns the documents.
use k8s_openapi::api::core::v1::PodSpec;
use kube::api::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;
use wallaroo_crds::Connector;

use super::{InjectConfig, InjectError, InjectOutcome, inject_pod, wants_injection};

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("document {doc}: {source}")]
    Yaml { doc: usize, source: serde_yaml::Error },
    #[error("document {doc} ({kind} {name}): pod template is not a valid pod spec: {source}")]
    Template { doc: usize, kind: String, name: String, source: serde_json::Error },
    #[error("document {doc}: {source}")]
    Inject { doc: usize, source: InjectError },
}

/// One processed document: its identity and what injection did to it.
#[derive(Debug, Clone)]
pub struct DocReport {
    pub kind: String,
    pub name: String,
    pub outcome: Option<InjectOutcome>,
}

#[derive(Debug, Deserialize)]
struct Template {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<PodSpec>,
}

/// Where the pod template lives in each supported kind.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn at_path<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

fn connectors_for<'a>(connectors: &'a [Connector], namespace: &str) -> Vec<&'a Connector> {
    // A Connector without a namespace applies wherever the workload goes, as `kubectl apply -n` would place it.
    connectors.iter().filter(|c| c.metadata.namespace.as_deref().is_none_or(|ns| ns == namespace)).collect()
}

/// Injects into every opted-in pod template in `text`. Documents of other kinds pass through unchanged.
pub fn inject_documents(
    text: &str,
    connectors: &[Connector],
    default_namespace: &str,
    cfg: &InjectConfig,
) -> Result<(Vec<Value>, Vec<DocReport>), OfflineError> {
    let mut docs = Vec::new();
    let mut reports = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let mut value = Value::deserialize(de).map_err(|source| OfflineError::Yaml { doc, source })?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        let name = value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
        let namespace =
            value.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(default_namespace).to_string();
        let mut report = DocReport { kind: kind.clone(), name: name.clone(), outcome: None };
        if let Some(slot) = template_path(&kind).and_then(|p| at_path(&mut value, p)) {
            let tpl: Template = serde_json::from_value(slot.clone()).map_err(|source| OfflineError::Template {
                doc,
                kind: kind.clone(),
                name: name.clone(),
                source,
            })?;
            if let (true, Some(mut spec)) = (wants_injection(&tpl.metadata), tpl.spec) {
                let mut meta = tpl.metadata;
                let ours = connectors_for(connectors, &namespace);
                let outcome = inject_pod(&mut meta, &mut spec, &namespace, &ours, cfg)
                    .map_err(|source| OfflineError::Inject { doc, source })?;
                if outcome.changed {
                    write_back(slot, &meta, &spec).map_err(|source| OfflineError::Template {
                        doc,
                        kind: kind.clone(),
                        name: name.clone(),
                        source,
                    })?;
                }
                report.outcome = Some(outcome);
            }
        }
        docs.push(value);
        reports.push(report);
    }
    Ok((docs, reports))
}

fn write_back(slot: &mut Value, meta: &ObjectMeta, spec: &PodSpec) -> Result<(), serde_json::Error> {
    if let Value::Object(map) = slot {
        map.insert("metadata".to_string(), serde_json::to_value(meta)?);
        map.insert("spec".to_string(), serde_json::to_value(spec)?);
    }
    Ok(())
}

/// Renders documents as multi-document YAML.
pub fn to_yaml(docs: &[Value]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(d)?);
    }
    Ok(out)
}
