//! `source.kinesis`: every shard of a Kinesis stream as one Wallaroo stream named `kinesis:<stream>:<shardId>`.
//!
//! - Discovery: ListShards at start and every few seconds. A shard is announced once all its parents (split:
//!   one, merge: two) finished, i.e. the worker confirmed their end of stream, so per-key order survives
//!   resharding. Shards present at start begin at `startFrom` (earliest = TRIM_HORIZON, latest = LATEST);
//!   shards created later begin at TRIM_HORIZON so nothing written to them is skipped.
//! - Points of reference: see [`por`]. At-least-once: Kinesis has no consumer-side commit, so the worker's
//!   acknowledged point of reference is the only checkpoint; `Durable` only trims the in-memory map.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use tokio::task::JoinHandle;
use wallaroo_crds::{KinesisSource as KinesisSourceConfig, StartFrom};

use crate::aws::{AwsSettings, classify, sdk_config};
use crate::runtime::source_api::{
    Command, Emit, Position, SourceContext, SourceError, SourceIntegration, stream_id_for,
};

pub mod por;
pub mod reader;
pub mod shards;

use reader::{Closed, Reader, SeqMap, StartAt};
use shards::{ShardGraph, ShardInfo};

/// How often ListShards runs to find new shards and closed ones.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);

pub struct KinesisSource {
    cfg: KinesisSourceConfig,
}

impl KinesisSource {
    pub fn new(cfg: KinesisSourceConfig) -> Self {
        Self { cfg }
    }
}

/// The Wallaroo stream name of a shard.
pub fn stream_name(stream: &str, shard: &str) -> String {
    format!("kinesis:{stream}:{shard}")
}

struct ShardRun {
    shard: String,
    seqs: SeqMap,
    task: Option<JoinHandle<Result<(), SourceError>>>,
}

