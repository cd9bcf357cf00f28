//! `wallaroo-connector`: run, validate, or simulate a worker.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use wallaroo_connector::runtime::run::{RunOverrides, run};
use wallaroo_connector::sim;

#[derive(Parser)]
#[command(name = "wallaroo-connector", version, about = "Runs Wallaroo connectors (connector protocol v3)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the connector described by a Connector manifest.
    Run {
        /// Manifest file (YAML or JSON). Without it, the Connector is read as JSON from $WALLAROO_CONNECTOR.
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
        /// Which Connector of a multi-document file to run (by metadata.name); required if there are several.
        #[arg(long)]
        name: Option<String>,
        /// Admin server address (default <spec.admin.host, else 0.0.0.0>:<metricsPort>).
        #[arg(long, env = "WALLAROO_ADMIN_ADDR")]
        admin_addr: Option<std::net::SocketAddr>,
    },
    /// Check a manifest and report every problem, naming the field.
    Validate {
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// Play the Wallaroo worker's side of the protocol (for trying connectors without a cluster).
    SimWorker(sim::cli::SimArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancels the token on SIGTERM or Ctrl-C.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install SIGTERM handler");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested: stopping intake and draining");
        t.cancel();
    });
    token
}

/// The drain is cooperative; anything stuck past it (an external call that never returns, a peer that never
/// reads) must not keep the pod past its grace period. What was acknowledged is committed by then; the rest is
/// replayed or resolved on reconnect, so leaving is safe.
fn hard_stop_after_drain(shutdown: CancellationToken, limit: std::time::Duration) {
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tokio::time::sleep(limit).await;
        tracing::error!(seconds = limit.as_secs(), "still running this long after shutdown was requested; exiting");
        std::process::exit(1);
    });
}

fn load(file: Option<PathBuf>, name: Option<String>) -> anyhow::Result<wallaroo_crds::Connector> {
    let connectors = match file {
        Some(path) => wallaroo_crds::load_connectors(&path)?,
        None => {
            let json = std::env::var("WALLAROO_CONNECTOR")
                .context("no -f given and $WALLAROO_CONNECTOR is not set: pass a manifest with -f connector.yaml")?;
            wallaroo_crds::parse_connectors(&json, "$WALLAROO_CONNECTOR")?
        }
    };
    let count = connectors.len();
    match name {
        Some(n) => connectors
            .into_iter()
            .find(|c| c.metadata.name.as_deref() == Some(n.as_str()))
            .with_context(|| format!("no Connector named {n:?} in the manifest")),
        None if count == 1 => connectors.into_iter().next().context("empty manifest"),
        None => anyhow::bail!("the manifest holds {count} Connectors: pick one with --name"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run { file, name, admin_addr } => {
            let connector = load(file, name)?;
            let shutdown = shutdown_on_signals();
            let drain = u64::from(connector.spec.drain_timeout_seconds.unwrap_or(20));
            hard_stop_after_drain(shutdown.clone(), std::time::Duration::from_secs(drain + 5));
            run(connector, RunOverrides { admin_addr, ..Default::default() }, shutdown).await?;
        }
        Cmd::Validate { file } => {
            let connectors = wallaroo_crds::load_connectors(&file)?;
            for c in connectors {
                println!(
                    "ok: {} ({} {})",
                    c.metadata.name.as_deref().unwrap_or("<unnamed>"),
                    c.spec.direction().map(|d| d.to_string()).unwrap_or_default(),
                    c.spec.kind_name().unwrap_or("")
                );
            }
        }
        Cmd::SimWorker(args) => {
            let shutdown = shutdown_on_signals();
            sim::cli::run(args, shutdown).await?;
        }
    }
    Ok(())
}
