//! `wallaroo-connector sim-worker`: a stand-in Wallaroo worker for people trying connectors without a cluster.
//! With both `--source-listen` and `--sink-connect` it is a tiny pipeline: source connector -> application
//! function -> sink connector, with one checkpoint driving both sides (sink Phase 1, then the source ACKs and
//! the sink Phase 2; an abort vote rolls both back).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::apps::{self, AppFn};
use super::{Processed, SinkSim, SinkSimConfig, SourceSim, SourceSimConfig};

#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Accept source connectors here (the worker's source_connector host:port).
    #[arg(long)]
    pub source_listen: Option<String>,
    /// Connect to a sink connector here (the worker's sink_connector host:port).
    #[arg(long)]
    pub sink_connect: Option<SocketAddr>,
    /// Application function between source and sink: identity or celsius.
    #[arg(long, default_value = "identity")]
    pub app: String,
    #[arg(long, default_value = wallaroo_crds::DEFAULT_COOKIE)]
    pub cookie: String,
    #[arg(long, default_value_t = 500)]
    pub max_credits: u32,
    #[arg(long, default_value_t = 50)]
    pub refill_credits: u32,
    /// Milliseconds between checkpoints.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_ms: u64,
    /// Worker name announced to sinks.
    #[arg(long, default_value = "initializer")]
    pub worker_name: String,
    /// Print each application output (as text) to stdout.
    #[arg(long)]
    pub print: bool,
    /// Append each application output to this file.
    #[arg(long)]
    pub save: Option<std::path::PathBuf>,
    /// Exit after this many processed messages (and a final checkpoint).
    #[arg(long)]
    pub exit_after: Option<u64>,
    /// Fault: roll back and send RESTART to source connectors after every N processed messages.
    #[arg(long)]
    pub restart_every: Option<u64>,
    /// Fault: drop source connections after every N processed messages.
    #[arg(long)]
    pub drop_every: Option<u64>,
}

pub async fn run(args: SimArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let app: AppFn =
        apps::by_name(&args.app).with_context(|| format!("--app {}: use identity or celsius", args.app))?;
    let period = Duration::from_millis(args.checkpoint_ms.max(1));
    let (tx, mut rx) = mpsc::channel::<Processed>(8192);
    let source = match &args.source_listen {
        Some(listen) => {
            let cfg = SourceSimConfig {
                listen: listen.clone(),
                cookie: args.cookie.clone(),
                max_credits: args.max_credits,
                refill_credits: args.refill_credits,
                // With a sink, checkpoints are driven below so both sides agree.
                checkpoint_every: if args.sink_connect.is_some() { None } else { Some(period) },
                keep_payloads: false,
                ..Default::default()
            };
            let sim =
                SourceSim::start_with_output(cfg, Some(tx)).await.with_context(|| format!("listen on {listen}"))?;
            tracing::info!(addr = %sim.addr(), "sim worker: accepting source connectors");
            Some(sim)
        }
        None => {
            drop(tx);
            None
        }
    };
    let mut sink = match args.sink_connect {
        Some(addr) => Some(connect_sink(addr, &args, &shutdown).await?),
        None => None,
    };
    let mut save = match &args.save {
        Some(p) => Some(tokio::fs::OpenOptions::new().create(true).append(true).open(p).await?),
        None => None,
    };
    let mut stdout = tokio::io::stdout();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut processed: u64 = 0;
    // Per stream, the last message handed downstream: what the next barrier covers.
    let mut emitted: HashMap<u64, u64> = HashMap::new();
    loop {
        tokio::select! {
            p = rx.recv(), if source.is_some() => {
                let Some(p) = p else { break };
                // Undone by a rollback since it was processed: the replay brings it again.
                if source.as_ref().is_some_and(|src| p.epoch < src.epoch()) {
                    continue;
                }
                processed += 1;
                emitted.insert(p.stream_id, p.message_id);
                if let Some(out) = app(&p.payload)
                    && let Err(e) = emit(&out, &args, &mut stdout, &mut save, &mut sink).await
                {
                    sink_failed(&source, &mut sink, &e);
                    emitted.clear();
                }
                if let Some(src) = &source {
                    if args.restart_every.is_some_and(|n| n > 0 && processed.is_multiple_of(n)) {
                        tracing::info!(processed, "fault: rollback + RESTART");
                        src.restart_connections();
                    }
                    if args.drop_every.is_some_and(|n| n > 0 && processed.is_multiple_of(n)) {
                        tracing::info!(processed, "fault: dropping source connections");
                        src.drop_connections();
                    }
                }
                if args.exit_after.is_some_and(|n| processed >= n) {
                    checkpoint(&source, &mut sink, &mut rx, &args, &mut stdout, &mut save, &mut emitted).await?;
                    break;
                }
            }
            _ = tick.tick(), if sink.is_some() => {
                if let Err(e) = checkpoint(&source, &mut sink, &mut rx, &args, &mut stdout, &mut save, &mut emitted).await {
                    sink_failed(&source, &mut sink, &e);
                    emitted.clear();
                }
            }
            _ = shutdown.cancelled() => break,
        }
    }
    stdout.flush().await?;
    if let Some(src) = &source {
        let stats = src.stats();
        tracing::info!(processed, ?stats, "sim worker done");
    }
    Ok(())
}

