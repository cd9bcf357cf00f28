//! `run`: everything the operator does in the cluster, wired together with one shutdown token.
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use wallaroo_operator::admin::{self, Health};
use wallaroo_operator::connector_cache::ConnectorCache;
use wallaroo_operator::controller::leader::{Elector, LeaseConfig};
use wallaroo_operator::controller::pods::PodIndex;
use wallaroo_operator::controller::{self, Context};
use wallaroo_operator::inject::SidecarMode;
use wallaroo_operator::metrics::Metrics;
use wallaroo_operator::webhook::certs::{self, ReloadableCert};
use wallaroo_operator::webhook::tls::{self, FileSource, SelfManaged};
use wallaroo_operator::webhook::{InjectionEvent, Webhook, server};

use super::sidecar::SidecarArgs;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertMode {
    /// The operator creates a CA and serving certificate, keeps them in a Secret and patches the caBundle.
    SelfSigned,
    /// Certificate files mounted from a Secret maintained by cert-manager (or anything else).
    Files,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[arg(long, env = "WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: SocketAddr,
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Namespaces to watch (comma-separated); all when empty.
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    #[arg(long, env = "CERT_MODE", value_enum, default_value = "self-signed")]
    pub cert_mode: CertMode,
    /// Directory with tls.crt and tls.key (cert mode `files`).
    #[arg(long, env = "CERT_DIR", default_value = "/tls")]
    pub cert_dir: PathBuf,
    #[arg(long, env = "TLS_SECRET", default_value = "wallaroo-connectors-webhook-tls")]
    pub tls_secret: String,
    #[arg(long, env = "WEBHOOK_CONFIG", default_value = "wallaroo-connectors")]
    pub webhook_config: String,
    #[arg(long, env = "WEBHOOK_SERVICE", default_value = "wallaroo-connectors-webhook")]
    pub webhook_service: String,
    /// Seconds between certificate checks (renewal happens 30 days before expiry).
    #[arg(long, env = "CERT_CHECK_SECONDS", default_value_t = 3600)]
    pub cert_check_seconds: u64,
    /// The operator's own namespace (Secret and Lease live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "wallaroo-system")]
    pub namespace: String,
    /// Identity in the Lease; the pod name in the cluster.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    #[arg(long, env = "LEASE_NAME", default_value = "wallaroo-connector-operator")]
    pub lease_name: String,
    /// Check that Secrets referenced by Connectors exist (needs `get` on Secrets in the watched namespaces).
    #[arg(long, env = "VALIDATE_SECRETS", default_value_t = true, action = clap::ArgAction::Set)]
    pub validate_secrets: bool,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn,hyper=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves `auto` against the API server, retrying briefly: guessing wrong would give every pod the wrong shape.
async fn native_sidecars(client: &Client, mode: SidecarMode) -> anyhow::Result<bool> {
    if mode != SidecarMode::Auto {
        return Ok(mode == SidecarMode::Always);
    }
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=6 {
        match client.apiserver_version().await {
            Ok(v) => {
                let native = mode.native_for(&v.major, &v.minor);
                tracing::info!(version = v.git_version, native, "sidecar mode resolved");
                return Ok(native);
            }
            Err(e) if attempt < 6 => {
                tracing::warn!(error = %e, "cannot read the server version yet");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                return Err(e).context("reading the API server version for --sidecar-mode auto");
            }
        }
    }
    Ok(false)
}

async fn publish_injections(recorder: Recorder, mut rx: mpsc::Receiver<InjectionEvent>) {
    while let Some(ev) = rx.recv().await {
        let (type_, reason, note) = match &ev.warning {
            Some(w) => (EventType::Warning, "InjectionSkipped", format!("not injected into pod {}: {w}", ev.pod)),
            None => (EventType::Normal, "Injected", format!("sidecar injected into pod {}", ev.pod)),
        };
        let event = Event { type_, reason: reason.into(), note: Some(note), action: "Inject".into(), secondary: None };
        if let Err(e) = recorder.publish(&event, &ev.connector).await {
            tracing::debug!(error = %e, "cannot publish injection event");
        }
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGTERM handler; only Ctrl-C stops the operator");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        shutdown.cancel();
    });
}

/// Runs the controller whenever this replica leads, stopping it as soon as leadership is lost.
async fn controller_loop(ctx_parts: ControllerParts, mut leading: watch::Receiver<bool>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = leading.wait_for(|l| *l) => if r.is_err() { return },
        }
        // Start from a complete cache, so the first reconciles see every Connector.
        let mut synced = ctx_parts.synced.clone();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = synced.wait_for(|s| *s) => if r.is_err() { return },
        }
        tracing::info!("leading: starting the controller");
        let ctx = Arc::new(Context {
            client: ctx_parts.client.clone(),
            pods: PodIndex::default(),
            recorder: ctx_parts.recorder.clone(),
            metrics: ctx_parts.metrics.clone(),
            namespaces: ctx_parts.namespaces.clone(),
            validate_secrets: ctx_parts.validate_secrets,
        });
        let stop = CancellationToken::new();
        let stop_on = stop.clone();
        let mut lost = leading.clone();
        let watch_stop = {
            let stop = stop.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {},
                    _ = lost.wait_for(|l| !*l) => tracing::warn!("leadership lost: stopping the controller"),
                }
                stop.cancel();
            })
        };
        controller::run(ctx, &ctx_parts.connectors, async move { stop_on.cancelled().await }).await;
        watch_stop.abort();
        if shutdown.is_cancelled() {
            return;
        }
    }
}

