//! The Kafka sink against Apache Kafka (the shared broker started by `tests/services/kafka.sh`, or a private one
//! for outages), driven by the simulated worker.
mod kafka_common;

use std::net::SocketAddr;
use std::time::Duration;

use kafka_common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use wallaroo_connector::runtime::run::{RunOverrides, run};
use wallaroo_connector::sim::{RoundOutcome, SinkSim, SinkSimConfig};

fn sink_manifest(port: u16, topic: &str, extra_properties: &str) -> String {
    sink_manifest_at(BROKER, port, topic, extra_properties)
}

fn sink_manifest_at(brokers: &str, port: u16, topic: &str, extra_properties: &str) -> String {
    format!(
        r#"apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata:
  name: kafka-sink-test
spec:
  connectorName: kafka_out
  worker:
    host: 127.0.0.1
    port: {port}
    cookie: Dragons-Love-Tacos
  sink:
    kafka:
      brokers: ["{brokers}"]
      topic: "{topic}"
      format: json
      keyField: id
      properties:
        linger.ms: "1"
{extra_properties}"#
    )
}

async fn start_sink(yaml: &str, port: u16) -> (CancellationToken, tokio::task::JoinHandle<()>, SocketAddr) {
    start_sink_with_admin(yaml, port, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

async fn start_sink_with_admin(
    yaml: &str,
    port: u16,
    admin: SocketAddr,
) -> (CancellationToken, tokio::task::JoinHandle<()>, SocketAddr) {
    let c = wallaroo_crds::parse_connectors(yaml, "test").expect("manifest").remove(0);
    let stop = CancellationToken::new();
    let overrides = RunOverrides { admin_addr: Some(admin), drain_timeout: Some(Duration::from_secs(5)) };
    let s = stop.clone();
    let task = tokio::spawn(async move {
        run(c, overrides, s).await.expect("sink run");
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_port(port).await;
    (stop, task, addr)
}

/// Every record of the topic (one partition), as (key, value).
fn read_all(topic: &str, want: usize) -> Vec<(Option<String>, String)> {
    read_all_at(BROKER, topic, want)
}

/// Every record of the topic (one partition) on `brokers`, as (key, value); only committed transactional
/// records (`read_committed`, which reads non-transactional records as they are).
fn read_all_at(brokers: &str, topic: &str, want: usize) -> Vec<(Option<String>, String)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", "read_committed")
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push((
                m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            )),
            Some(Err(e)) => panic!("consume: {e}"),
            // Keep reading a little past `want` so extra records would be seen.
            None if out.len() >= want => break,
            None => {}
        }
    }
    out
}

fn record(i: usize) -> String {
    format!(r#"{{"id":"k{i}","n":{i}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_rounds_appear_in_the_topic() {
    require_broker(BROKER);
    let topic = unique("sink-commit");
    create_topic(BROKER, &topic, 1).await;
    let port = free_port();
    let (stop, task, addr) = start_sink(&sink_manifest(port, &topic, ""), port).await;

    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "worker1")).await.unwrap();
    for i in 0..100 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    for i in 100..250 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    let got = read_all(&topic, 250);
    let want: Vec<(Option<String>, String)> = (0..250).map(|i| (Some(format!("k{i}")), record(i))).collect();
    assert_eq!(got, want);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permanent_error_votes_abort_and_the_sink_keeps_going() {
    require_broker(BROKER);
    let topic = unique("sink-abort");
    create_topic(BROKER, &topic, 1).await;
    let port = free_port();
    // Records above 2000 bytes are refused by the producer: a permanent error for that round.
    let yaml = sink_manifest(port, &topic, "        message.max.bytes: \"2000\"\n");
    let (stop, task, addr) = start_sink(&yaml, port).await;

    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "worker1")).await.unwrap();
    w.send(record(1).as_bytes()).await.unwrap();
    let big = format!(r#"{{"id":"big","pad":"{}"}}"#, "x".repeat(5000));
    w.send(big.as_bytes()).await.unwrap();
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted);

    // Same worker, next round: the sink is still serving and commits good data.
    w.reconnect().await.unwrap();
    w.send(record(2).as_bytes()).await.unwrap();
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    let got = read_all(&topic, 1);
    // At-least-once: the aborted round's good record may already be visible; the oversized one never is,
    // and the committed round's record is there.
    assert!(got.iter().all(|(k, _)| k.as_deref() != Some("big")), "{got:?}");
    assert!(got.contains(&(Some("k2".into()), record(2))), "{got:?}");
    assert!(!task.is_finished(), "the sink crashed");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_a_broker_outage_and_rounds_commit_after_it() {
    init_tracing();
    let mut broker = PrivateBroker::start().await;
    let brokers = broker.brokers.clone();
    let topic = unique("sink-outage");
    create_topic(&brokers, &topic, 1).await;
    let sink_port = free_port();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (stop, task, addr) =
        start_sink_with_admin(&sink_manifest_at(&brokers, sink_port, &topic, ""), sink_port, admin).await;
    let ready = |want: u16| wait_readyz(admin, want);
    assert!(ready(200).await, "sink not ready with the broker up");
    broker.cut().await;
    assert!(ready(503).await, "/readyz still 200 with the broker gone");
    broker.restore().await;
    assert!(ready(200).await, "/readyz did not recover after the broker came back");
    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "worker1")).await.unwrap();
    w.send(record(7).as_bytes()).await.unwrap();
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    stop.cancel();
    task.await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rounds_commit_across_a_broker_restart() {
    init_tracing();
    // A real restart of the broker process between two rounds: the producer reconnects to the restarted broker
    // and the next round commits; each record of both rounds is in the topic once.
    let mut broker = PrivateBroker::start().await;
    let brokers = broker.brokers.clone();
    let topic = unique("sink-restart");
    create_topic(&brokers, &topic, 1).await;
    let sink_port = free_port();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (stop, task, addr) =
        start_sink_with_admin(&sink_manifest_at(&brokers, sink_port, &topic, ""), sink_port, admin).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "worker1")).await.unwrap();
    for i in 0..50 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    broker.restart().await;
    assert!(wait_readyz(admin, 200).await, "/readyz did not come back after the broker restart");
    for i in 50..100 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    let got = read_all_at(&brokers, &topic, 100);
    let want: Vec<(Option<String>, String)> = (0..100).map(|i| (Some(format!("k{i}")), record(i))).collect();
    assert_eq!(got, want);
    stop.cancel();
    task.await.unwrap();
    broker.stop().await;
}

