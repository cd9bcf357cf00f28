//! The Kafka source against Apache Kafka (the shared broker started by `tests/services/kafka.sh`, or a private one
//! for outages) and the simulated worker. Each test uses its own topic and consumer group.
mod kafka_common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kafka_common::*;
use tokio_util::sync::CancellationToken;
use wallaroo_connector::runtime::run::{RunOverrides, run};
use wallaroo_connector::sim::{SourceSim, SourceSimConfig};

fn connector(yaml: &str) -> wallaroo_crds::Connector {
    wallaroo_crds::parse_connectors(yaml, "test").expect("manifest").remove(0)
}

/// Runs the connector in-process; returns its shutdown token and task.
fn spawn_in_process(
    yaml: &str,
    admin: Option<SocketAddr>,
) -> (CancellationToken, tokio::task::JoinHandle<Result<(), wallaroo_connector::runtime::run::RunError>>) {
    let c = connector(yaml);
    let stop = CancellationToken::new();
    let overrides = RunOverrides {
        admin_addr: Some(admin.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))),
        drain_timeout: Some(Duration::from_secs(10)),
    };
    let task = tokio::spawn(run(c, overrides, stop.clone()));
    (stop, task)
}

fn payloads(sim: &SourceSim, stream: &str) -> Vec<(u64, String)> {
    sim.processed(stream).into_iter().map(|(id, p)| (id, String::from_utf8_lossy(&p).into_owned())).collect()
}

fn expected(partition: i32, from: usize, to: usize) -> Vec<(u64, String)> {
    (from..to).map(|i| (i as u64, payload(partition, i))).collect()
}

