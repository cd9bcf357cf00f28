//! Keeping the webhook's certificate valid without manual steps.
//!
//! Self-managed mode: a Secret holds the CA and the serving certificate. Every replica runs the same loop: load the
//! Secret, renew what is missing or close to expiry (optimistic concurrency on the Secret's resourceVersion, so
//! replicas never fight), install the certificate in the TLS resolver, and make sure the webhook configuration
//! trusts the CA. File mode (cert-manager): reload the mounted files when they change; cert-manager's CA injector
//! owns the caBundle.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::certs::{self, CaPem, CertError, LeafPem, ReloadableCert};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const PREVIOUS_CA_CERT: &str = "ca-previous.crt";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const CA_NOT_AFTER: &str = "wallaroo.dev/ca-not-after";
const TLS_NOT_AFTER: &str = "wallaroo.dev/tls-not-after";
const DNS_NAMES: &str = "wallaroo.dev/tls-dns-names";

#[derive(Debug, Clone)]
pub struct SelfManaged {
    pub namespace: String,
    pub secret_name: String,
    pub webhook_config: String,
    pub dns_names: Vec<String>,
    pub ca_days: i64,
    pub leaf_days: i64,
    /// Renew the serving certificate when less than this remains (and the CA when less than 10x this remains).
    pub renew_before: jiff::SignedDuration,
    pub check_every: Duration,
}

impl SelfManaged {
    /// DNS names the API server may use for the Service `service` in `namespace`.
    pub fn dns_names_for(service: &str, namespace: &str) -> Vec<String> {
        vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.to_string(),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// What the Secret should hold after a renewal decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    pub ca: CaPem,
    pub previous_ca: Option<String>,
    pub leaf: LeafPem,
}

impl Material {
    /// The caBundle: the current CA plus, during a CA rotation, the previous one so that replicas still serving a
    /// certificate from the old CA keep working until they reload.
    pub fn ca_bundle(&self) -> String {
        match &self.previous_ca {
            Some(prev) => format!("{}{}", self.ca.cert, prev),
            None => self.ca.cert.clone(),
        }
    }
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok()).filter(|s| !s.is_empty())
}

fn stamp(annotations: &BTreeMap<String, String>, key: &str) -> Option<jiff::Timestamp> {
    annotations.get(key).and_then(|v| v.parse().ok())
}

/// Reads what a Secret holds; `None` fields are missing or unreadable.
fn read_material(secret: &Secret) -> (Option<CaPem>, Option<String>, Option<LeafPem>, Option<String>) {
    let (no_data, no_ann) = (BTreeMap::new(), BTreeMap::new());
    let data = secret.data.as_ref().unwrap_or(&no_data);
    let ann = secret.metadata.annotations.as_ref().unwrap_or(&no_ann);
    let ca = match (text(data, CA_CERT), text(data, CA_KEY), stamp(ann, CA_NOT_AFTER)) {
        (Some(cert), Some(key), Some(not_after)) if rcgen::KeyPair::from_pem(&key).is_ok() => {
            Some(CaPem { cert, key, not_after })
        }
        _ => None,
    };
    let leaf = match (text(data, TLS_CERT), text(data, TLS_KEY), stamp(ann, TLS_NOT_AFTER)) {
        (Some(cert), Some(key), Some(not_after)) if certs::certified_key(cert.as_bytes(), key.as_bytes()).is_ok() => {
            Some(LeafPem { cert, key, not_after })
        }
        _ => None,
    };
    (ca, text(data, PREVIOUS_CA_CERT), leaf, ann.get(DNS_NAMES).cloned())
}

/// Decides what the Secret must hold at `now`: keeps what is valid, renews what expires within the window, and
/// re-issues the serving certificate whenever the CA or the DNS names change. Returns `None` when nothing changes.
pub fn plan(existing: Option<&Secret>, cfg: &SelfManaged, now: jiff::Timestamp) -> Result<Option<Material>, CertError> {
    let (ca, previous_ca, leaf, names) = existing.map(read_material).unwrap_or((None, None, None, None));
    let want_names = cfg.dns_names.join(",");
    let ca_window = cfg.renew_before * 10;
    let (ca, previous_ca, ca_changed) = match ca {
        Some(ca) if ca.not_after > now + ca_window => (ca, previous_ca, false),
        Some(old) => (certs::generate_ca(cfg.ca_days)?, Some(old.cert), true),
        None => (certs::generate_ca(cfg.ca_days)?, None, true),
    };
    let leaf_ok = leaf.as_ref().is_some_and(|l| l.not_after > now + cfg.renew_before)
        && names.as_deref() == Some(want_names.as_str())
        && !ca_changed;
    if leaf_ok {
        // The previous CA stays in the bundle until the next CA rotation replaces it: trusting our own expired or
        // retired CA for a while is harmless, dropping it early could break a replica that has not reloaded yet.
        return Ok(None);
    }
    let leaf = certs::issue(&ca.key, &cfg.dns_names, cfg.leaf_days)?;
    Ok(Some(Material { ca, previous_ca, leaf }))
}

