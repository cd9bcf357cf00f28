//! The simulated worker is at least as strict as the real one (spec 2): each check here is first shown to catch a
//! deliberately broken connector (a raw client that breaks one rule), then the real source driver is shown to pass
//! the same model, including the worker behaviours a lenient simulator never produced: a remote registry leader,
//! a RESTART to another address, a rollback window, a non-resilient worker.
mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wallaroo_connector::protocol::source::SourceSessionConfig;
use wallaroo_connector::protocol::{Frame, FrameCodec, Hello, SOURCE_VERSION, U64_MAX, encode_message, stream_id_for};
use wallaroo_connector::runtime::source_api::{
    Command, Emit, Position, Record, SourceContext, SourceError, SourceIntegration,
};
use wallaroo_connector::runtime::source_driver::{SourceDriver, SourceDriverConfig, SourceOutcome};
use wallaroo_connector::runtime::{Health, Metrics};
use wallaroo_connector::sim::{Leader, SourceSim, SourceSimConfig};

/// A hand-driven connector: it sends exactly the frames a test writes, so it can break any rule.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(sim: &SourceSim) -> Raw {
        let mut raw = Raw { stream: TcpStream::connect(sim.addr()).await.unwrap(), buf: BytesMut::new() };
        raw.send(Frame::Hello(Hello {
            version: Bytes::from_static(SOURCE_VERSION.as_bytes()),
            cookie: Bytes::from(wallaroo_crds::DEFAULT_COOKIE),
            program_name: Bytes::from_static(b"raw"),
            instance_name: Bytes::from_static(b"raw"),
        }))
        .await;
        raw
    }
    async fn send(&mut self, f: Frame) {
        let mut b = BytesMut::new();
        f.encode(&mut b).unwrap();
        self.stream.write_all(&b).await.unwrap();
    }
    async fn message(&mut self, stream: u64, id: u64) {
        let mut b = BytesMut::new();
        encode_message(&mut b, stream, id, None, b"x").unwrap();
        self.stream.write_all(&b).await.unwrap();
    }
    /// Next frame from the worker, or None when it closed.
    async fn recv(&mut self) -> Option<Frame> {
        let codec = FrameCodec::default();
        loop {
            if let Some(body) = codec.split_frame(&mut self.buf).unwrap() {
                return Some(Frame::decode(body).unwrap());
            }
            let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read_buf(&mut self.buf))
                .await
                .expect("worker answers")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }
}

fn strict(leader: Leader) -> SourceSimConfig {
    SourceSimConfig { max_credits: 10, refill_credits: 2, checkpoint_every: None, leader, ..Default::default() }
}

#[tokio::test]
async fn the_model_catches_a_connector_that_overruns_its_credits() {
    let sim = SourceSim::start(strict(Leader::Local)).await.unwrap();
    let mut raw = Raw::connect(&sim).await;
    assert!(matches!(raw.recv().await, Some(Frame::Ok { initial_credits: 10 })));
    let sid = stream_id_for(b"s");
    // A busy worker: refills come late. A connector that does not wait for them sends past its 10 credits.
    sim.stall_credits(true);
    raw.send(Frame::Notify { stream_id: sid, stream_name: Bytes::from_static(b"s"), point_of_ref: U64_MAX }).await;
    for id in 0..40 {
        raw.message(sid, id).await;
    }
    assert!(sim.wait_until(Duration::from_secs(5), |s| s.stats().credit_overruns > 0).await, "{:?}", sim.stats());
}