/// Compares a stream's processed log with `want`, reporting the first difference briefly.
fn assert_stream(sim: &SourceSim, stream: &str, want: &[(u64, String)]) {
    let got = payloads(sim, stream);
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!(
            "{stream}: got {} records, want {}; first difference at index {at}: got {:?}, want {:?}",
            got.len(),
            want.len(),
            got.get(at),
            want.get(at)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivers_every_message_in_order_per_partition() {
    require_broker(BROKER);
    let topic = unique("src-order");
    let group = unique("g");
    create_topic(BROKER, &topic, 3).await;
    let p = producer(BROKER);
    produce(&p, &topic, 3, 0, 200).await;

    let sim = SourceSim::start(SourceSimConfig::default()).await.unwrap();
    let (stop, task) = spawn_in_process(&source_manifest(sim.addr(), BROKER, &topic, &group), None);
    // Records produced while the source runs arrive too.
    produce(&p, &topic, 3, 200, 100).await;
    assert!(
        sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 900).await,
        "got {}",
        sim.processed_total()
    );
    for part in 0..3 {
        assert_stream(&sim, &format!("{topic}:{part}"), &expected(part, 0, 300));
    }
    // Nothing extra arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.processed_total(), 900);
    let stats = sim.stats();
    assert_eq!((stats.protocol_errors, stats.credit_overruns), (0, 0), "{stats:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_offsets_advance_only_after_the_worker_acks() {
    require_broker(BROKER);
    let topic = unique("src-commit");
    let group = unique("g");
    create_topic(BROKER, &topic, 2).await;
    let p = producer(BROKER);
    produce(&p, &topic, 2, 0, 50).await;

    let sim = SourceSim::start(SourceSimConfig::default()).await.unwrap();
    sim.stall_acks(true);
    let (stop, task) = spawn_in_process(&source_manifest(sim.addr(), BROKER, &topic, &group), None);
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 100).await);
    // Processed but not checkpointed: the group must not have moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(committed(BROKER, &group, &topic, 2), vec![None, None]);

    sim.stall_acks(false);
    let mut got = Vec::new();
    for _ in 0..100 {
        got = committed(BROKER, &group, &topic, 2);
        if got == vec![Some(50), Some(50)] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(got, vec![Some(50), Some(50)]);
    assert_eq!(sim.acked(&format!("{topic}:0")), Some(49));
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_restart_mid_stream_resumes_from_the_acked_point() {
    require_broker(BROKER);
    let topic = unique("src-restart");
    let group = unique("g");
    create_topic(BROKER, &topic, 1).await;
    let p = producer(BROKER);
    produce(&p, &topic, 1, 0, 3000).await;

    let sim = SourceSim::start(SourceSimConfig::default()).await.unwrap();
    let (stop, task) = spawn_in_process(&source_manifest(sim.addr(), BROKER, &topic, &group), None);
    let stream = format!("{topic}:0");
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_count(&stream) >= 500).await);
    sim.restart_connections();
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_count(&stream) >= 3000).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_stream(&sim, &stream, &expected(0, 0, 3000));
    let stats = sim.stats();
    assert!(stats.restarts >= 1 && stats.connections >= 2, "{stats:?}");
    assert_eq!(stats.protocol_errors, 0, "{stats:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

fn spawn_binary(manifest: &Path, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_wallaroo-connector"))
        .args(["run", "-f"])
        .arg(manifest)
        .args(["--admin-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("start wallaroo-connector")
}

fn sigterm_and_wait(child: &mut Child) {
    let pid = child.id().to_string();
    let ok = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(ok.success());
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean shutdown failed: {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the sidecar did not stop within 30 s of SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_then_restart_loses_nothing_and_clean_restart_redelivers_nothing_acked() {
    require_broker(BROKER);
    let topic = unique("src-kill");
    let group = unique("g");
    let parts = 2;
    create_topic(BROKER, &topic, parts).await;
    let p = producer(BROKER);
    produce(&p, &topic, parts, 0, 2000).await;
    let dir = tempfile::Builder::new()
        .prefix("kafka-kill-")
        .disable_cleanup(std::env::var_os("KEEP_LOGS").is_some())
        .tempdir()
        .unwrap();
    eprintln!("logs in {}", dir.path().display());

    // 1. Crash mid-stream: every message still arrives (at least once; the worker drops duplicate ids).
    let sim = SourceSim::start(SourceSimConfig::default()).await.unwrap();
    let manifest = dir.path().join("source.yaml");
    std::fs::write(&manifest, source_manifest(sim.addr(), BROKER, &topic, &group)).unwrap();
    let mut child = spawn_binary(&manifest, &dir.path().join("run1.log"));
    let s0 = format!("{topic}:0");
    let ok = sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 600 && s.acked(&s0).is_some()).await;
    assert!(ok, "first run made no progress");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let after_kill = sim.processed_total();
    produce(&p, &topic, parts, 2000, 500).await;
    let mut child = spawn_binary(&manifest, &dir.path().join("run2.log"));
    // Wait for every distinct record of every partition: redelivered duplicates of one partition can bring the
    // total up to 2 × 2500 while the other partition is still on its way (after a kill -9, the dead member keeps
    // its partitions until its session times out).
    let distinct = |s: &wallaroo_connector::sim::SourceSimState, part: i32| {
        s.processed(&format!("{topic}:{part}"))
            .iter()
            .map(|(id, _)| *id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let ok = sim.wait_until(Duration::from_secs(90), |s| (0..parts).all(|part| distinct(s, part) >= 2500)).await;
    assert!(ok, "after restart got {} records in all (had {after_kill} at the kill)", sim.processed_total());
    for part in 0..parts {
        // The worker keeps what it processed after its last checkpoint when a connection drops, so records
        // after that checkpoint may be there twice; in order of first arrival they are exactly the partition.
        let stream = format!("{topic}:{part}");
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<(u64, String)> =
            payloads(&sim, &stream).into_iter().filter(|(id, _)| seen.insert(*id)).collect();
        assert_eq!(firsts.len(), 2500, "{stream}");
        assert!(firsts == expected(part, 0, 2500), "{stream}: records missing or out of order");
    }

    // 2. Clean stop: the drain waits for the worker's acks and commits them.
    sigterm_and_wait(&mut child);
    let acked: Vec<u64> = (0..parts).map(|part| sim.acked(&format!("{topic}:{part}")).expect("acked")).collect();
    assert_eq!(acked, vec![2499, 2499]);
    assert_eq!(committed(BROKER, &group, &topic, parts), vec![Some(2500), Some(2500)]);

    // 3. A fresh worker (no position of its own) starts where the group committed: nothing acked comes again.
    produce(&p, &topic, parts, 2500, 100).await;
    let sim2 = SourceSim::start(SourceSimConfig::default()).await.unwrap();
    std::fs::write(&manifest, source_manifest(sim2.addr(), BROKER, &topic, &group)).unwrap();
    let mut child = spawn_binary(&manifest, &dir.path().join("run3.log"));
    assert!(
        sim2.wait_until(Duration::from_secs(90), |s| s.processed_total() >= 200).await,
        "fresh worker got {}",
        sim2.processed_total()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for part in 0..parts {
        assert_stream(&sim2, &format!("{topic}:{part}"), &expected(part, 2500, 2600));
    }
    sigterm_and_wait(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sidecars_in_one_group_split_the_partitions() {
    require_broker(BROKER);
    let topic = unique("src-group");
    let group = unique("g");
    create_topic(BROKER, &topic, 4).await;
    let p = producer(BROKER);
    produce(&p, &topic, 4, 0, 300).await;
    let sim = SourceSim::start(SourceSimConfig::default()).await.unwrap();
    let yaml = source_manifest(sim.addr(), BROKER, &topic, &group);
    let admin1 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (stop1, task1) = spawn_in_process(&yaml, Some(admin1));
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 1200).await);
    // A second member joins: partitions are revoked (drained), then split between the two.
    let yaml2 = yaml.replace("instanceName: kafka-test", "instanceName: kafka-test-2");
    let admin2 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (stop2, task2) = spawn_in_process(&yaml2, Some(admin2));
    // Both members hold partitions once the group settled: each reports acknowledged streams of the topic.
    let holds = |admin: SocketAddr, topic: String| async move {
        let (_, body) = http_get(admin, "/metrics").await.unwrap_or_default();
        body.lines().filter(|l| l.contains("acked_point_of_reference") && l.contains(&format!("{topic}:"))).count()
    };
    let mut split = false;
    let mut extra = 0;
    for _ in 0..300 {
        produce(&p, &topic, 4, 300 + extra, 1).await;
        extra += 1;
        if holds(admin2, topic.clone()).await > 0 {
            split = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(split, "the second member never received a partition");
    assert!(holds(admin1, topic.clone()).await > 0, "the first member kept no partition");
    // Records keep flowing after the split, each exactly once and in order: revoked partitions were drained
    // (ended, acknowledged, committed) before their new owner started them at the committed offset.
    let produced = 300 + extra;
    produce(&p, &topic, 4, produced, 100).await;
    let total = 4 * (produced + 100) as u64;
    let ok = sim.wait_until(Duration::from_secs(90), |s| s.processed_total() >= total).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for part in 0..4 {
        assert_stream(&sim, &format!("{topic}:{part}"), &expected(part, 0, produced + 100));
    }
    assert!(ok, "got {} of {total}", sim.processed_total());
    stop1.cancel();
    stop2.cancel();
    task1.await.unwrap().unwrap();
    task2.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outage_is_survived_and_readyz_follows() {
    init_tracing();
    // The sidecar reaches a private broker only through a proxy on the advertised port; stopping the proxy is
    // a network cut as clients see it (connections dropped, new ones refused) while the broker keeps running.
    let mut broker = PrivateBroker::start().await;
    let brokers = broker.brokers.clone();
    let topic = unique("src-broker");
    let group = unique("g");
    create_topic(&brokers, &topic, 1).await;
    let p = producer(&brokers);
    produce(&p, &topic, 1, 0, 10).await;

    let sim = SourceSim::start(SourceSimConfig::default()).await.unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (stop, task) = spawn_in_process(&source_manifest(sim.addr(), &brokers, &topic, &group), Some(admin));
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 10).await);
    let ready = |want: u16| wait_readyz(admin, want);
    assert!(ready(200).await, "not ready while the broker is up");

    broker.cut().await;
    assert!(ready(503).await, "/readyz still 200 with the broker gone");

    broker.restore().await;
    assert!(ready(200).await, "/readyz did not recover after the broker came back");
    // Records produced after the outage flow again, after the ones before it, each once.
    produce(&p, &topic, 1, 10, 10).await;
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 20).await);
    assert_stream(&sim, &format!("{topic}:0"), &expected(0, 0, 20));
    assert_eq!(sim.stats().connections, 1, "the worker connection stayed up throughout");
    stop.cancel();
    task.await.unwrap().unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restart_is_survived_and_the_group_resumes_from_its_committed_offsets() {
    init_tracing();
    // A real restart of the broker process: every client connection goes, the group coordinator and the partition
    // leader come back from the broker's log, and the committed offsets must still be the ones acknowledged.
    let mut broker = PrivateBroker::start().await;
    let brokers = broker.brokers.clone();
    let topic = unique("src-restart-broker");
    let group = unique("g");
    create_topic(&brokers, &topic, 2).await;
    let p = producer(&brokers);
    produce(&p, &topic, 2, 0, 50).await;

    let sim = SourceSim::start(SourceSimConfig::default()).await.unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (stop, task) = spawn_in_process(&source_manifest(sim.addr(), &brokers, &topic, &group), Some(admin));
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 100).await);
    let mut got = Vec::new();
    for _ in 0..100 {
        got = committed(&brokers, &group, &topic, 2);
        if got == vec![Some(50), Some(50)] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(got, vec![Some(50), Some(50)], "offsets committed before the restart");

    broker.restart().await;
    // The offsets the group committed before the restart are still there.
    assert_eq!(committed(&brokers, &group, &topic, 2), vec![Some(50), Some(50)], "offsets after the restart");
    assert!(wait_readyz(admin, 200).await, "/readyz did not come back after the broker restart");
    // Records produced after the restart arrive after the ones before it, each once.
    let p = producer(&brokers);
    produce(&p, &topic, 2, 50, 50).await;
    assert!(
        sim.wait_until(Duration::from_secs(90), |s| s.processed_total() >= 200).await,
        "got {} of 200",
        sim.processed_total()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for part in 0..2 {
        assert_stream(&sim, &format!("{topic}:{part}"), &expected(part, 0, 100));
    }
    assert_eq!(sim.stats().connections, 1, "the worker connection stayed up throughout");
    stop.cancel();
    task.await.unwrap().unwrap();
    broker.stop().await;
}
