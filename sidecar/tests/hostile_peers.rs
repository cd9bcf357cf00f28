//! The worker ports against peers that do not play by the rules: no cookie, floods, silence, huge records, random
//! bytes. Nothing here may make a sink buffer without bound, hang, loop, or lose a committed round.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wallaroo_connector::protocol::sink::SinkSessionConfig;
use wallaroo_connector::runtime::sink_api::{Guarantee, Recovery, SinkError, SinkIntegration, SinkRecord, Txn};
use wallaroo_connector::runtime::sink_driver::{self, SinkDriverConfig};
use wallaroo_connector::runtime::{Health, Metrics};
use wallaroo_connector::sim::{RoundOutcome, SinkSim, SinkSimConfig};

/// A sink that keeps staged bytes in memory, fails staging for any record containing "poison", and whose
/// `prepare` does not re-check anything (like Kinesis or a transactional Kafka producer).
#[derive(Default)]
struct Trusting {
    staged: std::sync::Mutex<Vec<u8>>,
    committed: std::sync::Mutex<Vec<u8>>,
    prepares: AtomicUsize,
}

#[async_trait::async_trait]
impl SinkIntegration for Trusting {
    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }
    async fn recover(&self, _: &str) -> Result<Recovery, SinkError> {
        let c = self.committed.lock().unwrap().len() as u64;
        self.staged.lock().unwrap().clear();
        Ok(Recovery { committed: Some(c), pending: None })
    }
    async fn stage(&self, _: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        if records.iter().any(|r| r.payload.windows(6).any(|w| w == b"poison")) {
            return Err(SinkError::Permanent("refused record".into()));
        }
        let mut s = self.staged.lock().unwrap();
        for r in records {
            s.extend_from_slice(&r.payload);
        }
        Ok(())
    }
    async fn prepare(&self, _: &str, _: &Txn) -> Result<(), SinkError> {
        self.prepares.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn commit(&self, _: &str, _: &Txn) -> Result<(), SinkError> {
        let staged = std::mem::take(&mut *self.staged.lock().unwrap());
        self.committed.lock().unwrap().extend_from_slice(&staged);
        Ok(())
    }
    async fn abort(&self, _: &str, _: &Txn) -> Result<(), SinkError> {
        self.staged.lock().unwrap().clear();
        Ok(())
    }
    async fn forget(&self, _: &str) -> Result<(), SinkError> {
        Ok(())
    }
}

struct Served {
    addr: std::net::SocketAddr,
    sink: Arc<Trusting>,
    metrics: Metrics,
    _stop: tokio_util::sync::DropGuard,
}

async fn serve(tweak: impl FnOnce(&mut SinkDriverConfig)) -> Served {
    let session = SinkSessionConfig { cookie: wallaroo_crds::DEFAULT_COOKIE.into(), ..Default::default() };
    let mut cfg = SinkDriverConfig::new("127.0.0.1:0", session);
    tweak(&mut cfg);
    let sink = Arc::new(Trusting::default());
    let stop = CancellationToken::new();
    let metrics = Metrics::new("hostile", "test", "sink").unwrap();
    let (addr, _task) =
        sink_driver::start(cfg, sink.clone(), Health::new(), metrics.clone(), stop.clone()).await.unwrap();
    Served { addr, sink, metrics, _stop: stop.drop_guard() }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Reads until the peer closes; true if it closed within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_failed_last_batch_never_votes_commit() {
    // The batch staged just before Phase 1 fails; `prepare` does not re-check. The round must still abort.
    let served = serve(|_| {}).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(served.addr, "w1")).await.unwrap();
    w.send(b"good 1\n").await.unwrap();
    w.send(b"poison 2\n").await.unwrap();
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted, "a round with a refused record committed");
    assert!(served.sink.committed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn peers_without_the_cookie_cannot_make_the_sink_buffer_16_mib_each() {
    let served = serve(|_| {}).await;
    let before = rss();
    let mut peers = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(served.addr).await.unwrap();
        let mut b = BytesMut::new();
        b.put_u32(16 * 1024 * 1024);
        b.put_u8(0);
        b.put_slice(&[0u8; 1000]);
        s.write_all(&b).await.unwrap();
        peers.push(s);
    }
    for p in &mut peers {
        assert!(closed_within(p, Duration::from_secs(10)).await, "an oversize pre-HELLO frame was not refused");
    }
    let grew = rss().saturating_sub(before);
    assert!(grew < 64 << 20, "RSS grew by {} MiB for 40 quiet peers", grew >> 20);
}

