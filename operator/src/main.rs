//! `wallaroo-connector-operator`: `run` (webhook + controller), `inject` (offline), `crd` (print the CRD).
mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "wallaroo-connector-operator", version, about = "Kubernetes operator for Wallaroo Connectors")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the admission webhook, the controller and the admin server (in the cluster).
    Run(Box<cmd::run::RunArgs>),
    /// Inject sidecars into the pod templates of workload manifests, as the webhook would, and print them.
    Inject(Box<cmd::inject::InjectArgs>),
    /// Print the Connector CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(cmd::run::run(*args))
        }
        Command::Inject(args) => cmd::inject::run(*args),
        Command::Crd => {
            print!("{}", wallaroo_crds::crd_yaml()?);
            Ok(())
        }
    }
}
