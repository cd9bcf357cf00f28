//! `inject -f workload.yaml --connectors connectors.yaml`: the webhook's mutation, offline.
use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use wallaroo_operator::inject::offline;

use super::sidecar::SidecarArgs;

#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// Workload manifests (Deployments, StatefulSets, DaemonSets, Jobs, CronJobs, Pods; multi-document YAML).
    /// `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub filename: PathBuf,
    /// Files with the Connectors to inject (documents of other kinds are skipped).
    #[arg(long = "connectors", required = true, num_args = 1..)]
    pub connectors: Vec<PathBuf>,
    /// Namespace of workloads that do not set one.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Kubernetes version the output is for, used by `--sidecar-mode auto`.
    #[arg(long, default_value = "1.29")]
    pub kube_version: String,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let text = if args.filename.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading standard input")?;
        s
    } else {
        std::fs::read_to_string(&args.filename).with_context(|| format!("reading {}", args.filename.display()))?
    };
    let mut connectors = Vec::new();
    for path in &args.connectors {
        connectors.extend(wallaroo_crds::load_connectors(path)?);
    }
    let (major, minor) = args.kube_version.split_once('.').unwrap_or((&args.kube_version, "0"));
    let cfg = args.sidecar.config(args.sidecar.sidecar_mode.native_for(major, minor));
    let (docs, reports) = offline::inject_documents(&text, &connectors, &args.namespace, &cfg)?;
    for r in &reports {
        if let Some(o) = &r.outcome {
            let names: Vec<&str> = o.injected.keys().map(String::as_str).collect();
            if names.is_empty() {
                eprintln!("{} {}: no Connector selects its pods", r.kind, r.name);
            } else {
                eprintln!(
                    "{} {}: {} ({})",
                    r.kind,
                    r.name,
                    names.join(", "),
                    if o.changed { "injected" } else { "unchanged" }
                );
            }
            for w in o.warnings() {
                eprintln!("warning: {} {}: {w}", r.kind, r.name);
            }
        }
    }
    print!("{}", offline::to_yaml(&docs)?);
    Ok(())
}