#[tokio::test]
async fn a_connector_that_waits_for_late_refills_never_overruns() {
    let mut cfg = strict(Leader::Local);
    cfg.checkpoint_every = Some(Duration::from_millis(20));
    let sim = SourceSim::start(cfg).await.unwrap();
    let task = run_offsets(&sim, sim.addr().to_string(), 20_000).await;
    for _ in 0..20 {
        sim.stall_credits(true);
        tokio::time::sleep(Duration::from_millis(15)).await;
        sim.stall_credits(false);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcome = tokio::time::timeout(Duration::from_secs(60), task).await.expect("finishes").unwrap();
    assert_eq!(outcome, SourceOutcome::Completed);
    assert_eq!(sim.processed("p0").len(), 20_000);
    sim.with(clean);
}

#[tokio::test]
async fn the_model_catches_ids_that_do_not_increase() {
    let sim = SourceSim::start(strict(Leader::Local)).await.unwrap();
    let mut raw = Raw::connect(&sim).await;
    raw.recv().await;
    let sid = stream_id_for(b"s");
    raw.send(Frame::Notify { stream_id: sid, stream_name: Bytes::from_static(b"s"), point_of_ref: U64_MAX }).await;
    raw.message(sid, 5).await;
    raw.message(sid, 3).await;
    assert!(sim.wait_until(Duration::from_secs(5), |s| s.stats().id_regressions == 1).await, "{:?}", sim.stats());
}

#[tokio::test]
async fn a_remote_leader_grants_a_new_stream_what_the_notify_said() {
    // This is the path that turned the old NOTIFY(0) into a lost record: 0 granted back, id 0 dropped.
    let sim = SourceSim::start(strict(Leader::Remote)).await.unwrap();
    let mut raw = Raw::connect(&sim).await;
    raw.recv().await;
    let sid = stream_id_for(b"s");
    raw.send(Frame::Notify { stream_id: sid, stream_name: Bytes::from_static(b"s"), point_of_ref: 0 }).await;
    assert_eq!(raw.recv().await, Some(Frame::NotifyAck { success: true, stream_id: sid, point_of_ref: 0 }));
    raw.message(sid, 0).await;
    raw.message(sid, 1).await;
    assert!(sim.wait_until(Duration::from_secs(5), |s| s.stats().duplicates == 1 && s.processed_count("s") == 1).await);
    assert_eq!(sim.processed("s").iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1]);
}

/// A source whose points of reference are 0-based offsets, like a Kafka partition: the record at 0 is the one a
/// wrong grant loses.
struct Offsets {
    n: u64,
}

#[async_trait::async_trait]
impl SourceIntegration for Offsets {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        ctx.emit.send(Emit::Stream { name: "p0".into() }).await.map_err(|_| SourceError::RuntimeGone)?;
        let sid = stream_id_for(b"p0");
        while let Some(cmd) = ctx.commands.recv().await {
            match cmd {
                Command::Start { stream, from, generation } if stream == sid => {
                    let first = match from {
                        Position::Beginning => 0,
                        Position::After(p) => p + 1,
                    };
                    let records: Vec<Record> = (first..self.n)
                        .map(|i| Record { por: i, key: None, payload: Bytes::from(format!("r{i}")) })
                        .collect();
                    if !records.is_empty() {
                        let batch = Emit::Records { stream: sid, generation, records };
                        ctx.emit.send(batch).await.map_err(|_| SourceError::RuntimeGone)?;
                    }
                    ctx.emit.send(Emit::End { stream: sid, generation }).await.map_err(|_| SourceError::RuntimeGone)?;
                }
                Command::Finished { .. } => return Ok(()),
                _ => {}
            }
        }
        Ok(())
    }
}

async fn run_offsets(sim: &SourceSim, worker_addr: String, n: u64) -> tokio::task::JoinHandle<SourceOutcome> {
    let _ = sim;
    let session = SourceSessionConfig {
        version: SOURCE_VERSION.into(),
        cookie: wallaroo_crds::DEFAULT_COOKIE.into(),
        program_name: "t".into(),
        instance_name: "t".into(),
    };
    let mut cfg = SourceDriverConfig::new(worker_addr, session);
    cfg.backoff_initial = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    let metrics = Metrics::new("t", "test", "source").unwrap();
    let stop = CancellationToken::new();
    let driver = SourceDriver::start(cfg, Box::new(Offsets { n }), Health::new(), metrics, stop.clone());
    tokio::spawn(async move { driver.run(stop).await.unwrap() })
}

