//! `source.rabbitmq` against the RabbitMQ on 127.0.0.1:5672 (guest/guest, tests/services/rabbitmq.sh) and the
//! simulated worker, with the sidecar binary as a child process so it can be killed with SIGKILL.
//!
//! Every test uses its own queue on the default vhost. The broker "going down" is simulated with a TCP proxy
//! that cuts the sidecar's connection and refuses new ones, so the shared broker is never stopped.
//! Unacknowledged deliveries are counted without the management plugin: once the consuming sidecar is gone
//! the broker requeues them, and a passive `queue.declare` reports the ready message count.
mod common;
mod rr_support;

use common::{assert_same, clean, payloads};

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rr_support::{Proxy, Sidecar, unique};
use wallaroo_connector::sim::{SourceSim, SourceSimConfig, SourceSimState};

const WAIT: Duration = Duration::from_secs(60);
const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

async fn broker() -> Connection {
    Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must run on 127.0.0.1:5672 (tests/services/rabbitmq.sh)")
}

async fn declare(queue: &str) {
    let ch = broker().await.create_channel().await.unwrap();
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
}

/// Publishes `msg-<i>` for i in `from..from+n` with publisher confirms; returns the payloads.
async fn publish(queue: &str, from: usize, n: usize) -> Vec<String> {
    let conn = broker().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut out = Vec::new();
    let mut confirms = Vec::new();
    for i in from..from + n {
        let p = format!("msg-{i:06}");
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                p.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        confirms.push(c);
        out.push(p);
    }
    for c in confirms {
        c.await.unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

/// Ready messages in the queue (passive declare: creates nothing).
async fn ready(queue: &str) -> u32 {
    let conn = broker().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    q.message_count()
}

async fn wait_ready(queue: &str, want: u32) -> bool {
    for _ in 0..300 {
        if ready(queue).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn delete(queue: &str) {
    let ch = broker().await.create_channel().await.unwrap();
    let _ = ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
}

fn manifest(worker: u16, amqp_port: u16, queue: &str, prefetch: u16) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: rabbitmq-test}}
spec:
  connectorName: rabbitmq_test
  worker: {{port: {worker}}}
  source:
    rabbitmq:
      url: amqp://guest:guest@127.0.0.1:{amqp_port}/%2f
      queue: {queue}
      declareQueue: true
      prefetch: {prefetch}
"#
    )
}

async fn sim(max_credits: u32, refill: u32) -> SourceSim {
    SourceSim::start(SourceSimConfig {
        max_credits,
        refill_credits: refill,
        checkpoint_every: Some(Duration::from_millis(50)),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn has_all(s: &SourceSimState, name: &str, want: &[String]) -> bool {
    let got: HashSet<String> = payloads(&s.processed(name)).into_iter().collect();
    want.iter().all(|w| got.contains(w))
}

/// At-least-once: every payload present, nothing foreign.
#[track_caller]
fn assert_covers(got: &[String], want: &[String]) {
    let got: HashSet<&String> = got.iter().collect();
    let want_set: HashSet<&String> = want.iter().collect();
    let missing: Vec<_> = want_set.difference(&got).take(5).collect();
    let foreign: Vec<_> = got.difference(&want_set).take(5).collect();
    assert!(missing.is_empty() && foreign.is_empty(), "missing {missing:?}, foreign {foreign:?}");
}

#[tokio::test]
async fn delivers_every_message_in_order_and_acks_after_the_worker() {
    let queue = unique("q");
    declare(&queue).await;
    let want = publish(&queue, 0, 2000).await;
    let sim = sim(500, 50).await;
    let name = format!("rabbitmq:{queue}");
    let mut sidecar = Sidecar::start(&manifest(sim.addr().port(), 5672, &queue, 1000));
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 2000).await, "{}", sidecar.log_text());
    let got = sim.processed(&name);
    assert_same(&payloads(&got), &want);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
    let last = got.last().unwrap().0;
    assert!(sim.wait_until(WAIT, |s| s.acked(&name) == Some(last)).await);
    // Give the basic.ack a moment to reach the broker, then make the broker requeue anything unacked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sidecar.kill9();
    assert!(wait_ready(&queue, 0).await, "everything the worker acknowledged was acked at the broker");
    sim.with(clean);
    delete(&queue).await;
}

#[tokio::test]
async fn acks_upstream_only_after_the_worker_acknowledged() {
    let queue = unique("q");
    declare(&queue).await;
    let want = publish(&queue, 0, 300).await;
    let sim = sim(500, 50).await;
    sim.stall_acks(true);
    let name = format!("rabbitmq:{queue}");
    let mut sidecar = Sidecar::start(&manifest(sim.addr().port(), 5672, &queue, 1000));
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 300).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ready(&queue).await, 0, "all 300 are delivered (unacked)");
    sidecar.kill9();
    assert!(wait_ready(&queue, 300).await, "nothing was acked before the worker's checkpoint: all requeued");
    // A new sidecar gets them again; once the worker acknowledges, the broker forgets them.
    sim.stall_acks(false);
    let mut sidecar = sidecar.restart();
    assert!(wait_ready(&queue, 0).await);
    assert!(sim.wait_until(WAIT, |s| has_all(s, &name, &want)).await);
    assert_covers(&payloads(&sim.processed(&name)), &want);
    // Redeliveries may still be arriving when the queue shows 0 ready: compare with the last one processed so
    // far each time, not a snapshot.
    assert!(
        sim.wait_until(WAIT, |s| s.processed(&name).last().map(|(id, _)| *id) == s.acked(&name)).await,
        "the worker never acknowledged everything processed"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    sidecar.kill9();
    assert!(wait_ready(&queue, 0).await, "acked at the broker after the worker's ACK");
    delete(&queue).await;
}