fn secret_for(material: &Material, cfg: &SelfManaged, base: Option<&Secret>) -> Secret {
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    };
    put(CA_CERT, &material.ca.cert);
    put(CA_KEY, &material.ca.key);
    put(TLS_CERT, &material.leaf.cert);
    put(TLS_KEY, &material.leaf.key);
    if let Some(prev) = &material.previous_ca {
        put(PREVIOUS_CA_CERT, prev);
    }
    let mut meta = base.map(|s| s.metadata.clone()).unwrap_or_else(|| ObjectMeta {
        name: Some(cfg.secret_name.clone()),
        namespace: Some(cfg.namespace.clone()),
        ..ObjectMeta::default()
    });
    meta.managed_fields = None;
    let ann = meta.annotations.get_or_insert_default();
    ann.insert(CA_NOT_AFTER.into(), material.ca.not_after.to_string());
    ann.insert(TLS_NOT_AFTER.into(), material.leaf.not_after.to_string());
    ann.insert(DNS_NAMES.into(), cfg.dns_names.join(","));
    meta.labels
        .get_or_insert_default()
        .insert("app.kubernetes.io/managed-by".into(), "wallaroo-connector-operator".into());
    Secret { metadata: meta, data: Some(data), type_: Some("kubernetes.io/tls".into()), ..Secret::default() }
}

/// One pass of the self-managed loop. Returns the material now in force.
pub async fn ensure(client: &Client, cfg: &SelfManaged, certs: &ReloadableCert) -> Result<Material, TlsError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let existing = secrets.get_opt(&cfg.secret_name).await?;
    let material = match plan(existing.as_ref(), cfg, jiff::Timestamp::now())? {
        Some(m) => {
            let secret = secret_for(&m, cfg, existing.as_ref());
            // Create or replace with the resourceVersion we read: if another replica got there first, this fails
            // with AlreadyExists/Conflict and the next pass adopts its certificate instead.
            match existing {
                Some(_) => secrets.replace(&cfg.secret_name, &PostParams::default(), &secret).await?,
                None => secrets.create(&PostParams::default(), &secret).await?,
            };
            tracing::info!(secret = cfg.secret_name, not_after = %m.leaf.not_after, "webhook certificate issued");
            m
        }
        None => {
            let s = existing.as_ref();
            let (ca, previous_ca, leaf, _) = s.map(read_material).unwrap_or((None, None, None, None));
            match (ca, leaf) {
                (Some(ca), Some(leaf)) => Material { ca, previous_ca, leaf },
                _ => return Err(TlsError::Cert(CertError::NoCertificate)),
            }
        }
    };
    let key = certs::certified_key(material.leaf.cert.as_bytes(), material.leaf.key.as_bytes())?;
    if certs.get().map(|k| k.cert.clone()) != Some(key.cert.clone()) {
        certs.set(key);
        tracing::info!("webhook serving certificate loaded");
    }
    patch_ca_bundle(client, &cfg.webhook_config, material.ca_bundle().as_bytes()).await?;
    Ok(material)
}

/// Sets every webhook's `clientConfig.caBundle` in the configuration, replacing with the read resourceVersion.
async fn patch_ca_bundle(client: &Client, name: &str, bundle: &[u8]) -> Result<(), kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut cfg) = api.get_opt(name).await? else {
        tracing::warn!(name, "MutatingWebhookConfiguration not found; caBundle not set");
        return Ok(());
    };
    let mut changed = false;
    for hook in cfg.webhooks.iter_mut().flatten() {
        if hook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(bundle) {
            hook.client_config.ca_bundle = Some(ByteString(bundle.to_vec()));
            changed = true;
        }
    }
    if changed {
        cfg.metadata.managed_fields = None;
        api.replace(name, &PostParams::default(), &cfg).await?;
        tracing::info!(name, "webhook caBundle updated");
    }
    Ok(())
}

/// Runs [`ensure`] until `shutdown`: quickly while failing (start-up, conflicts), then every `check_every`.
pub async fn run_self_managed(
    client: Client,
    cfg: SelfManaged,
    certs: Arc<ReloadableCert>,
    shutdown: CancellationToken,
) {
    let mut retry = Duration::from_millis(500);
    loop {
        let wait = match ensure(&client, &cfg, &certs).await {
            Ok(_) => {
                retry = Duration::from_millis(500);
                cfg.check_every
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook certificate not ready; retrying");
                retry = (retry * 2).min(Duration::from_secs(30));
                retry
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Certificate files mounted from a Secret that something else (cert-manager) keeps fresh.
#[derive(Debug, Clone)]
pub struct FileSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub poll_every: Duration,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.display().to_string(), source })
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub fn load_files(src: &FileSource, certs: &ReloadableCert) -> Result<(), TlsError> {
    let key = certs::certified_key(&read(&src.cert)?, &read(&src.key)?)?;
    certs.set(key);
    Ok(())
}

/// Polls the files and reloads on change; kubelet updates mounted Secrets by swapping a symlink, which changes
/// the modification time seen through the path.
pub async fn run_files(src: FileSource, certs: Arc<ReloadableCert>, shutdown: CancellationToken) {
    let mut seen = None;
    loop {
        let now = (mtime(&src.cert), mtime(&src.key));
        if Some(now) != seen {
            match load_files(&src, &certs) {
                Ok(()) => {
                    tracing::info!(cert = %src.cert.display(), "webhook certificate loaded from files");
                    seen = Some(now);
                }
                Err(e) => tracing::warn!(error = %e, "cannot load webhook certificate files"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(src.poll_every) => {}
        }
    }
}

#[cfg(test)]
mod tests;