#[tokio::test]
async fn silent_peers_are_closed_after_the_handshake_timeout_and_capped() {
    let served = serve(|c| {
        c.handshake_timeout = Duration::from_millis(500);
        c.max_connections = 8;
    })
    .await;
    let fds_before = open_fds();
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(served.addr).await.unwrap());
    }
    // Beyond the cap, connections are closed at once; within it, at the handshake timeout.
    for s in &mut idle {
        assert!(closed_within(s, Duration::from_secs(10)).await, "a silent peer was kept open");
    }
    // Our 50 client sockets are still open; the sink's side of them is not.
    assert!(open_fds() <= fds_before + 50 + 8, "the sink holds sockets of closed peers");
    drop(idle);
    // A real worker is served afterwards.
    let mut w = SinkSim::connect(SinkSimConfig::new(served.addr, "w1")).await.unwrap();
    w.send(b"a\n").await.unwrap();
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
}

#[tokio::test]
async fn a_record_over_the_frame_limit_aborts_its_round_without_a_reconnect_loop() {
    let limit = 1 << 20;
    let served = serve(|c| c.max_frame = limit).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(served.addr, "w1")).await.unwrap();
    w.send(b"before\n").await.unwrap();
    w.send(&vec![b'x'; 2 * limit]).await.unwrap();
    // The connection stays up and the round is refused; before, the sink closed and the worker resent forever.
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted);
    w.reconnect().await.unwrap();
    w.send(b"after\n").await.unwrap();
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    // Phase 2 has no reply: one more round trip proves the commit was applied.
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    assert_eq!(served.sink.committed.lock().unwrap().as_slice(), b"after\n");
}

#[tokio::test]
async fn an_idle_timeout_closes_a_quiet_worker_when_set() {
    let served = serve(|c| c.idle_timeout = Some(Duration::from_millis(300))).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(served.addr, "w1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(w.checkpoint().await.is_err(), "a worker idle past the timeout was kept");
}

fn arbitrary_frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    // Mostly well-framed bodies with random tags and contents, sometimes raw garbage.
    let body = (0u8..12, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(tag, mut rest)| {
        rest.insert(0, tag);
        let mut f = (rest.len() as u32).to_be_bytes().to_vec();
        f.extend(rest);
        f
    });
    proptest::collection::vec(prop_oneof![4 => body, 1 => proptest::collection::vec(any::<u8>(), 1..32)], 1..20)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Random frames before and after a valid HELLO: the sink never panics, always answers or closes within a
    /// bound, and keeps serving a real worker.
    #[test]
    fn random_frames_never_break_the_sink(frames in arbitrary_frames(), with_hello in any::<bool>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let served = serve(|c| c.handshake_timeout = Duration::from_millis(300)).await;
            let mut s = TcpStream::connect(served.addr).await.unwrap();
            if with_hello {
                let mut b = BytesMut::new();
                wallaroo_connector::protocol::Frame::Hello(wallaroo_connector::protocol::Hello {
                    version: Bytes::from_static(b"v0.0.1"),
                    cookie: Bytes::from(wallaroo_crds::DEFAULT_COOKIE),
                    program_name: Bytes::from_static(b"p"),
                    instance_name: Bytes::from_static(b"fuzz"),
                }).encode(&mut b).unwrap();
                let _ = s.write_all(&b).await;
            }
            for f in &frames {
                if s.write_all(f).await.is_err() {
                    break;
                }
            }
            // Either the sink closes on us, or it is still waiting for more; both are fine, hanging forever is not.
            let _ = closed_within(&mut s, Duration::from_millis(500)).await;
            drop(s);
            let mut w = SinkSim::connect(SinkSimConfig::new(served.addr, "w1")).await.unwrap();
            w.send(b"ok\n").await.unwrap();
            assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
        });
    }
}

#[tokio::test]
async fn data_without_any_checkpoint_round_is_reported() {
    // A non-resilient worker never runs 2PC rounds: an exactly-once sink would stage forever without a word.
    let served = serve(|c| c.no_rounds_warning = Duration::from_millis(200)).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(served.addr, "w1")).await.unwrap();
    let counted = || served.metrics.render().contains(r#"error_type="no_checkpoints""#);
    w.send(b"a\n").await.unwrap();
    w.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!counted(), "reported before the threshold");
    for _ in 0..20 {
        w.send(b"b\n").await.unwrap();
        w.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if counted() {
            return;
        }
    }
    panic!("no report of data flowing without checkpoint rounds:\n{}", served.metrics.render());
}

/// A 0-based-offset source (like a Kafka partition) that records every durable point it is told.
struct Recording {
    n: u64,
    durable: Arc<std::sync::Mutex<Vec<u64>>>,
}