#[tokio::test]
async fn an_ack_beyond_what_was_sent_acks_nothing_at_the_broker() {
    // 100 queued, the worker takes 5 and ACKs 2^63: the other 95 were never delivered to it and must stay in the
    // queue (before the session refused such ACKs, a kill -9 then left 0 of them).
    let queue = unique("q");
    declare(&queue).await;
    publish(&queue, 0, 100).await;
    let sim = rr_support::worker_taking(5).await;
    let name = format!("rabbitmq:{queue}");
    let mut sidecar = Sidecar::start(&manifest(sim.addr().port(), 5672, &queue, 1000));
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) == 5).await, "{}", sidecar.log_text());
    assert!(sim.inject_ack(&name, 1 << 63));
    tokio::time::sleep(Duration::from_millis(500)).await;
    sidecar.kill9();
    assert!(wait_ready(&queue, 100).await, "messages never delivered to the worker were acked at the broker");
    delete(&queue).await;
}

#[tokio::test]
async fn kill9_mid_stream_loses_nothing_and_a_clean_restart_redelivers_nothing() {
    let queue = unique("q");
    declare(&queue).await;
    let mut want = publish(&queue, 0, 10_000).await;
    let sim = sim(50, 10).await;
    let name = format!("rabbitmq:{queue}");
    let mut sidecar = Sidecar::start(&manifest(sim.addr().port(), 5672, &queue, 2000));
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 1000).await);
    sidecar.kill9();
    assert!(sim.with(|s| s.processed_count(&name)) < 10_000, "the kill should land mid-stream");
    want.extend(publish(&queue, 10_000, 500).await);
    let mut sidecar = sidecar.restart();
    assert!(sim.wait_until(WAIT, |s| has_all(s, &name, &want)).await, "{}", sidecar.log_text());
    assert_covers(&payloads(&sim.processed(&name)), &want);

    // Clean restart after everything is acknowledged: nothing comes again.
    let last = sim.processed(&name).last().unwrap().0;
    assert!(sim.wait_until(WAIT, |s| s.acked(&name) == Some(last)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    sidecar.terminate().await;
    let before = sim.processed(&name).len();
    let dups = sim.stats().duplicates;
    let more = publish(&queue, 10_500, 10).await;
    let _sidecar = Sidecar::start(&manifest(sim.addr().port(), 5672, &queue, 2000));
    assert!(sim.wait_until(WAIT, |s| s.processed(&name).len() >= before + 10).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sim.processed(&name);
    assert_same(&payloads(&got[before..]), &more);
    assert!(got[before].0 > last, "points of reference continue after the worker's point");
    assert_eq!(sim.stats().duplicates, dups);
    sim.with(clean);
    delete(&queue).await;
}

#[tokio::test]
async fn worker_restart_resumes_from_the_acked_point() {
    let queue = unique("q");
    declare(&queue).await;
    let want = publish(&queue, 0, 5000).await;
    let sim = sim(100, 20).await;
    let name = format!("rabbitmq:{queue}");
    let _sidecar = Sidecar::start(&manifest(sim.addr().port(), 5672, &queue, 5000));
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 1000).await);
    sim.restart_connections();
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 5000).await);
    // A rollback undoes what the worker processed after its checkpoint; the sidecar replays exactly that.
    assert_same(&payloads(&sim.processed(&name)), &want);
    assert!(sim.stats().restarts >= 1);
    sim.with(clean);
    delete(&queue).await;
}

#[tokio::test]
async fn broker_going_away_and_coming_back_reconnects_without_crashing() {
    let queue = unique("q");
    declare(&queue).await;
    let mut want = publish(&queue, 0, 200).await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let sim = sim(500, 50).await;
    let name = format!("rabbitmq:{queue}");
    let mut sidecar = Sidecar::start(&manifest(sim.addr().port(), proxy.port, &queue, 1000));
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 200).await);
    proxy.down().await;
    want.extend(publish(&queue, 200, 200).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sidecar.alive(), "no crash while the broker is away:\n{}", sidecar.log_text());
    proxy.up();
    assert!(sim.wait_until(WAIT, |s| has_all(s, &name, &want)).await, "{}", sidecar.log_text());
    assert_covers(&payloads(&sim.processed(&name)), &want);
    assert!(sidecar.alive());
    assert!(sidecar.log_text().matches("rabbitmq consuming").count() >= 2, "reconnected to the broker");
    let last = sim.processed(&name).last().unwrap().0;
    assert!(sim.wait_until(WAIT, |s| s.acked(&name) == Some(last)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    sidecar.kill9();
    assert!(wait_ready(&queue, 0).await);
    sim.with(clean);
    delete(&queue).await;
}
