//! The AWS integrations end to end: the `wallaroo-connector` binary (killed with SIGKILL where the test says
//! so) between the simulated worker and moto (`tests/services/moto.sh`).
mod aws_common;
mod common;

use std::collections::HashMap;
use std::time::Duration;

use aws_common::Sidecar;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use wallaroo_connector::sim::{RoundOutcome, SinkSim, SinkSimConfig, SourceSim, SourceSimConfig};

fn s3_manifest(port: u16, metrics: u16, bucket: &str) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: s3-e2e}}
spec:
  connectorName: s3_e2e
  metricsPort: {metrics}
  worker: {{host: 127.0.0.1, port: {port}}}
  sink:
    s3:
      bucket: {bucket}
      prefix: out/
      endpoint: {endpoint}
      forcePathStyle: true
      objectPer: checkpoint
      accessKeyIdFrom: {{env: {key}}}
      secretAccessKeyFrom: {{env: {secret}}}
"#,
        endpoint = aws_common::ENDPOINT,
        key = aws_common::KEY_VAR,
        secret = aws_common::SECRET_VAR,
    )
}

async fn connect_sink(port: u16, worker: &str) -> SinkSim {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..300 {
        if let Ok(s) = SinkSim::connect(SinkSimConfig::new(addr, worker)).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the sink sidecar did not accept the worker on port {port}");
}

async fn reconnect(sim: &mut SinkSim) {
    for _ in 0..300 {
        if sim.reconnect().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the sink sidecar did not come back");
}

/// Every published checkpoint object of `worker`, concatenated in name order.
async fn published(s3: &aws_sdk_s3::Client, bucket: &str, worker: &str) -> String {
    let out = s3.list_objects_v2().bucket(bucket).prefix(format!("out/{worker}/")).send().await.unwrap();
    let mut keys: Vec<String> = out.contents().iter().filter_map(|o| o.key().map(str::to_string)).collect();
    keys.sort();
    let mut text = String::new();
    for k in keys {
        let o = s3.get_object().bucket(bucket).key(&k).send().await.unwrap();
        let bytes = o.body.collect().await.unwrap().into_bytes();
        text.push_str(std::str::from_utf8(&bytes).unwrap());
    }
    text
}

/// Phase 2 after a reconnect runs in the sidecar after the intro returned: wait for it to land.
async fn wait_published(s3: &aws_sdk_s3::Client, bucket: &str, worker: &str, want: &str) {
    for _ in 0..100 {
        if published(s3, bucket, worker).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(published(s3, bucket, worker).await, want, "{worker}: published output");
}

async fn send_round(sim: &mut SinkSim, tag: &str, n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        let line = format!("{tag}-{i}\n");
        sim.send(line.as_bytes()).await.unwrap();
        text.push_str(&line);
    }
    text
}

#[tokio::test]
async fn s3_sink_survives_kill9_between_phases() {
    let s3 = aws_common::s3().await;
    let bucket = aws_common::unique("wallaroo-e2e");
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics) = (common::free_port(), common::free_port());
    let manifest = s3_manifest(port, metrics, &bucket);

    let sidecar = Sidecar::start(dir.path(), &manifest);
    let mut w1 = connect_sink(port, "w1").await;
    let mut w2 = connect_sink(port, "w2").await;
    let mut want1 = send_round(&mut w1, "a", 50).await;
    let want2 = send_round(&mut w2, "b", 30).await;
    assert_eq!(w1.checkpoint().await.unwrap(), RoundOutcome::Committed);
    assert_eq!(w2.checkpoint().await.unwrap(), RoundOutcome::Committed);
    wait_published(&s3, &bucket, "w1", &want1).await;
    wait_published(&s3, &bucket, "w2", &want2).await;

    // Phase 1 votes commit, then the sidecar dies before Phase 2; the checkpoint completed cluster-wide.
    let round = send_round(&mut w1, "c", 40).await;
    assert!(w1.phase1().await.unwrap());
    sidecar.kill9();
    assert_eq!(published(&s3, &bucket, "w1").await, want1, "nothing published before Phase 2");
    w1.complete_without_phase2();
    let sidecar = Sidecar::start(dir.path(), &manifest);
    reconnect(&mut w1).await;
    assert_eq!(w1.resolved.last().map(|(_, commit)| *commit), Some(true));
    want1.push_str(&round);
    wait_published(&s3, &bucket, "w1", &want1).await;

    // Again, but this time the checkpoint is rolled back: the round must never appear.
    send_round(&mut w1, "d", 40).await;
    assert!(w1.phase1().await.unwrap());
    sidecar.kill9();
    w1.rollback_round();
    let sidecar = Sidecar::start(dir.path(), &manifest);
    reconnect(&mut w1).await;
    assert_eq!(w1.resolved.last().map(|(_, commit)| *commit), Some(false));
    // Let the abort run; the next round's commit is ordered after it.

    // The replay after the rollback commits normally.
    let replay = send_round(&mut w1, "e", 10).await;
    assert_eq!(w1.checkpoint().await.unwrap(), RoundOutcome::Committed);
    want1.push_str(&replay);
    // Waiting for exactly this text also proves the rolled-back round never appeared.
    wait_published(&s3, &bucket, "w1", &want1).await;
    // w2 is untouched by all of this.
    reconnect(&mut w2).await;
    assert_eq!(published(&s3, &bucket, "w2").await, want2);
    sidecar.stop();
}

#[tokio::test]
async fn s3_missing_bucket_votes_abort() {
    aws_common::require_moto().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics) = (common::free_port(), common::free_port());
    let sidecar = Sidecar::start(dir.path(), &s3_manifest(port, metrics, &aws_common::unique("missing")));
    let mut w = connect_sink(port, "w").await;
    send_round(&mut w, "x", 5).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted);
    // The sidecar is still there and takes the worker back.
    reconnect(&mut w).await;
    send_round(&mut w, "y", 5).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted);
    sidecar.stop();
}

