use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::secret::SecretValue;
use crate::sinks::SinkSpec;
use crate::sources::SourceSpec;
use crate::status::ConnectorStatus;

pub const DEFAULT_COOKIE: &str = "Dragons-Love-Tacos";
pub const DEFAULT_METRICS_PORT: u16 = 9464;

/// A connector that runs next to Wallaroo workers: exactly one of `source` or `sink`, each with exactly one kind.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[kube(
    group = "wallaroo.dev",
    version = "v1alpha1",
    kind = "Connector",
    namespaced,
    status = "ConnectorStatus",
    shortname = "wconn",
    category = "wallaroo",
    printcolumn = r#"{"name":"Direction","type":"string","jsonPath":".status.direction"}"#,
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".status.kind"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Injected","type":"integer","jsonPath":".status.injectedPods"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.source) != has(self.sink)", "message": "set exactly one of source or sink"},
    {"rule": "!has(self.sink) || self.metricsPort != self.worker.port", "message": "metricsPort must differ from worker.port for a sink"}
]))]
pub struct ConnectorSpec {
    /// The name given to `source_connector()` / `sink_connector()` in the Wallaroo application.
    pub connector_name: String,
    /// Worker pods that get this connector as a sidecar (used by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// How to reach the Wallaroo worker (source) or where to listen for it (sink).
    #[serde(default)]
    pub worker: WorkerEndpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkSpec>,
    /// Port of the sidecar's admin server (`/metrics`, `/livez`, `/readyz`).
    #[serde(default = "default_metrics_port")]
    pub metrics_port: u16,
    /// Address and limits of the admin server (it listens on the pod network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminSettings>,
    /// Container resources for the injected sidecar; chart defaults apply when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceSettings>,
    /// Roll the workloads whose pods run this connector when its spec changes (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_on_change: Option<bool>,
    /// Seconds the sidecar waits on SIGTERM for outstanding acks or an open 2PC round (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_seconds: Option<u32>,
    /// Volumes of the worker pod to mount into the injected sidecar, e.g. the directory a `file` source reads or a
    /// `file` sink writes (the sidecar's own root filesystem is read-only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<SidecarVolumeMount>,
}

/// The admin server (`/metrics`, `/livez`, `/readyz`) is reachable from the pod network, so whoever can reach
/// the pod can open connections to it: these bound what such a peer can hold.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminSettings {
    /// Address to listen on (default `0.0.0.0`; `127.0.0.1` keeps it inside the pod, which also hides it from
    /// Prometheus and the kubelet's HTTP probes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Connections served at once; further ones wait in the kernel's accept queue (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Seconds a client has to send a request's headers before the connection is closed (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_read_timeout_seconds: Option<u32>,
    /// Seconds a connection may stay open at all, keep-alive included (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_timeout_seconds: Option<u32>,
}

pub const DEFAULT_ADMIN_MAX_CONNECTIONS: u32 = 64;
pub const DEFAULT_ADMIN_HEADER_READ_TIMEOUT_SECONDS: u32 = 10;
pub const DEFAULT_ADMIN_CONNECTION_TIMEOUT_SECONDS: u32 = 60;

