//! `sink.redisHash` end to end: the sidecar binary (so it can be killed with SIGKILL between Phase 1 and
//! Phase 2) driven by simulated workers over the real protocol, against the Redis on 127.0.0.1:6379.
mod rr_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use redis::AsyncCommands;
use rr_support::{Sidecar, redis, unique};
use wallaroo_connector::sim::{RoundOutcome, SinkSim, SinkSimConfig};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn manifest(port: u16, key: &str) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: redis-hash-test}}
spec:
  connectorName: redis_hash_test
  worker: {{host: 127.0.0.1, port: {port}}}
  sink:
    redisHash:
      url: redis://127.0.0.1:6379
      key: {key}
"#
    )
}

fn lp(k: &str, v: &str) -> Vec<u8> {
    let mut b = (k.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(k.as_bytes());
    b.extend_from_slice(v.as_bytes());
    b
}

/// Connects a simulated worker, waiting for the sidecar to listen.
async fn worker(port: u16, name: &str) -> SinkSim {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..300 {
        if let Ok(w) = SinkSim::connect(SinkSimConfig::new(addr, name)).await {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the sink sidecar never accepted a worker on {addr}");
}

async fn reconnect(w: &mut SinkSim) {
    for _ in 0..300 {
        if w.reconnect().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("reconnect failed");
}

async fn hash(key: &str) -> HashMap<String, String> {
    redis().await.hgetall(key).await.unwrap()
}

async fn send(w: &mut SinkSim, pairs: &[(&str, &str)]) {
    for (k, v) in pairs {
        w.send(&lp(k, v)).await.unwrap();
    }
}

async fn drop_keys(key: &str, workers: &[&str]) {
    let mut c = redis().await;
    let _: () = c.del(key).await.unwrap();
    for w in workers {
        let _: () = c
            .del(&[
                format!("wallaroo:offset:{key}:{w}"),
                format!("wallaroo:stage:{key}:{w}"),
                format!("wallaroo:txn:{key}:{w}"),
            ])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn committed_rounds_land_once_and_aborted_rounds_never() {
    let key = unique("hash");
    let port = free_port();
    let _sidecar = Sidecar::start(&manifest(port, &key));
    let mut w = worker(port, "w1").await;

    send(&mut w, &[("a", "1"), ("b", "1")]).await;
    assert!(w.phase1().await.unwrap());
    assert!(hash(&key).await.is_empty(), "nothing visible between Phase 1 and Phase 2");
    w.phase2_commit().await.unwrap();
    send(&mut w, &[("a", "2")]).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    // A round that voted commit but is aborted cluster-wide: the worker rolls back and reconnects.
    send(&mut w, &[("a", "aborted"), ("c", "aborted")]).await;
    assert!(w.phase1().await.unwrap());
    w.rollback_round();
    reconnect(&mut w).await;
    assert_eq!(w.resolved.last().map(|(_, commit)| *commit), Some(false));
    send(&mut w, &[("d", "4")]).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    // Phase 2 is asynchronous: wait for it to land.
    let mut h = HashMap::new();
    for _ in 0..100 {
        h = hash(&key).await;
        if h.contains_key("d") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let want: HashMap<String, String> =
        [("a", "2"), ("b", "1"), ("d", "4")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(h, want);
    let offset: u64 = redis().await.get(format!("wallaroo:offset:{key}:w1")).await.unwrap();
    assert_eq!(offset, w.committed_offset());
    drop_keys(&key, &["w1"]).await;
}

#[tokio::test]
async fn kill9_between_phase1_and_phase2_resolves_on_restart() {
    let key = unique("hash");
    let port = free_port();
    let mut sidecar = Sidecar::start(&manifest(port, &key));
    let mut w = worker(port, "w1").await;

    // Round 1 voted commit, the sidecar dies before Phase 2, the checkpoint completed cluster-wide.
    send(&mut w, &[("a", "1"), ("b", "1")]).await;
    assert!(w.phase1().await.unwrap());
    sidecar.kill9();
    w.complete_without_phase2();
    let mut sidecar = sidecar.restart();
    reconnect(&mut w).await;
    assert_eq!(w.resolved.last().map(|(_, commit)| *commit), Some(true), "committed through ListUncommitted");
    assert_eq!(w.offset(), w.committed_offset());

    // Round 2 overwrites a; a replay of round 1 would show as a == 1.
    send(&mut w, &[("a", "2")]).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    // Round 3 voted commit, the sidecar dies, and this time the checkpoint is aborted cluster-wide.
    send(&mut w, &[("c", "never")]).await;
    assert!(w.phase1().await.unwrap());
    sidecar.kill9();
    w.rollback_round();
    let _sidecar = sidecar.restart();
    reconnect(&mut w).await;
    assert_eq!(w.resolved.last().map(|(_, commit)| *commit), Some(false));
    // One more committed round so Phase 2 of round 2 has certainly been applied before reading.
    send(&mut w, &[("e", "5")]).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    let mut h = HashMap::new();
    for _ in 0..100 {
        h = hash(&key).await;
        if h.contains_key("e") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.get("a").map(String::as_str), Some("2"));
    assert_eq!(h.get("b").map(String::as_str), Some("1"));
    assert_eq!(h.get("c"), None);
    let mut c = redis().await;
    let leftovers: bool =
        c.exists(&[format!("wallaroo:stage:{key}:w1"), format!("wallaroo:txn:{key}:w1")]).await.unwrap();
    assert!(!leftovers);
    drop_keys(&key, &["w1"]).await;
}

#[tokio::test]
async fn two_workers_at_once() {
    let key = unique("hash");
    let port = free_port();
    let _sidecar = Sidecar::start(&manifest(port, &key));
    let mut tasks = Vec::new();
    for name in ["wa", "wb"] {
        tasks.push(tokio::spawn(async move {
            let mut w = worker(port, name).await;
            for round in 0..30 {
                let k = format!("{name}-{round}");
                w.send(&lp(&k, "v")).await.unwrap();
                if round % 5 == 4 {
                    assert!(w.phase1().await.unwrap());
                    w.rollback_round();
                    reconnect(&mut w).await;
                } else {
                    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
                }
            }
            w.send(&lp(&format!("{name}-final"), "v")).await.unwrap();
            assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
            w
        }));
    }
    let mut workers = Vec::new();
    for t in tasks {
        workers.push(t.await.unwrap());
    }
    let mut h = HashMap::new();
    for _ in 0..100 {
        h = hash(&key).await;
        if h.contains_key("wa-final") && h.contains_key("wb-final") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in ["wa", "wb"] {
        for round in 0..30 {
            assert_eq!(h.contains_key(&format!("{name}-{round}")), round % 5 != 4, "{name} round {round}");
        }
    }
    drop_keys(&key, &["wa", "wb"]).await;
}

#[tokio::test]
async fn wrong_type_at_key_votes_abort() {
    let key = unique("string");
    let _: () = redis().await.set(&key, "a string").await.unwrap();
    let port = free_port();
    let mut sidecar = Sidecar::start(&manifest(port, &key));
    let mut w = worker(port, "w1").await;
    send(&mut w, &[("a", "1")]).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted);
    assert!(sidecar.alive(), "a permanent error is a vote, not a crash");
    let v: String = redis().await.get(&key).await.unwrap();
    assert_eq!(v, "a string");
    drop_keys(&key, &["w1"]).await;
}