#[tokio::test]
async fn a_fresh_stream_starts_at_offset_zero_under_a_remote_leader() {
    let mut cfg = strict(Leader::Remote);
    cfg.checkpoint_every = Some(Duration::from_millis(20));
    let sim = SourceSim::start(cfg).await.unwrap();
    let task = run_offsets(&sim, sim.addr().to_string(), 50).await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), task).await.expect("finishes").unwrap();
    assert_eq!(outcome, SourceOutcome::Completed);
    let ids: Vec<u64> = sim.processed("p0").iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (0..50).collect::<Vec<_>>(), "record at offset 0 lost");
    sim.with(clean);
}

#[tokio::test]
async fn a_restart_to_an_unreachable_address_falls_back_to_the_configured_worker() {
    let mut cfg = strict(Leader::Local);
    cfg.checkpoint_every = Some(Duration::from_millis(20));
    let sim = SourceSim::start(cfg).await.unwrap();
    // Nothing listens there: the first connection attempt after the RESTART fails.
    let dead = format!("127.0.0.1:{}", free_port());
    let task = run_offsets(&sim, sim.addr().to_string(), 200_000).await;
    assert!(sim.wait_until(Duration::from_secs(10), |s| s.processed_count("p0") > 0).await);
    sim.restart_connections_to(&dead);
    let outcome = tokio::time::timeout(Duration::from_secs(60), task).await.expect("source came back").unwrap();
    assert_eq!(outcome, SourceOutcome::Completed);
    assert_eq!(sim.processed("p0").len(), 200_000);
    assert!(sim.stats().restarts >= 1);
    sim.with(clean);
}

#[tokio::test]
async fn rollbacks_with_a_window_lose_nothing() {
    let mut cfg = strict(Leader::Local);
    cfg.checkpoint_every = Some(Duration::from_millis(10));
    cfg.rollback_window = Duration::from_millis(150);
    let sim = SourceSim::start(cfg).await.unwrap();
    let task = run_offsets(&sim, sim.addr().to_string(), 300_000).await;
    for _ in 0..3 {
        assert!(sim.wait_until(Duration::from_secs(20), |s| s.processed_count("p0") > 0).await);
        sim.rollback();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let outcome = tokio::time::timeout(Duration::from_secs(90), task).await.expect("finishes").unwrap();
    assert_eq!(outcome, SourceOutcome::Completed);
    let ids: Vec<u64> = sim.processed("p0").iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (0..300_000).collect::<Vec<_>>());
    sim.with(clean);
}

#[tokio::test]
async fn a_non_resilient_worker_confirms_eos_at_once() {
    let mut cfg = strict(Leader::Local);
    cfg.resilient = false;
    cfg.checkpoint_every = Some(Duration::from_millis(20));
    let sim = SourceSim::start(cfg).await.unwrap();
    let task = run_offsets(&sim, sim.addr().to_string(), 1_000).await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), task).await.expect("finishes").unwrap();
    assert_eq!(outcome, SourceOutcome::Completed);
    assert_eq!(sim.processed("p0").len(), 1_000);
    sim.with(clean);
}

#[tokio::test]
async fn a_muted_worker_answers_hello_only_after_checkpoint_one_and_the_source_waits() {
    let mut cfg = strict(Leader::Local);
    cfg.mute_until_first_checkpoint = true;
    let sim = SourceSim::start(cfg).await.unwrap();
    let task = run_offsets(&sim, sim.addr().to_string(), 100).await;
    // Connected at TCP level, but no OK: nothing may be processed, and the source must not give up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sim.processed_total(), 0);
    assert_eq!(sim.with(|s| s.connected()), 0, "HELLO answered while muted");
    assert!(!task.is_finished(), "the source gave up while the worker was muted");
    sim.checkpoint_now();
    // Unmuted: from here on checkpoints come from the test.
    assert!(sim.wait_until(Duration::from_secs(20), |s| s.processed_count("p0") == 100).await);
    for _ in 0..50 {
        sim.checkpoint_now();
        if task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcome = tokio::time::timeout(Duration::from_secs(10), task).await.expect("finishes").unwrap();
    assert_eq!(outcome, SourceOutcome::Completed);
    sim.with(clean);
}