/// One pod volume mounted into the sidecar; the volume itself belongs to the pod (`spec.volumes`).
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarVolumeMount {
    /// Name of a volume in the pod's `spec.volumes`.
    pub name: String,
    /// Absolute path inside the sidecar.
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Mount only this path within the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

fn default_metrics_port() -> u16 {
    DEFAULT_METRICS_PORT
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerEndpoint {
    /// Source: the worker's host to connect to. Sink: the address to listen on.
    #[serde(default = "default_host")]
    pub host: String,
    /// Source: worker port to connect to. Sink: port to listen on.
    #[serde(default)]
    pub port: u16,
    /// Shared secret between worker and connector. Prefer `cookieFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_from: Option<SecretValue>,
    /// The worker's `max_credits` (informational for the sidecar; used by `sim-worker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_credits: Option<u32>,
    /// The worker's `refill_credits` (informational for the sidecar; used by `sim-worker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill_credits: Option<u32>,
    /// HELLO program name (source direction; informational for the worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_name: Option<String>,
    /// HELLO instance name (source direction); defaults to the pod name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_name: Option<String>,
    /// Largest frame accepted from the worker, in bytes (default 16 MiB). A sink reports a larger record as an
    /// error and votes its round abort instead of buffering it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u32>,
    /// Sink: seconds a new connection has to send a valid HELLO before it is closed (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_timeout_seconds: Option<u32>,
    /// Sink: seconds without any frame after which a worker connection is closed (default: never; dead peers are
    /// found by TCP keepalive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u32>,
    /// Sink: connections served at once, handshakes included (default 64); more are closed on accept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// Defaults of the worker-port limits.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECONDS: u32 = 10;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;
/// The smallest frame limit that still carries any HELLO the wire allows (4 u16-length strings and a tag).
pub const MIN_MAX_FRAME_BYTES: u32 = 1 + 4 * (2 + u16::MAX as u32);

fn default_host() -> String {
    "127.0.0.1".to_string()
}

impl Default for WorkerEndpoint {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: 0,
            cookie: None,
            cookie_from: None,
            max_credits: None,
            refill_credits: None,
            program_name: None,
            instance_name: None,
            max_frame_bytes: None,
            handshake_timeout_seconds: None,
            idle_timeout_seconds: None,
            max_connections: None,
        }
    }
}

impl WorkerEndpoint {
    /// The cookie, from the secret when one is referenced, else inline, else the Wallaroo default.
    pub fn resolve_cookie(&self) -> Result<String, crate::SecretError> {
        Ok(crate::secret::inline_or_secret(&self.cookie, &self.cookie_from, "spec.worker.cookie")?
            .unwrap_or_else(|| DEFAULT_COOKIE.to_string()))
    }
}

/// Requests and limits for the injected container, as Kubernetes quantities (e.g. `50m`, `32Mi`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceSettings {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Source,
    Sink,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Source => "source",
            Direction::Sink => "sink",
        })
    }
}

impl ConnectorSpec {
    pub fn direction(&self) -> Option<Direction> {
        match (&self.source, &self.sink) {
            (Some(_), None) => Some(Direction::Source),
            (None, Some(_)) => Some(Direction::Sink),
            _ => None,
        }
    }

    /// The integration kind (`udp`, `kafka`, ...), when exactly one is set.
    pub fn kind_name(&self) -> Option<&'static str> {
        match (&self.source, &self.sink) {
            (Some(s), None) => s.kind_names().first().copied(),
            (None, Some(s)) => s.kind_names().first().copied(),
            _ => None,
        }
    }

    /// Every Secret key the spec references, for the operator to map into env vars.
    pub fn secret_refs(&self) -> Vec<crate::SecretKeySelector> {
        let mut out = Vec::new();
        let mut push = |s: &Option<SecretValue>| {
            if let Some(r) = s.as_ref().and_then(|s| s.secret_key_ref.clone()) {
                out.push(r);
            }
        };
        push(&self.worker.cookie_from);
        if let Some(src) = &self.source {
            for s in src.secrets() {
                push(s);
            }
        }
        if let Some(sink) = &self.sink {
            for s in sink.secrets() {
                push(s);
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Local paths the connector reads or writes (the `file` source and sink), with the field that names each: in
    /// a pod they must lie under one of `volumeMounts`, or the sidecar sees only its own read-only image.
    pub fn local_paths(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        if let Some(f) = self.source.as_ref().and_then(|s| s.file.as_ref()) {
            out.push(("spec.source.file.path", f.path.as_str()));
        }
        if let Some(f) = self.sink.as_ref().and_then(|s| s.file.as_ref()) {
            out.push(("spec.sink.file.dir", f.dir.as_str()));
        }
        out
    }

    /// The mount of `volumeMounts` that holds `path`, if any (a path-component prefix, not a string prefix).
    pub fn mount_for(&self, path: &str) -> Option<&SidecarVolumeMount> {
        self.volume_mounts.iter().find(|m| {
            let root = m.mount_path.trim_end_matches('/');
            path == root || root.is_empty() || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// A stable hash of the spec, used for rollouts and the injection annotation.
    pub fn spec_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        // serde_json orders struct fields by declaration and maps are BTreeMaps, so this is canonical.
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(&Sha256::digest(&json)[..8])
    }
}