/// The sink went away (or refused a write): like the worker, abort what is in flight and roll back, so the source
/// replays from the last checkpoint and the sink output restarts at its last commit. The next tick reconnects.
fn sink_failed(source: &Option<SourceSim>, sink: &mut Option<SinkSim>, e: &anyhow::Error) {
    tracing::warn!(error = %e, "sink connection failed: rolling back");
    if let Some(s) = sink.as_mut() {
        s.rollback_round();
    }
    if let Some(src) = source {
        src.restart_connections();
    }
}

async fn connect_sink(addr: SocketAddr, args: &SimArgs, shutdown: &CancellationToken) -> anyhow::Result<SinkSim> {
    let mut cfg = SinkSimConfig::new(addr, &args.worker_name);
    cfg.cookie = args.cookie.clone();
    loop {
        match SinkSim::connect(cfg.clone()).await {
            Ok(s) => {
                tracing::info!(%addr, "sim worker: connected to the sink connector");
                return Ok(s);
            }
            Err(e) => {
                // The worker reconnects forever, once a second.
                tracing::info!(%addr, error = %e, "sink connector not reachable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => anyhow::bail!("stopped before the sink connector came up"),
                }
            }
        }
    }
}

async fn emit(
    out: &Bytes,
    args: &SimArgs,
    stdout: &mut tokio::io::Stdout,
    save: &mut Option<tokio::fs::File>,
    sink: &mut Option<SinkSim>,
) -> anyhow::Result<()> {
    if args.print {
        stdout.write_all(out).await?;
        if !out.ends_with(b"\n") {
            stdout.write_all(b"\n").await?;
        }
    }
    if let Some(f) = save {
        f.write_all(out).await?;
    }
    if let Some(s) = sink {
        if !s.is_connected() {
            s.reconnect().await?;
        }
        s.send(out).await?;
    }
    Ok(())
}

/// One checkpoint across both sides: everything processed so far goes to the sink first (the barrier).
async fn checkpoint(
    source: &Option<SourceSim>,
    sink: &mut Option<SinkSim>,
    rx: &mut mpsc::Receiver<Processed>,
    args: &SimArgs,
    stdout: &mut tokio::io::Stdout,
    save: &mut Option<tokio::fs::File>,
    emitted: &mut HashMap<u64, u64>,
) -> anyhow::Result<()> {
    let app = apps::by_name(&args.app).unwrap_or(apps::identity);
    let epoch = source.as_ref().map_or(0, |s| s.epoch());
    while let Ok(p) = rx.try_recv() {
        if p.epoch < epoch {
            continue;
        }
        emitted.insert(p.stream_id, p.message_id);
        if let Some(out) = app(&p.payload) {
            emit(&out, args, stdout, save, sink).await?;
        }
    }
    let Some(s) = sink.as_mut() else {
        if let Some(src) = source {
            src.checkpoint_now();
        }
        return Ok(());
    };
    if !s.is_connected() {
        s.reconnect().await?;
    }
    match s.phase1().await {
        Ok(true) => {
            // The barrier covers exactly what reached the sink in this round, not what the source listener
            // processed meanwhile (that goes into the next round).
            if let Some(src) = source {
                src.checkpoint_through(emitted);
            }
            s.phase2_commit().await?;
        }
        Ok(false) | Err(_) => {
            tracing::warn!("sink round aborted: rolling back");
            emitted.clear();
            s.rollback_round();
            if let Some(src) = source {
                src.restart_connections();
            }
            let _ = s.reconnect().await;
        }
    }
    Ok(())
}