async fn list_shards(client: &Client, stream: &str) -> Result<Vec<ShardInfo>, (bool, String)> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        // ListShards takes either the stream name or a pagination token, not both.
        let req = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let page = req.send().await.map_err(|e| {
            let c = classify(&format!("ListShards {stream}"), &e);
            (c.permanent, c.message)
        })?;
        for s in page.shards.unwrap_or_default() {
            let parents = s.parent_shard_id.into_iter().chain(s.adjacent_parent_shard_id).collect();
            let ending = s.sequence_number_range.and_then(|r| r.ending_sequence_number);
            out.push(ShardInfo { id: s.shard_id, parents, ending });
        }
        match page.next_token {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

struct Source {
    cfg: KinesisSourceConfig,
    client: Client,
    graph: ShardGraph,
    closed: Closed,
    runs: HashMap<u64, ShardRun>,
}

impl Source {
    /// Lists shards, records closures, announces shards that became ready.
    async fn discover(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        match list_shards(&self.client, &self.cfg.stream).await {
            Ok(listed) => {
                ctx.health.set_external(true);
                ctx.metrics.external_connected.set(1);
                {
                    let mut closed = match self.closed.write() {
                        Ok(c) => c,
                        Err(p) => p.into_inner(),
                    };
                    for s in &listed {
                        if let Some(end) = &s.ending {
                            closed.insert(s.id.clone(), end.clone());
                        }
                    }
                }
                self.graph.update(listed);
            }
            Err((true, m)) => {
                return Err(SourceError::External { system: "kinesis", message: m });
            }
            Err((false, m)) => {
                ctx.metrics.error("transient", "list_shards");
                ctx.health.set_external(false);
                ctx.metrics.external_connected.set(0);
                tracing::warn!(stream = %self.cfg.stream, error = %m, "shard discovery failed; retrying");
                return Ok(());
            }
        }
        for shard in self.graph.take_ready() {
            let name = stream_name(&self.cfg.stream, &shard);
            let id = stream_id_for(name.as_bytes());
            tracing::info!(stream = %self.cfg.stream, %shard, "announcing shard");
            self.runs.insert(id, ShardRun { shard, seqs: Arc::new(Mutex::new(Default::default())), task: None });
            ctx.emit.send(Emit::Stream { name }).await.map_err(|_| SourceError::RuntimeGone)?;
        }
        Ok(())
    }

    fn start(&mut self, ctx: &SourceContext, stream: u64, from: Position, generation: u64) {
        let Some(run) = self.runs.get_mut(&stream) else {
            tracing::warn!(stream, "start for a stream this source did not announce");
            return;
        };
        if let Some(t) = run.task.take() {
            t.abort();
        }
        let start = match from {
            Position::Beginning => {
                if self.graph.is_initial(&run.shard) && self.cfg.start_from == StartFrom::Latest {
                    let first = match run.seqs.lock() {
                        Ok(m) => m.first_key_value().map(|(_, s)| s.clone()),
                        Err(e) => e.into_inner().first_key_value().map(|(_, s)| s.clone()),
                    };
                    // A rewind to the beginning after a LATEST start replays from the first record read.
                    match first {
                        Some(seq) => StartAt::AtSequence(seq),
                        None => StartAt::Latest,
                    }
                } else {
                    StartAt::TrimHorizon
                }
            }
            Position::After(p) => {
                let mut seqs = match run.seqs.lock() {
                    Ok(m) => m,
                    Err(e) => e.into_inner(),
                };
                // Anything read past `p` is being rewound and will be read (and remembered) again.
                let _ = seqs.split_off(&(p.saturating_add(1)));
                match seqs.get(&p) {
                    Some(seq) => StartAt::AfterSequence { seq: seq.clone(), por: p },
                    None => StartAt::AfterPor(p),
                }
            }
        };
        tracing::info!(shard = %run.shard, ?start, generation, "reading shard");
        let reader = Reader {
            client: self.client.clone(),
            stream_name: self.cfg.stream.clone(),
            shard: run.shard.clone(),
            stream,
            generation,
            start,
            emit: ctx.emit.clone(),
            seqs: run.seqs.clone(),
            closed: self.closed.clone(),
            poll: Duration::from_millis(self.cfg.poll_interval_ms.unwrap_or(200).max(1)),
            health: ctx.health.clone(),
            metrics: ctx.metrics.clone(),
        };
        run.task = Some(tokio::spawn(reader.run()));
    }

    fn durable(&mut self, stream: u64, through: u64) {
        if let Some(run) = self.runs.get(&stream) {
            let mut seqs = match run.seqs.lock() {
                Ok(m) => m,
                Err(e) => e.into_inner(),
            };
            // Keep `through` itself: the next resume is most likely "after through".
            let rest = seqs.split_off(&through);
            *seqs = rest;
        }
    }

    fn stop_all(&mut self) {
        for run in self.runs.values_mut() {
            if let Some(t) = run.task.take() {
                t.abort();
            }
        }
    }

    /// A reader that failed permanently (e.g. the stream was deleted) fails the source.
    async fn check_readers(&mut self) -> Result<(), SourceError> {
        for run in self.runs.values_mut() {
            if run.task.as_ref().is_some_and(|t| t.is_finished())
                && let Some(t) = run.task.take()
            {
                match t.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => {
                        return Err(SourceError::External { system: "kinesis", message: format!("shard reader: {e}") });
                    }
                }
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl SourceIntegration for KinesisSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        let settings = AwsSettings {
            base: "spec.source.kinesis",
            region: &self.cfg.region,
            endpoint: self.cfg.endpoint.as_deref(),
            access_key_id_from: &self.cfg.access_key_id_from,
            secret_access_key_from: &self.cfg.secret_access_key_from,
        };
        let shared = sdk_config(&settings).await.map_err(SourceError::Config)?;
        let mut src = Source {
            client: Client::new(&shared),
            cfg: self.cfg.clone(),
            graph: ShardGraph::default(),
            closed: Arc::new(RwLock::new(HashMap::new())),
            runs: HashMap::new(),
        };
        // The first listing must succeed (retrying transient failures) so that `initial` means something.
        let mut delay = Duration::from_millis(200);
        loop {
            match list_shards(&src.client, &src.cfg.stream).await {
                Ok(_) => break,
                Err((true, m)) => {
                    return Err(SourceError::External { system: "kinesis", message: m });
                }
                Err((false, m)) => {
                    tracing::warn!(stream = %src.cfg.stream, error = %m, "cannot list shards yet; retrying");
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        src.discover(&ctx).await?;
        let mut tick = tokio::time::interval(DISCOVERY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => break Ok(()),
                cmd = ctx.commands.recv() => match cmd {
                    None => break Ok(()),
                    Some(Command::Start { stream, from, generation }) => src.start(&ctx, stream, from, generation),
                    Some(Command::Durable { stream, through }) => src.durable(stream, through),
                    Some(Command::Finished { stream }) => {
                        if let Some(run) = src.runs.get(&stream) {
                            tracing::info!(shard = %run.shard, "shard finished; looking for its children");
                            let shard = run.shard.clone();
                            src.graph.finish(&shard);
                        }
                        if let Err(e) = src.discover(&ctx).await {
                            break Err(e);
                        }
                    }
                },
                _ = tick.tick() => {
                    if let Err(e) = src.check_readers().await {
                        break Err(e);
                    }
                    if let Err(e) = src.discover(&ctx).await {
                        break Err(e);
                    }
                }
            }
        };
        src.stop_all();
        result
    }
}
