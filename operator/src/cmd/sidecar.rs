//! Sidecar settings shared by `run` and `inject`, so both produce the same containers from the same flags.
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use wallaroo_operator::inject::{InjectConfig, SidecarMode};

#[derive(clap::Args, Debug, Clone)]
pub struct SidecarArgs {
    /// Image of the injected container (it must contain the `wallaroo-connector` binary).
    #[arg(long, env = "SIDECAR_IMAGE", default_value = "ghcr.io/wallaroo-labs/wallaroo-connectors:0.1.0")]
    pub sidecar_image: String,
    /// imagePullPolicy of the injected container; the cluster default when unset.
    #[arg(long, env = "SIDECAR_IMAGE_PULL_POLICY")]
    pub sidecar_image_pull_policy: Option<String>,
    /// Native sidecars (init containers with restartPolicy Always) need Kubernetes >= 1.29; `auto` checks.
    #[arg(long, env = "SIDECAR_MODE", value_enum, default_value = "auto")]
    pub sidecar_mode: SidecarMode,
    /// Default requests/limits for Connectors that set no `spec.resources`; empty disables one.
    #[arg(long, env = "SIDECAR_CPU_REQUEST", default_value = "10m")]
    pub sidecar_cpu_request: String,
    #[arg(long, env = "SIDECAR_MEMORY_REQUEST", default_value = "32Mi")]
    pub sidecar_memory_request: String,
    #[arg(long, env = "SIDECAR_CPU_LIMIT", default_value = "")]
    pub sidecar_cpu_limit: String,
    #[arg(long, env = "SIDECAR_MEMORY_LIMIT", default_value = "128Mi")]
    pub sidecar_memory_limit: String,
}

fn quantities(pairs: &[(&str, &str)]) -> Option<std::collections::BTreeMap<String, Quantity>> {
    let m: std::collections::BTreeMap<String, Quantity> = pairs
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k.to_string(), Quantity(v.trim().to_string())))
        .collect();
    if m.is_empty() { None } else { Some(m) }
}

impl SidecarArgs {
    pub fn config(&self, native_sidecars: bool) -> InjectConfig {
        InjectConfig {
            image: self.sidecar_image.clone(),
            image_pull_policy: self.sidecar_image_pull_policy.clone().filter(|p| !p.is_empty()),
            default_resources: ResourceRequirements {
                requests: quantities(&[("cpu", &self.sidecar_cpu_request), ("memory", &self.sidecar_memory_request)]),
                limits: quantities(&[("cpu", &self.sidecar_cpu_limit), ("memory", &self.sidecar_memory_limit)]),
                claims: None,
            },
            native_sidecars,
        }
    }
}
