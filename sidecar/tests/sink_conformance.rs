//! The sink session and the exactly-once file sink against the simulated worker: committed rounds exactly once,
//! aborted rounds never, pending transactions resolved after reconnects, several workers at once.
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use wallaroo_connector::sim::{RoundOutcome, SinkSim, SinkSimConfig};
use wallaroo_connector::sinks::file::committed_output;

fn manifest(port: u16, dir: &Path) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: file-sink}}
spec:
  connectorName: out
  worker: {{port: {port}}}
  metricsPort: 9
  sink:
    file: {{dir: "{}"}}
"#,
        dir.display()
    )
}

async fn start(dir: &Path) -> (Running, std::net::SocketAddr) {
    let port = free_port();
    let running = spawn(connector(&manifest(port, dir)));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return (running, addr);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("sink did not start listening");
}

fn rec(i: usize) -> Vec<u8> {
    format!("line {i}\n").into_bytes()
}

async fn send_range(w: &mut SinkSim, r: std::ops::Range<usize>) {
    for i in r {
        w.send(&rec(i)).await.unwrap();
    }
}

/// Phase 2 has no reply; an (empty) Phase 1 round trip proves the sink processed it.
async fn settle(w: &mut SinkSim) {
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
}

fn expected(r: std::ops::Range<usize>) -> Vec<u8> {
    r.flat_map(rec).collect()
}

#[tokio::test]
async fn committed_rounds_appear_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    for round in 0..5 {
        send_range(&mut w, round * 100..(round + 1) * 100).await;
        assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    }
    // An empty round is normal and commits.
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    settle(&mut w).await;
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), expected(0..500));
}

#[tokio::test]
async fn a_gap_votes_abort_and_the_replay_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    send_range(&mut w, 0..10).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    send_range(&mut w, 10..20).await;
    w.lose(7); // output dropped while "disconnected" but counted in the offset
    send_range(&mut w, 20..30).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted);
    w.reconnect().await.unwrap();
    assert!(w.resolved.is_empty(), "an abort vote leaves nothing pending");
    send_range(&mut w, 10..30).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    settle(&mut w).await;
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), expected(0..30));
}

#[tokio::test]
async fn pending_round_commits_on_reconnect_when_the_checkpoint_completed() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    send_range(&mut w, 0..50).await;
    assert!(w.phase1().await.unwrap());
    w.complete_without_phase2();
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), b"", "not published before Phase 2");
    w.reconnect().await.unwrap();
    assert_eq!(w.resolved.len(), 1);
    assert!(w.resolved[0].1, "resolved as commit");
    send_range(&mut w, 50..60).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    settle(&mut w).await;
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), expected(0..60));
}

#[tokio::test]
async fn pending_round_aborts_on_reconnect_when_the_checkpoint_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    send_range(&mut w, 0..20).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    send_range(&mut w, 20..40).await;
    assert!(w.phase1().await.unwrap());
    w.rollback_round(); // another participant voted abort
    w.reconnect().await.unwrap();
    assert_eq!(w.resolved.len(), 1);
    assert!(!w.resolved[0].1, "resolved as abort");
    // The worker replays from its checkpoint; the replayed data commits once.
    send_range(&mut w, 20..40).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    settle(&mut w).await;
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), expected(0..40));
}

#[tokio::test]
async fn the_sink_restarting_between_phases_resolves_from_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, addr) = start(dir.path()).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    send_range(&mut w, 0..30).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    send_range(&mut w, 30..60).await;
    assert!(w.phase1().await.unwrap());
    // The sink process goes away between Phase 1 and Phase 2 (in-process: abort the task hard).
    sink.task.abort();
    let _ = sink.task.await;
    w.complete_without_phase2();
    let port = addr.port();
    let again = spawn(connector(&manifest(port, dir.path())));
    let mut ok = false;
    for _ in 0..200 {
        if w.reconnect().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "reconnected");
    assert_eq!(w.resolved.last().map(|r| r.1), Some(true));
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    settle(&mut w).await;
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), expected(0..60));
    again.stop.cancel();
}