fn kinesis_manifest(port: u16, metrics: u16, stream: &str) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: kinesis-e2e}}
spec:
  connectorName: kinesis_e2e
  metricsPort: {metrics}
  worker: {{host: 127.0.0.1, port: {port}}}
  source:
    kinesis:
      stream: {stream}
      region: {region}
      endpoint: {endpoint}
      startFrom: earliest
      pollIntervalMs: 50
      accessKeyIdFrom: {{env: {key}}}
      secretAccessKeyFrom: {{env: {secret}}}
"#,
        region = aws_common::REGION,
        endpoint = aws_common::ENDPOINT,
        key = aws_common::KEY_VAR,
        secret = aws_common::SECRET_VAR,
    )
}

async fn put(k: &aws_sdk_kinesis::Client, stream: &str, range: std::ops::Range<usize>) {
    for chunk in range.collect::<Vec<_>>().chunks(100) {
        let entries = chunk
            .iter()
            .map(|i| {
                PutRecordsRequestEntry::builder()
                    .partition_key(format!("pk-{}", i % 11))
                    .data(Blob::new(format!("m{i}")))
                    .build()
                    .unwrap()
            })
            .collect();
        k.put_records().stream_name(stream).set_records(Some(entries)).send().await.unwrap();
    }
}

/// What each shard holds, as the worker's stream names.
async fn expected(k: &aws_sdk_kinesis::Client, stream: &str) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for (shard, _, data) in aws_common::read_all(k, stream).await {
        m.entry(format!("kinesis:{stream}:{shard}")).or_default().push(String::from_utf8(data).unwrap());
    }
    m
}

