//! The sidecar container for one Connector.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSpec, Probe,
    ResourceRequirements, SecretKeySelector, SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use wallaroo_crds::{Connector, ResourceSettings, secret_env_var};

use super::InjectConfig;
use super::names::{CONNECTOR_ENV, container_name, metrics_port_name};

/// The Connector as the sidecar reads it from `WALLAROO_CONNECTOR`: name, namespace and spec, nothing that changes
/// without a spec change (no status, no resourceVersion), so the container is stable across reconciles.
pub fn connector_json(c: &Connector, namespace: &str) -> Result<String, serde_json::Error> {
    let mut slim = Connector::new(c.metadata.name.as_deref().unwrap_or_default(), c.spec.clone());
    slim.metadata = ObjectMeta {
        name: c.metadata.name.clone(),
        namespace: Some(c.metadata.namespace.clone().unwrap_or_else(|| namespace.to_string())),
        ..ObjectMeta::default()
    };
    serde_json::to_string(&slim)
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.to_string(), api_version: None }),
            ..EnvVarSource::default()
        }),
    }
}

fn quantities(m: &BTreeMap<String, String>) -> Option<BTreeMap<String, Quantity>> {
    if m.is_empty() { None } else { Some(m.iter().map(|(k, v)| (k.clone(), Quantity(v.clone()))).collect()) }
}

/// The Connector's requests/limits, each map falling back to the chart default when the Connector leaves it empty.
fn resources(own: Option<&ResourceSettings>, default: &ResourceRequirements) -> ResourceRequirements {
    let own = own.cloned().unwrap_or_default();
    ResourceRequirements {
        requests: quantities(&own.requests).or_else(|| default.requests.clone()),
        limits: quantities(&own.limits).or_else(|| default.limits.clone()),
        claims: None,
    }
}

fn http_probe(path: &str, port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(port)),
            scheme: Some("HTTP".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Why the Connector cannot run in this pod as far as volumes go: a mount names a volume the pod lacks, or a file
/// the connector reads or writes would be on the sidecar's read-only image instead of a pod volume.
pub fn check_volumes(c: &Connector, pod: &PodSpec) -> Result<(), String> {
    for (i, m) in c.spec.volume_mounts.iter().enumerate() {
        if !pod.volumes.iter().flatten().any(|v| v.name == m.name) {
            return Err(format!(
                "spec.volumeMounts[{i}] names volume {:?}, which the pod does not have; add it to the pod's spec.volumes",
                m.name
            ));
        }
    }
    for (field, path) in c.spec.local_paths() {
        if c.spec.mount_for(path).is_none() {
            return Err(format!(
                "{field} {path:?} is not under any spec.volumeMounts mountPath; mount the pod volume that holds it"
            ));
        }
    }
    Ok(())
}

fn volume_mounts(c: &Connector) -> Option<Vec<VolumeMount>> {
    let mounts: Vec<VolumeMount> = c
        .spec
        .volume_mounts
        .iter()
        .map(|m| VolumeMount {
            name: m.name.clone(),
            mount_path: m.mount_path.clone(),
            read_only: m.read_only.then_some(true),
            sub_path: m.sub_path.clone(),
            ..VolumeMount::default()
        })
        .collect();
    (!mounts.is_empty()).then_some(mounts)
}

pub fn sidecar(c: &Connector, namespace: &str, cfg: &InjectConfig) -> Result<Container, serde_json::Error> {
    let name = c.metadata.name.as_deref().unwrap_or_default();
    let mut env = vec![
        EnvVar { name: CONNECTOR_ENV.to_string(), value: Some(connector_json(c, namespace)?), value_from: None },
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    // Only references go into the pod: the kubelet resolves them, so secret values never pass through the
    // operator or appear in the pod spec.
    env.extend(c.spec.secret_refs().into_iter().map(|r| EnvVar {
        name: secret_env_var(&r.name, &r.key),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: r.name, key: r.key, optional: Some(false) }),
            ..EnvVarSource::default()
        }),
    }));
    let port = c.spec.metrics_port;
    Ok(Container {
        name: container_name(name),
        image: Some(cfg.image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        command: Some(vec!["wallaroo-connector".to_string()]),
        args: Some(vec!["run".to_string()]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some(metrics_port_name(name)),
            container_port: i32::from(port),
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(http_probe("/readyz", port, 5, 3)),
        // Generous start-up window: a sink may wait for its first worker connection or a broker before it is ready.
        startup_probe: Some(http_probe("/readyz", port, 2, 90)),
        liveness_probe: Some(http_probe("/livez", port, 10, 3)),
        resources: Some(resources(c.spec.resources.as_ref(), &cfg.default_resources)),
        restart_policy: cfg.native_sidecars.then(|| "Always".to_string()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_string()]), add: None }),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        volume_mounts: volume_mounts(c),
        ..Container::default()
    })
}