#[tokio::test]
async fn several_workers_at_once_keep_separate_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut tasks = Vec::new();
    for name in ["initializer", "worker1", "worker2"] {
        tasks.push(tokio::spawn(async move {
            let mut w = SinkSim::connect(SinkSimConfig::new(addr, name)).await.unwrap();
            for round in 0..10 {
                send_range(&mut w, round * 50..(round + 1) * 50).await;
                assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
            }
            settle(&mut w).await;
            w
        }));
    }
    let mut sims = Vec::new();
    for t in tasks {
        sims.push(t.await.unwrap());
    }
    // After a shrink, a remaining worker tells the sink who left. The leaving worker is gone first: a WorkersLeft
    // naming a worker that is still connected is ignored for it (its voted round must survive).
    drop(sims.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut w = sims.swap_remove(1);
    w.workers_left(&["worker2"]).await.unwrap();
    settle(&mut w).await;
    for name in ["initializer", "worker1"] {
        assert_eq!(committed_output(dir.path(), name).unwrap(), expected(0..500), "{name}");
    }
    // worker2 left the cluster: its files were archived.
    assert!(!dir.path().join("worker2.out").exists());
}

#[tokio::test]
async fn workers_left_naming_a_connected_worker_keeps_its_voted_round() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut w1 = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    let mut w2 = SinkSim::connect(SinkSimConfig::new(addr, "w2")).await.unwrap();
    send_range(&mut w1, 0..40).await;
    assert!(w1.phase1().await.unwrap(), "w1 votes commit");
    w2.workers_left(&["w1"]).await.unwrap();
    settle(&mut w2).await;
    w1.phase2_commit().await.unwrap();
    settle(&mut w1).await;
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), expected(0..40), "w1's round was wiped");
}

#[tokio::test]
async fn duplicates_and_unknown_phase2_are_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    send_range(&mut w, 0..10).await;
    w.resend_tail(&rec(9)).await.unwrap();
    w.phase2_unknown(true).await.unwrap();
    w.phase2_unknown(false).await.unwrap();
    // A reply to any of those would be a stray frame, caught by the next Phase 1.
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    settle(&mut w).await;
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), expected(0..10));
}

#[tokio::test]
async fn a_dropped_connection_reconnects_at_the_current_offset_then_the_worker_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut w = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    send_range(&mut w, 0..10).await;
    settle(&mut w).await;
    send_range(&mut w, 10..20).await;
    w.flush().await.unwrap();
    w.disconnect();
    // The worker comes back at its current offset and keeps sending after what it already sent...
    w.reconnect().await.unwrap();
    send_range(&mut w, 20..30).await;
    // ...then aborts the checkpoint, rolls back to the last commit and reconnects.
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted);
    w.reconnect().await.unwrap();
    send_range(&mut w, 10..30).await;
    settle(&mut w).await;
    settle(&mut w).await;
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), expected(0..30));
}

#[tokio::test]
async fn a_takeover_by_a_new_connection_for_the_same_worker_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut old = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    send_range(&mut old, 0..10).await;
    settle(&mut old).await;
    // The worker's new connection (e.g. after a half-open old one) displaces the old one.
    let _new = SinkSim::connect(SinkSimConfig::new(addr, "w1")).await.unwrap();
    assert!(old.checkpoint().await.is_err(), "the displaced connection still answered");
    assert_eq!(committed_output(dir.path(), "w1").unwrap(), expected(0..10));
}

#[tokio::test]
async fn wrong_cookie_is_refused_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = start(dir.path()).await;
    let mut cfg = SinkSimConfig::new(addr, "w1");
    cfg.cookie = "nope".into();
    let err = SinkSim::connect(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("Bad cookie"), "{err}");
}
