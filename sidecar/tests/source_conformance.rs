//! The file source against the simulated worker under every fault the simulator injects: no message lost,
//! duplicates only after a replay the protocol allows, no credit overrun, no second HELLO.
mod common;

use std::time::Duration;

use common::*;
use wallaroo_connector::sim::{SourceSim, SourceSimConfig};

fn manifest(port: u16, path: &str, stream: &str) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: file-test}}
spec:
  connectorName: file_test
  worker: {{port: {port}}}
  source:
    file: {{path: "{path}", streamName: "{stream}"}}
"#
    )
}

async fn sim(max: u32, refill: u32, every_ms: Option<u64>) -> SourceSim {
    SourceSim::start(SourceSimConfig {
        max_credits: max,
        refill_credits: refill,
        checkpoint_every: every_ms.map(Duration::from_millis),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn delivers_every_record_in_order_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    let lines = write_lines(&path, 20_000);
    let sim = sim(500, 50, Some(20)).await;
    let running = spawn(connector(&manifest(sim.addr().port(), path.to_str().unwrap(), "s")));
    // The connector exits by itself once the worker confirmed the EOS.
    let res = tokio::time::timeout(Duration::from_secs(60), running.task).await.expect("connector finishes");
    res.unwrap().unwrap();
    assert_eq!(payloads(&sim.processed("s")), lines);
    sim.with(|s| {
        clean(s);
        assert!(s.finished("s"));
        assert_eq!(s.stats().duplicates, 0);
    });
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(sim.acked("s"), Some(len), "acked point = offset after the last record");
}

#[tokio::test]
async fn tiny_credit_windows_are_never_overrun() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    let lines = write_lines(&path, 2_000);
    // refill 0 means the worker refills only when the balance hits zero: the tightest possible window.
    for (max, refill) in [(1, 0), (2, 1), (3, 0), (10, 8)] {
        let sim = sim(max, refill, Some(5)).await;
        let running = spawn(connector(&manifest(sim.addr().port(), path.to_str().unwrap(), "s")));
        tokio::time::timeout(Duration::from_secs(60), running.task).await.expect("finishes").unwrap().unwrap();
        assert_eq!(payloads(&sim.processed("s")), lines, "credits {max}/{refill}");
        sim.with(clean);
    }
}

#[tokio::test]
async fn restart_rolls_back_and_replays_exactly_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    let lines = write_lines(&path, 50_000);
    let sim = sim(200, 20, Some(10)).await;
    let running = spawn(connector(&manifest(sim.addr().port(), path.to_str().unwrap(), "s")));
    for k in 1..=5u64 {
        assert!(sim.wait_until(Duration::from_secs(30), |s| s.processed_total() >= k * 5_000).await);
        sim.restart_connections();
    }
    tokio::time::timeout(Duration::from_secs(60), running.task).await.expect("finishes").unwrap().unwrap();
    // A rollback undoes effects since the checkpoint, so the processed log is exactly the input.
    assert_eq!(payloads(&sim.processed("s")), lines);
    sim.with(|s| {
        clean(s);
        assert_eq!(s.stats().restarts, 5);
        assert!(s.stats().connections >= 6);
    });
}

#[tokio::test]
async fn dropped_connections_lose_nothing_and_replay_only_after_the_ack() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    let lines = write_lines(&path, 50_000);
    let sim = sim(300, 30, Some(10)).await;
    let running = spawn(connector(&manifest(sim.addr().port(), path.to_str().unwrap(), "s")));
    let mut acked_at_drop = Vec::new();
    for k in 1..=4u64 {
        assert!(sim.wait_until(Duration::from_secs(30), |s| s.processed_total() >= k * 8_000).await);
        acked_at_drop.push(sim.acked("s").unwrap_or(0));
        sim.drop_connections();
    }
    tokio::time::timeout(Duration::from_secs(60), running.task).await.expect("finishes").unwrap().unwrap();
    let got = sim.processed("s");
    // Without a rollback, records after the last checkpoint are processed again: at-least-once.
    let mut dedup = got.clone();
    dedup.dedup_by_key(|(id, _)| *id);
    let mut sorted = dedup.clone();
    sorted.sort_by_key(|(id, _)| *id);
    sorted.dedup_by_key(|(id, _)| *id);
    assert_eq!(payloads(&sorted), lines, "every record at least once");
    // Every duplicate lies after a point the worker had acknowledged when the connection dropped.
    let mut seen = std::collections::HashSet::new();
    for (id, _) in &got {
        if !seen.insert(*id) {
            assert!(acked_at_drop.iter().any(|a| id > a), "duplicate {id} was already acknowledged");
        }
    }
    sim.with(clean);
}

#[tokio::test]
async fn stalled_acks_pause_nothing_but_commits_and_never_overrun() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    let lines = write_lines(&path, 5_000);
    let sim = sim(10, 5, Some(10)).await;
    sim.stall_acks(true);
    let running = spawn(connector(&manifest(sim.addr().port(), path.to_str().unwrap(), "s")));
    // Refill ACKs keep data flowing while checkpoints are stalled...
    assert!(sim.wait_until(Duration::from_secs(30), |s| s.processed_total() == 5_000).await);
    assert_eq!(sim.acked("s"), None, "nothing is durable without a checkpoint");
    // ...and the connector cannot finish until the EOS is acknowledged at a checkpoint.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running.task.is_finished());
    sim.stall_acks(false);
    tokio::time::timeout(Duration::from_secs(30), running.task).await.expect("finishes").unwrap().unwrap();
    assert_eq!(payloads(&sim.processed("s")), lines);
    sim.with(clean);
}

#[tokio::test]
async fn a_refused_stream_is_retried_and_taken_over_when_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    let lines = write_lines(&path, 3_000);
    let sim = sim(50, 10, Some(20)).await;
    let a = spawn(connector(&manifest(sim.addr().port(), path.to_str().unwrap(), "shared")));
    assert!(sim.wait_until(Duration::from_secs(30), |s| s.processed_total() > 0).await);
    // The same stream from a second connector is refused while the first owns it, retried on every ACK,
    // and granted at the final point once the first one's EOS released it: it then ends at once.
    let b = spawn(connector(&manifest(sim.addr().port(), path.to_str().unwrap(), "shared")));
    tokio::time::timeout(Duration::from_secs(60), a.task).await.expect("a finishes").unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(60), b.task).await.expect("b finishes").unwrap().unwrap();
    assert_eq!(payloads(&sim.processed("shared")), lines, "the second connector replays nothing");
    sim.with(clean);
}

#[tokio::test]
async fn graceful_stop_waits_for_the_ack_of_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.txt");
    write_lines(&path, 1_000_000);
    let sim = sim(1000, 100, Some(50)).await;
    let running = spawn(connector(&manifest(sim.addr().port(), path.to_str().unwrap(), "s")));
    assert!(sim.wait_until(Duration::from_secs(30), |s| s.processed_total() > 10_000).await);
    running.stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), running.task).await.expect("stops").unwrap().unwrap();
    // Everything sent before the stop was acknowledged before the connector exited.
    let (processed, acked) = sim.with(|s| {
        let p = s.processed("s");
        (p.last().map(|(id, _)| *id), s.acked("s"))
    });
    assert_eq!(acked, processed);
    sim.with(clean);
}