#[async_trait::async_trait]
impl wallaroo_connector::runtime::source_api::SourceIntegration for Recording {
    async fn run(
        self: Box<Self>,
        mut ctx: wallaroo_connector::runtime::source_api::SourceContext,
    ) -> Result<(), wallaroo_connector::runtime::source_api::SourceError> {
        use wallaroo_connector::runtime::source_api::{Command, Emit, Position, Record, SourceError};
        let gone = |_| SourceError::RuntimeGone;
        ctx.emit.send(Emit::Stream { name: "p0".into() }).await.map_err(gone)?;
        loop {
            tokio::select! {
                cmd = ctx.commands.recv() => match cmd {
                    Some(Command::Start { stream, from, generation }) => {
                        let first = match from { Position::Beginning => 0, Position::After(p) => p.saturating_add(1) };
                        let records: Vec<Record> = (first..self.n)
                            .map(|i| Record { por: i, key: None, payload: Bytes::from_static(b"r") })
                            .collect();
                        if !records.is_empty() {
                            ctx.emit.send(Emit::Records { stream, generation, records }).await.map_err(gone)?;
                        }
                    }
                    Some(Command::Durable { through, .. }) => self.durable.lock().unwrap().push(through),
                    Some(_) => {}
                    None => return Ok(()),
                },
                _ = ctx.shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

/// Well-formed worker frames with hostile contents, mixed with garbage.
fn worker_frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    use wallaroo_connector::protocol::{Frame, stream_id_for};
    let encode = |f: Frame| {
        let mut b = BytesMut::new();
        f.encode(&mut b).unwrap();
        b.to_vec()
    };
    let sid = stream_id_for(b"p0");
    let ack = (any::<u32>(), any::<u64>(), any::<bool>()).prop_map(move |(credits, por, small)| {
        let por = if small { por % 128 } else { por };
        encode(Frame::Ack { credits: credits % 1000, acks: vec![(sid, por)] })
    });
    let notify_ack = (any::<bool>(), any::<u64>())
        .prop_map(move |(success, por)| encode(Frame::NotifyAck { success, stream_id: sid, point_of_ref: por }));
    let restart = proptest::collection::vec(any::<u8>(), 0..24)
        .prop_map(move |a| encode(Frame::Restart { address: Bytes::from(a) }));
    let garbage = arbitrary_frames().prop_map(|v| v.concat());
    proptest::collection::vec(prop_oneof![4 => ack, 2 => notify_ack, 1 => restart, 1 => garbage], 1..24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// A hostile "worker" answers the source's HELLO with random frames (OK with any credits, NOTIFY_ACKs with any
    /// point, ACKs with any entries, garbage). The source never panics, keeps reconnecting, and never commits
    /// upstream a point it did not send or was not granted.
    #[test]
    fn random_worker_frames_never_break_the_source(frames in worker_frames(), grant in any::<u64>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use wallaroo_connector::protocol::source::SourceSessionConfig;
            use wallaroo_connector::protocol::{Frame, SOURCE_VERSION, stream_id_for};
            use wallaroo_connector::runtime::source_driver::{SourceDriver, SourceDriverConfig};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let session = SourceSessionConfig {
                version: SOURCE_VERSION.into(),
                cookie: "c".into(),
                program_name: "p".into(),
                instance_name: "i".into(),
            };
            let mut cfg = SourceDriverConfig::new(addr.to_string(), session);
            cfg.backoff_initial = Duration::from_millis(10);
            cfg.backoff_max = Duration::from_millis(50);
            let durable = Arc::new(std::sync::Mutex::new(Vec::new()));
            let stop = CancellationToken::new();
            let metrics = Metrics::new("fuzz", "test", "source").unwrap();
            let integration = Box::new(Recording { n: 50, durable: durable.clone() });
            let driver = SourceDriver::start(cfg, integration, Health::new(), metrics, stop.clone());
            let task = tokio::spawn(driver.run(stop.clone()));
            for round in 0..2 {
                let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.unwrap().unwrap();
                let mut hello = [0u8; 512];
                let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut hello)).await;
                // Half the rounds start like a real worker, so later frames meet a streaming session.
                if round == 0 {
                    let mut b = BytesMut::new();
                    Frame::Ok { initial_credits: 100 }.encode(&mut b).unwrap();
                    Frame::NotifyAck { success: true, stream_id: stream_id_for(b"p0"), point_of_ref: grant % 64 }
                        .encode(&mut b)
                        .unwrap();
                    let _ = s.write_all(&b).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                for f in &frames {
                    if s.write_all(f).await.is_err() {
                        break;
                    }
                }
                let _ = closed_within(&mut s, Duration::from_millis(200)).await;
            }
            assert!(!task.is_finished(), "the source gave up (or panicked) on a hostile worker");
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            let sent_max = 49u64.max(grant % 64);
            for through in durable.lock().unwrap().iter() {
                assert!(*through <= sent_max, "committed through {through}, beyond anything sent or granted");
            }
        });
    }
}