struct ControllerParts {
    client: Client,
    connectors: ConnectorCache,
    synced: watch::Receiver<bool>,
    recorder: Recorder,
    metrics: Metrics,
    namespaces: Option<BTreeSet<String>>,
    validate_secrets: bool,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    // rustls needs one process-wide provider for the kube client; the webhook passes its own explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default().await.context("building the Kubernetes client")?;
    let metrics = Metrics::new().context("registering metrics")?;
    let health = Arc::new(Health::default());
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let identity =
        args.identity.clone().unwrap_or_else(|| format!("wallaroo-connector-operator-{}", std::process::id()));
    let namespaces: Option<BTreeSet<String>> = {
        let set: BTreeSet<String> =
            args.watch_namespaces.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        (!set.is_empty()).then_some(set)
    };
    let native = native_sidecars(&client, args.sidecar.sidecar_mode).await?;
    let inject_cfg = Arc::new(args.sidecar.config(native));

    // One Connector cache on every replica, leader or not: the webhook reads it, the leader's controller follows it.
    let (connectors, watch) = ConnectorCache::watch(&client, &namespaces);
    let reflector_task = tokio::spawn(watch);
    let connector_store = connectors.store();
    // One waiter only: kube's Store::wait_until_ready wakes just the most recent of concurrent waiters, so
    // everyone else learns of the sync from this channel.
    let (synced_tx, synced_rx) = watch::channel(false);
    {
        let store = connector_store.clone();
        let health = health.clone();
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                health.connectors_synced.store(true, Ordering::Relaxed);
                tracing::info!("Connector cache synced");
                let _ = synced_tx.send(true);
            }
        });
    }
    // The cache holds the watched namespaces only, so pods elsewhere find no Connector.
    let lookup: Arc<dyn wallaroo_operator::webhook::ConnectorLookup> = Arc::new(connector_store);

    let reporter = Reporter { controller: "wallaroo-connector-operator".into(), instance: Some(identity.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let (event_tx, event_rx) = mpsc::channel(256);
    tokio::spawn(publish_injections(recorder.clone(), event_rx));

    let cert_store = Arc::new(ReloadableCert::default());
    let cert_task = match args.cert_mode {
        CertMode::SelfSigned => tokio::spawn(tls::run_self_managed(
            client.clone(),
            SelfManaged {
                namespace: args.namespace.clone(),
                secret_name: args.tls_secret.clone(),
                webhook_config: args.webhook_config.clone(),
                dns_names: SelfManaged::dns_names_for(&args.webhook_service, &args.namespace),
                ca_days: 3650,
                leaf_days: 365,
                renew_before: jiff::SignedDuration::from_hours(24 * 30),
                check_every: Duration::from_secs(args.cert_check_seconds.max(1)),
            },
            cert_store.clone(),
            shutdown.clone(),
        )),
        CertMode::Files => tokio::spawn(tls::run_files(
            FileSource {
                cert: args.cert_dir.join("tls.crt"),
                key: args.cert_dir.join("tls.key"),
                poll_every: Duration::from_secs(30),
            },
            cert_store.clone(),
            shutdown.clone(),
        )),
    };
    {
        let certs = cert_store.clone();
        let health = health.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            while !certs.is_loaded() && !shutdown.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            health.certificate_loaded.store(certs.is_loaded(), Ordering::Relaxed);
        });
    }

    let webhook = Arc::new(Webhook::new(lookup, inject_cfg, metrics.clone(), Some(event_tx)));
    let listener =
        TcpListener::bind(args.webhook_addr).await.with_context(|| format!("binding {}", args.webhook_addr))?;
    let webhook_task =
        tokio::spawn(server::serve(listener, certs::server_config(cert_store)?, webhook, shutdown.clone()));
    let admin_listener =
        TcpListener::bind(args.admin_addr).await.with_context(|| format!("binding {}", args.admin_addr))?;
    let admin_task = tokio::spawn(admin::serve(admin_listener, metrics.clone(), health.clone(), shutdown.clone()));
    tracing::info!(webhook = %args.webhook_addr, admin = %args.admin_addr, identity, native, "operator started");

    let (lead_tx, lead_rx) = watch::channel(false);
    let election = if args.leader_election {
        let elector = Elector::new(
            client.clone(),
            LeaseConfig {
                namespace: args.namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                lease_duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                retry_period: Duration::from_secs(2),
            },
        );
        Some(tokio::spawn(elector.run(lead_tx, shutdown.clone())))
    } else {
        let _ = lead_tx.send(true);
        // Keep the sender alive so the controller loop does not see a closed channel.
        Some(tokio::spawn(async move {
            lead_tx.closed().await;
        }))
    };
    let parts = ControllerParts {
        client: client.clone(),
        connectors,
        synced: synced_rx,
        recorder,
        metrics,
        namespaces,
        validate_secrets: args.validate_secrets,
    };
    let controller_task = tokio::spawn(controller_loop(parts, lead_rx, shutdown.clone()));

    shutdown.cancelled().await;
    health.shutting_down.store(true, Ordering::Relaxed);
    let grace = Duration::from_secs(15);
    let _ = tokio::time::timeout(grace, async {
        let _ = controller_task.await;
        if let Some(e) = election {
            if args.leader_election {
                let _ = e.await;
            } else {
                e.abort();
            }
        }
        let _ = webhook_task.await;
        let _ = admin_task.await;
        let _ = cert_task.await;
    })
    .await;
    reflector_task.abort();
    tracing::info!("operator stopped");
    Ok(())
}
