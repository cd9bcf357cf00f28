//! `source.redis` (modes stream and pubsub) against the Redis on 127.0.0.1:6379 (tests/services/redis.sh)
//! and the simulated worker, with the sidecar binary as a child process so it can be killed with SIGKILL.
mod common;
mod rr_support;

use common::{assert_same, clean, payloads};

use std::time::Duration;

use bytes::Bytes;
use redis::AsyncCommands;
use rr_support::{Proxy, Sidecar, redis, unique};
use wallaroo_connector::sim::{SourceSim, SourceSimConfig};

const WAIT: Duration = Duration::from_secs(60);

async fn sim() -> SourceSim {
    SourceSim::start(SourceSimConfig { checkpoint_every: Some(Duration::from_millis(50)), ..Default::default() })
        .await
        .unwrap()
}

fn stream_manifest(worker: u16, redis_port: u16, key: &str, group: &str, consumer: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: redis-stream-test}}
spec:
  connectorName: redis_stream_test
  worker: {{port: {worker}}}
  source:
    redis:
      url: redis://127.0.0.1:{redis_port}
      mode: stream
      stream: {key}
      group: {group}
      consumer: {consumer}
{extra}
"#
    )
}

fn pubsub_manifest(worker: u16, channels: &[&str]) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: redis-pubsub-test}}
spec:
  connectorName: redis_pubsub_test
  worker: {{port: {worker}}}
  source:
    redis:
      url: redis://127.0.0.1:6379
      mode: pubsub
      channels: {channels:?}
"#
    )
}

/// Appends `n` entries `entry-<i>` (i from `from`) with one field `data`; returns the payloads.
async fn xadd(key: &str, from: usize, n: usize) -> Vec<String> {
    let mut c = redis().await;
    let mut out = Vec::new();
    let mut pipe = redis::pipe();
    for i in from..from + n {
        let p = format!("entry-{i:06}");
        pipe.cmd("XADD").arg(key).arg("*").arg("data").arg(&p).ignore();
        out.push(p);
    }
    pipe.query_async::<()>(&mut c).await.unwrap();
    out
}

/// Entries of the group not yet acknowledged (XPENDING summary count).
async fn pending(key: &str, group: &str) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING").arg(key).arg(group).query_async(&mut redis().await).await.unwrap();
    match v {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("XPENDING count {other:?}"),
        },
        other => panic!("XPENDING reply {other:?}"),
    }
}

async fn wait_pending(key: &str, group: &str, want: i64) -> bool {
    for _ in 0..600 {
        if pending(key, group).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// After a connection loss the worker resumes from its last checkpoint, so messages processed after it come
/// again (the protocol's at-least-once). Checks: nothing foreign, nothing missing, first occurrences in
/// order, and a redelivered entry carries the same point of reference as the first time.
#[track_caller]
fn assert_at_least_once(got: &[(u64, Bytes)], want: &[String]) {
    let mut seen = std::collections::HashMap::new();
    let mut first = Vec::new();
    for (por, p) in got {
        let p = String::from_utf8_lossy(p).into_owned();
        match seen.get(&p) {
            Some(prev) => assert_eq!(prev, por, "{p} redelivered with another point of reference"),
            None => {
                seen.insert(p.clone(), *por);
                first.push(p);
            }
        }
    }
    assert_same(&first, want);
}

async fn cleanup(key: &str) {
    let _: () = redis().await.del(key).await.unwrap();
}

#[tokio::test]
async fn stream_delivers_every_entry_in_order_and_acks_after_the_worker() {
    let (key, group) = (unique("stream"), unique("group"));
    let want = xadd(&key, 0, 1500).await;
    let sim = sim().await;
    let _sidecar = Sidecar::start(&stream_manifest(sim.addr().port(), 6379, &key, &group, "c1", ""));
    let name = format!("redis:{key}");
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 1500).await, "{:?}", sim.stats());
    let got = sim.processed(&name);
    assert_same(&payloads(&got), &want);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "points of reference strictly increase");
    let last = got.last().unwrap().0;
    assert!(sim.wait_until(WAIT, |s| s.acked(&name) == Some(last)).await);
    assert!(wait_pending(&key, &group, 0).await, "every entry XACKed once the worker acknowledged it");
    // The point of reference decodes to the entry id.
    let ids: redis::streams::StreamRangeReply = redis().await.xrange_count(&key, "-", "+", 1).await.unwrap();
    let id = wallaroo_connector::sources::redis::por::EntryId::parse(&ids.ids[0].id).unwrap();
    assert_eq!(got[0].0, id.to_por().unwrap());
    sim.with(clean);
    cleanup(&key).await;
}