fn transactional(yaml: String) -> String {
    yaml.replace("      format: json\n", "      format: json\n      transactional: true\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactional_rounds_are_visible_once_committed_and_aborted_rounds_never() {
    require_broker(BROKER);
    let topic = unique("sink-txn");
    create_topic(BROKER, &topic, 1).await;
    let port = free_port();
    let (stop, task, addr) = start_sink(&transactional(sink_manifest(port, &topic, "")), port).await;

    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "worker1")).await.unwrap();
    for i in 0..20 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    // Round 2 votes commit, then the checkpoint aborts cluster-wide: the worker rolls back, reconnects and the
    // sink aborts the prepared transaction.
    for i in 1000..1010 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert!(w.phase1().await.unwrap(), "phase 1 voted abort");
    w.rollback_round();
    w.reconnect().await.unwrap();
    for i in 20..40 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    // read_committed: the committed rounds once each, nothing of the aborted one.
    let got = read_all(&topic, 40);
    let want: Vec<(Option<String>, String)> = (0..40).map(|i| (Some(format!("k{i}")), record(i))).collect();
    assert_eq!(got, want);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prepared_transaction_survives_a_worker_reconnect_and_commits_exactly_once() {
    require_broker(BROKER);
    let topic = unique("sink-txn-reconnect");
    create_topic(BROKER, &topic, 1).await;
    let port = free_port();
    let (stop, task, addr) = start_sink(&transactional(sink_manifest(port, &topic, "")), port).await;

    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "worker1")).await.unwrap();
    for i in 0..20 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    for i in 20..50 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert!(w.phase1().await.unwrap(), "phase 1 voted abort");
    // The checkpoint completes cluster-wide, but the worker's connection drops before Phase 2 reaches the sink.
    w.complete_without_phase2();
    // The worker reconnects: ListUncommitted must list the prepared transaction, and the worker commits it.
    w.reconnect().await.unwrap();
    assert_eq!(w.resolved.len(), 1, "ListUncommitted did not list the prepared transaction");
    assert!(w.resolved[0].1, "the worker did not commit {:?}", w.resolved);
    // The producer keeps serving the worker after the reconnect.
    for i in 50..60 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    // read_committed: every record of the three rounds, each exactly once, in order.
    let got = read_all(&topic, 60);
    let want: Vec<(Option<String>, String)> = (0..60).map(|i| (Some(format!("k{i}")), record(i))).collect();
    assert_eq!(got, want);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_producer_is_replaced_and_the_next_round_commits() {
    use rdkafka::producer::{FutureProducer, Producer};
    require_broker(BROKER);
    let topic = unique("sink-txn-fenced");
    create_topic(BROKER, &topic, 1).await;
    let port = free_port();
    let (stop, task, addr) = start_sink(&transactional(sink_manifest(port, &topic, "")), port).await;

    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "worker1")).await.unwrap();
    for i in 0..10 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    // Another producer with the worker's transactional.id (what a second sidecar instance would be) fences the
    // sink's producer: librdkafka's producer is unusable from then on (a fatal error).
    let fencer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("transactional.id", format!("wallaroo-{topic}-worker1"))
        .create()
        .unwrap();
    let _fencer = tokio::task::spawn_blocking(move || {
        fencer.init_transactions(Duration::from_secs(30)).unwrap();
        fencer
    })
    .await
    .unwrap();
    // The next round cannot be delivered by the fenced producer: it votes abort.
    for i in 1000..1010 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted);
    // After the worker's rollback the sink serves it with a new producer (which fences the fencer in turn).
    w.reconnect().await.unwrap();
    for i in 10..20 {
        w.send(record(i).as_bytes()).await.unwrap();
    }
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    let got = read_all(&topic, 20);
    let want: Vec<(Option<String>, String)> = (0..20).map(|i| (Some(format!("k{i}")), record(i))).collect();
    assert_eq!(got, want);
    assert!(!task.is_finished(), "the sink stopped");
    stop.cancel();
    task.await.unwrap();
}
