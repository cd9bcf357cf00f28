use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct SimArgs {}

pub async fn run(_args: SimArgs, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("sim-worker is being written")
}