#[tokio::test]
async fn stream_acks_upstream_only_after_the_worker_acknowledged() {
    let (key, group) = (unique("stream"), unique("group"));
    let want = xadd(&key, 0, 300).await;
    let sim = sim().await;
    sim.stall_acks(true);
    let _sidecar = Sidecar::start(&stream_manifest(sim.addr().port(), 6379, &key, &group, "c1", ""));
    let name = format!("redis:{key}");
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 300).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pending(&key, &group).await, 300, "nothing is XACKed before the worker's checkpoint");
    sim.stall_acks(false);
    assert!(wait_pending(&key, &group, 0).await);
    assert_same(&payloads(&sim.processed(&name)), &want);
    cleanup(&key).await;
}

#[tokio::test]
async fn stream_kill9_redelivers_and_a_clean_restart_does_not() {
    let (key, group) = (unique("stream"), unique("group"));
    let mut want = xadd(&key, 0, 20_000).await;
    // Small credit window so the kill lands mid-stream.
    let sim = SourceSim::start(SourceSimConfig {
        max_credits: 50,
        refill_credits: 10,
        checkpoint_every: Some(Duration::from_millis(50)),
        ..Default::default()
    })
    .await
    .unwrap();
    let name = format!("redis:{key}");
    let manifest = stream_manifest(sim.addr().port(), 6379, &key, &group, "c1", "");
    let mut sidecar = Sidecar::start(&manifest);
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 2000).await);
    sidecar.kill9();
    let at_kill = sim.processed(&name).len();
    assert!(at_kill < 20_000, "the kill should land mid-stream");
    assert!(pending(&key, &group).await > 0, "entries read but not acknowledged stay pending");
    want.extend(xadd(&key, 20_000, 500).await);
    let mut sidecar = sidecar.restart();
    assert!(
        sim.wait_until(WAIT, |s| s.processed(&name).iter().any(|(_, p)| p.as_ref() == b"entry-020499")).await,
        "{}",
        sidecar.log_text()
    );
    assert_at_least_once(&sim.processed(&name), &want);
    assert!(wait_pending(&key, &group, 0).await);

    // Clean restart: nothing the worker acknowledged comes again.
    let last = sim.processed(&name).last().unwrap().0;
    assert!(sim.wait_until(WAIT, |s| s.acked(&name) == Some(last)).await);
    sidecar.terminate().await;
    let dups_before = sim.stats().duplicates;
    want.extend(xadd(&key, 20_500, 10).await);
    let before = sim.processed(&name).len();
    let _sidecar = Sidecar::start(&manifest);
    assert!(sim.wait_until(WAIT, |s| s.processed(&name).len() >= before + 10).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_same(&payloads(&sim.processed(&name)[before..]), &want[20_500..]);
    assert_eq!(sim.stats().duplicates, dups_before, "no acknowledged entry was sent again");
    sim.with(clean);
    cleanup(&key).await;
}