#[tokio::test]
async fn kinesis_source_restarts() {
    let k = aws_common::kinesis().await;
    let stream = aws_common::unique("e2e");
    aws_common::create_stream(&k, &stream, 2).await;
    put(&k, &stream, 0..300).await;
    let sim =
        SourceSim::start(SourceSimConfig { checkpoint_every: Some(Duration::from_millis(50)), ..Default::default() })
            .await
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = kinesis_manifest(sim.addr().port(), common::free_port(), &stream);
    let check = |want: &HashMap<String, Vec<String>>| {
        for (name, records) in want {
            let got: Vec<String> =
                sim.processed(name).iter().map(|(_, p)| String::from_utf8_lossy(p).into_owned()).collect();
            assert_eq!(&got, records, "{name}: every record once, in shard order");
        }
    };

    let sidecar = Sidecar::start(dir.path(), &manifest);
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 300).await, "first 300");
    check(&expected(&k, &stream).await);
    // Let a checkpoint cover everything, then stop cleanly: a restart must not deliver any of it again.
    let want = expected(&k, &stream).await;
    let names: Vec<String> = want.keys().cloned().collect();
    assert!(
        sim.wait_until(Duration::from_secs(30), |s| {
            names.iter().all(|n| s.acked(n).is_some_and(|a| s.processed(n).last().is_some_and(|(id, _)| *id == a)))
        })
        .await
    );
    sidecar.stop();
    let dups_before = sim.stats().duplicates;
    put(&k, &stream, 300..400).await;
    let sidecar = Sidecar::start(dir.path(), &manifest);
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 400).await, "next 100");
    check(&expected(&k, &stream).await);
    assert_eq!(sim.stats().duplicates, dups_before, "nothing acknowledged was delivered again after a clean restart");

    // kill -9 while records flow: at-least-once, and the worker's de-duplicated log stays exact.
    put(&k, &stream, 400..700).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sidecar.kill9();
    let sidecar = Sidecar::start(dir.path(), &manifest);
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 700).await, "after kill -9");
    check(&expected(&k, &stream).await);
    sim.with(|s| {
        let st = s.stats();
        assert_eq!((st.credit_overruns, st.second_hello, st.protocol_errors), (0, 0, 0), "{st:?}");
    });
    sidecar.stop();
}

#[tokio::test]
async fn kinesis_sink_through_the_runtime() {
    let k = aws_common::kinesis().await;
    let stream = aws_common::unique("e2e-sink");
    aws_common::create_stream(&k, &stream, 2).await;
    let (port, metrics) = (common::free_port(), common::free_port());
    let (id, secret) = aws_common::creds();
    let manifest = format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: kinesis-sink-e2e}}
spec:
  connectorName: kinesis_sink_e2e
  metricsPort: {metrics}
  worker: {{host: 127.0.0.1, port: {port}}}
  sink:
    kinesis:
      stream: {stream}
      region: {region}
      endpoint: {endpoint}
      format: lengthPrefixed
      accessKeyIdFrom: {{env: {key}}}
      secretAccessKeyFrom: {{env: {secret}}}
"#,
        region = aws_common::REGION,
        endpoint = aws_common::ENDPOINT,
        key = id.unwrap().env.unwrap(),
        secret = secret.unwrap().env.unwrap(),
    );
    let running = common::spawn(common::connector(&manifest));
    let mut w = connect_sink(port, "w").await;
    for i in 0..120 {
        let key = format!("k{}", i % 4);
        let value = format!("v{i}");
        let mut p = (key.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(key.as_bytes());
        p.extend_from_slice(value.as_bytes());
        w.send(&p).await.unwrap();
    }
    // Phase 1 votes commit only once Kinesis acknowledged everything staged.
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    let landed = aws_common::read_all(&k, &stream).await;
    assert_eq!(landed.len(), 120);
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (_, key, data) in landed {
        let i: usize = std::str::from_utf8(&data).unwrap()[1..].parse().unwrap();
        assert_eq!(key, format!("k{}", i % 4));
        per_key.entry(key).or_default().push(i);
    }
    for (key, v) in per_key {
        assert_eq!(v, (0..120).filter(|i| format!("k{}", i % 4) == key).collect::<Vec<_>>(), "{key}");
    }
    running.stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), running.task).await.unwrap().unwrap().unwrap();
}