#[tokio::test]
async fn stream_an_ack_beyond_what_was_sent_commits_nothing() {
    // A worker that takes 5 entries and then acknowledges 2^63 must not make the source XACK the other 95: they
    // were never delivered, and after a crash they would be gone.
    let (key, group) = (unique("stream"), unique("group"));
    let want = xadd(&key, 0, 100).await;
    let sim = rr_support::worker_taking(5).await;
    let name = format!("redis:{key}");
    let manifest = stream_manifest(sim.addr().port(), 6379, &key, &group, "c1", "");
    let mut sidecar = Sidecar::start(&manifest);
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) == 5).await, "{}", sidecar.log_text());
    assert!(sim.inject_ack(&name, 1 << 63));
    tokio::time::sleep(Duration::from_millis(500)).await;
    sidecar.kill9();
    // Every entry is still owed: the restarted source delivers all 100.
    sim.stall_credits(false);
    let sidecar = sidecar.restart();
    assert!(
        sim.wait_until(WAIT, |s| s.processed(&name).iter().any(|(_, p)| p.as_ref() == b"entry-000099")).await,
        "{}",
        sidecar.log_text()
    );
    assert_at_least_once(&sim.processed(&name), &want);
    cleanup(&key).await;
}

#[tokio::test]
async fn stream_worker_restart_resumes_from_the_acked_point() {
    let (key, group) = (unique("stream"), unique("group"));
    let want = xadd(&key, 0, 5000).await;
    let sim = SourceSim::start(SourceSimConfig {
        max_credits: 100,
        refill_credits: 20,
        checkpoint_every: Some(Duration::from_millis(30)),
        ..Default::default()
    })
    .await
    .unwrap();
    let name = format!("redis:{key}");
    let _sidecar = Sidecar::start(&stream_manifest(sim.addr().port(), 6379, &key, &group, "c1", ""));
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 1000).await);
    sim.restart_connections();
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 2500).await);
    sim.drop_connections();
    assert!(sim.wait_until(WAIT, |s| s.processed(&name).iter().any(|(_, p)| p.as_ref() == b"entry-004999")).await);
    assert_at_least_once(&sim.processed(&name), &want);
    assert!(sim.stats().restarts >= 1);
    assert!(wait_pending(&key, &group, 0).await);
    sim.with(clean);
    cleanup(&key).await;
}

#[tokio::test]
async fn stream_survives_redis_going_away_and_coming_back() {
    let (key, group) = (unique("stream"), unique("group"));
    let mut want = xadd(&key, 0, 200).await;
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let sim = sim().await;
    let name = format!("redis:{key}");
    let mut sidecar = Sidecar::start(&stream_manifest(sim.addr().port(), proxy.port, &key, &group, "c1", ""));
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 200).await);
    proxy.down().await;
    want.extend(xadd(&key, 200, 200).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sidecar.alive(), "no crash while Redis is away:\n{}", sidecar.log_text());
    assert_eq!(sim.with(|s| s.processed_count(&name)), 200);
    proxy.up();
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 400).await, "{}", sidecar.log_text());
    assert_same(&payloads(&sim.processed(&name)), &want);
    assert!(wait_pending(&key, &group, 0).await);
    assert!(sidecar.alive());
    assert!(sidecar.log_text().matches("redis connected").count() >= 2, "reconnected to Redis");
    cleanup(&key).await;
}

#[tokio::test]
async fn stream_claims_entries_left_pending_by_a_dead_consumer() {
    let (key, group) = (unique("stream"), unique("group"));
    let want = xadd(&key, 0, 100).await;
    let mut c = redis().await;
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg(&key).arg(&group).arg("0").query_async(&mut c).await.unwrap();
    // Another consumer reads the first 40 entries and dies without acknowledging them.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg("dead")
        .arg("COUNT")
        .arg(40)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pending(&key, &group).await, 40);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let sim = sim().await;
    let name = format!("redis:{key}");
    let _sidecar =
        Sidecar::start(&stream_manifest(sim.addr().port(), 6379, &key, &group, "c1", "      claimMinIdleMs: 100"));
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 100).await);
    assert_same(&payloads(&sim.processed(&name)), &want);
    assert!(wait_pending(&key, &group, 0).await);
    cleanup(&key).await;
}

/// Waits until the sidecar is subscribed (PUBSUB NUMSUB / NUMPAT), as pub/sub drops earlier messages.
async fn wait_subscribed(channel: &str, patterns: i64) {
    let mut c = redis().await;
    for _ in 0..600 {
        let (_, n): (String, i64) = redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut c).await.unwrap();
        let p: i64 = redis::cmd("PUBSUB").arg("NUMPAT").query_async(&mut c).await.unwrap();
        if n >= 1 && p >= patterns {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the sidecar never subscribed to {channel}");
}

#[tokio::test]
async fn pubsub_channels_and_patterns_arrive_in_order() {
    let base = unique("ch");
    let channel = format!("{base}.plain");
    let pattern = format!("{base}.p.*");
    let sim = sim().await;
    let mut sidecar = Sidecar::start(&pubsub_manifest(sim.addr().port(), &[&channel, &pattern]));
    wait_subscribed(&channel, 1).await;
    let mut c = redis().await;
    let mut plain = Vec::new();
    let mut matched = Vec::new();
    for i in 0..500 {
        let p = format!("plain-{i:04}");
        let _: i64 = c.publish(&channel, &p).await.unwrap();
        plain.push(p);
        let m = format!("pat-{i:04}");
        let _: i64 = c.publish(format!("{base}.p.{}", i % 3), &m).await.unwrap();
        matched.push(m);
    }
    let (sp, sm) = (format!("redis:{channel}"), format!("redis:{pattern}"));
    assert!(
        sim.wait_until(WAIT, |s| s.processed_count(&sp) >= 500 && s.processed_count(&sm) >= 500).await,
        "{}",
        sidecar.log_text()
    );
    assert_same(&payloads(&sim.processed(&sp)), &plain);
    assert_same(&payloads(&sim.processed(&sm)), &matched);
    assert!(sidecar.alive());
    sim.with(clean);
}

#[tokio::test]
async fn pubsub_worker_restart_replays_unacknowledged_messages() {
    let channel = unique("ch");
    let sim = sim().await;
    let _sidecar = Sidecar::start(&pubsub_manifest(sim.addr().port(), &[&channel]));
    wait_subscribed(&channel, 0).await;
    let mut c = redis().await;
    let name = format!("redis:{channel}");
    let mut want = Vec::new();
    for i in 0..300 {
        let p = format!("m-{i:04}");
        let _: i64 = c.publish(&channel, &p).await.unwrap();
        want.push(p);
    }
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 300).await);
    // Stop checkpoints, take more, then roll the worker back: the rolled-back messages must come again.
    sim.stall_acks(true);
    for i in 300..600 {
        let p = format!("m-{i:04}");
        let _: i64 = c.publish(&channel, &p).await.unwrap();
        want.push(p);
    }
    assert!(sim.wait_until(WAIT, |s| s.processed_count(&name) >= 600).await);
    sim.restart_connections();
    sim.stall_acks(false);
    assert!(sim.wait_until(WAIT, |s| s.stats().restarts >= 1 && s.processed_count(&name) >= 600).await);
    assert_same(&payloads(&sim.processed(&name)), &want);
    sim.with(clean);
}

#[tokio::test]
async fn stream_entry_id_outside_the_encoding_stops_with_a_clear_error() {
    let (key, group) = (unique("stream"), unique("group"));
    let mut c = redis().await;
    // seq 2^20 does not fit `ms << 20 | seq`.
    let _: String =
        redis::cmd("XADD").arg(&key).arg("5-1048576").arg("data").arg("x").query_async(&mut c).await.unwrap();
    let sim = sim().await;
    let sidecar = Sidecar::start(&stream_manifest(sim.addr().port(), 6379, &key, &group, "c1", ""));
    // The source stops instead of inventing a point of reference (the runtime then ends the session).
    let mut logged = false;
    for _ in 0..300 {
        if sidecar.log_text().contains("5-1048576: seq does not fit") {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logged, "{}", sidecar.log_text());
    assert_eq!(sim.with(|s| s.processed_total()), 0);
    cleanup(&key).await;
}
