//! S3 sink against moto (`tests/services/moto.sh`): the 2PC contract as the runtime drives it, with crashes
//! modelled by dropping the sink (it keeps nothing outside S3) and building a new one.
mod aws_common;

use bytes::Bytes;
use wallaroo_connector::runtime::Health;
use wallaroo_connector::runtime::sink_api::{SinkError, SinkIntegration, SinkRecord, Txn};
use wallaroo_connector::sinks::s3::S3Sink;
use wallaroo_crds::{ObjectPer, PayloadFormat, S3Sink as S3SinkConfig};

fn config(bucket: &str, prefix: &str, object_per: ObjectPer) -> S3SinkConfig {
    let (id, secret) = aws_common::creds();
    S3SinkConfig {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        region: aws_common::REGION.to_string(),
        endpoint: Some(aws_common::ENDPOINT.to_string()),
        force_path_style: true,
        object_per,
        format: PayloadFormat::LengthPrefixed,
        key_field: None,
        value_field: None,
        access_key_id_from: id,
        secret_access_key_from: secret,
    }
}

async fn bucket() -> (aws_sdk_s3::Client, String) {
    let s3 = aws_common::s3().await;
    let name = aws_common::unique("wallaroo-s3-sink");
    s3.create_bucket().bucket(&name).send().await.unwrap();
    (s3, name)
}

async fn sink(bucket: &str, prefix: &str, object_per: ObjectPer) -> S3Sink {
    S3Sink::connect(config(bucket, prefix, object_per), Health::new()).await.unwrap()
}

/// Length-prefixed messages at contiguous offsets from `start`.
fn messages(start: u64, kv: &[(&str, &str)]) -> (Vec<SinkRecord>, u64) {
    let mut off = start;
    let mut out = Vec::new();
    for (k, v) in kv {
        let mut p = (k.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(k.as_bytes());
        p.extend_from_slice(v.as_bytes());
        out.push(SinkRecord { offset: off, payload: Bytes::from(p.clone()) });
        off += p.len() as u64;
    }
    (out, off)
}

fn txn(id: &str, start: u64, end: u64) -> Txn {
    Txn { id: Bytes::from(id.to_string()), start, end }
}

async fn keys(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<String> {
    let out = s3.list_objects_v2().bucket(bucket).prefix(prefix).send().await.unwrap();
    let mut k: Vec<String> = out.contents().iter().filter_map(|o| o.key().map(str::to_string)).collect();
    k.sort();
    k
}

async fn body(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    let o = s3.get_object().bucket(bucket).key(key).send().await.unwrap();
    o.body.collect().await.unwrap().into_bytes().to_vec()
}

/// Published objects: everything outside `<prefix>_wallaroo/`.
async fn published(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<String> {
    keys(s3, bucket, prefix).await.into_iter().filter(|k| !k.starts_with(&format!("{prefix}_wallaroo/"))).collect()
}

#[tokio::test]
async fn committed_rounds_publish_once_aborted_never() {
    let (s3, b) = bucket().await;
    let sink = sink(&b, "out/", ObjectPer::Message).await;
    let r = sink.recover("w1").await.unwrap();
    assert_eq!(r.committed, Some(0));
    assert_eq!(r.pending, None);

    let (recs, end1) = messages(0, &[("a", "1"), ("b", "2"), ("a", "3")]);
    sink.stage("w1", recs).await.unwrap();
    // Staged but not prepared: nothing published.
    assert!(published(&s3, &b, "out/").await.is_empty());
    sink.prepare("w1", &txn("t1", 0, end1)).await.unwrap();
    assert!(published(&s3, &b, "out/").await.is_empty(), "Phase 1 must not publish");
    sink.commit("w1", &txn("t1", 0, end1)).await.unwrap();
    assert_eq!(published(&s3, &b, "out/").await, vec!["out/a", "out/b"]);
    // A later value of the same key wins, as upstream's put_object did.
    assert_eq!(body(&s3, &b, "out/a").await, b"3");
    assert_eq!(body(&s3, &b, "out/b").await, b"2");
    // Repeating Phase 2 (a crash after commit) changes nothing.
    sink.commit("w1", &txn("t1", 0, end1)).await.unwrap();
    assert_eq!(published(&s3, &b, "out/").await, vec!["out/a", "out/b"]);
    assert_eq!(keys(&s3, &b, "out/_wallaroo/").await, vec!["out/_wallaroo/offsets/w1.json"]);

    // An aborted round publishes nothing and leaves nothing behind.
    let (recs, end2) = messages(end1, &[("c", "x"), ("a", "overwritten?")]);
    sink.stage("w1", recs).await.unwrap();
    sink.prepare("w1", &txn("t2", end1, end2)).await.unwrap();
    sink.abort("w1", &txn("t2", end1, end2)).await.unwrap();
    assert_eq!(published(&s3, &b, "out/").await, vec!["out/a", "out/b"]);
    assert_eq!(body(&s3, &b, "out/a").await, b"3");
    assert_eq!(keys(&s3, &b, "out/_wallaroo/").await, vec!["out/_wallaroo/offsets/w1.json"]);

    // The replay after the abort starts again at end1.
    let (recs, end3) = messages(end1, &[("c", "y")]);
    sink.stage("w1", recs).await.unwrap();
    sink.prepare("w1", &txn("t3", end1, end3)).await.unwrap();
    sink.commit("w1", &txn("t3", end1, end3)).await.unwrap();
    assert_eq!(published(&s3, &b, "out/").await, vec!["out/a", "out/b", "out/c"]);
    assert_eq!(body(&s3, &b, "out/c").await, b"y");
    let r = sink.recover("w1").await.unwrap();
    assert_eq!(r.committed, Some(end3));
}

#[tokio::test]
async fn crash_between_phases_resolves_from_s3() {
    let (s3, b) = bucket().await;
    // Round 1 commits normally; round 2 is prepared, then the sidecar "dies" (nothing kept in memory).
    let (recs1, end1) = messages(0, &[("k1", "v1")]);
    let (recs2, end2) = messages(end1, &[("k2", "v2"), ("k1", "v1b")]);
    {
        let s = sink(&b, "", ObjectPer::Message).await;
        s.recover("w").await.unwrap();
        s.stage("w", recs1).await.unwrap();
        s.prepare("w", &txn("r1", 0, end1)).await.unwrap();
        s.commit("w", &txn("r1", 0, end1)).await.unwrap();
        s.stage("w", recs2.clone()).await.unwrap();
        s.prepare("w", &txn("r2", end1, end2)).await.unwrap();
    }
    // Restart: the worker completed the checkpoint, so it commits the pending round.
    let s = sink(&b, "", ObjectPer::Message).await;
    let r = s.recover("w").await.unwrap();
    assert_eq!(r.committed, Some(end1));
    assert_eq!(r.pending, Some(txn("r2", end1, end2)));
    assert_eq!(published(&s3, &b, "").await, vec!["k1"]);
    s.commit("w", &txn("r2", end1, end2)).await.unwrap();
    assert_eq!(published(&s3, &b, "").await, vec!["k1", "k2"]);
    assert_eq!(body(&s3, &b, "k1").await, b"v1b");
    let r = s.recover("w").await.unwrap();
    assert_eq!((r.committed, r.pending), (Some(end2), None));

    // Round 3 prepared, crash, and this time the checkpoint was rolled back: abort.
    let (recs3, end3) = messages(end2, &[("k3", "v3"), ("k1", "never")]);
    s.stage("w", recs3).await.unwrap();
    s.prepare("w", &txn("r3", end2, end3)).await.unwrap();
    drop(s);
    let s = sink(&b, "", ObjectPer::Message).await;
    let r = s.recover("w").await.unwrap();
    assert_eq!(r.pending, Some(txn("r3", end2, end3)));
    s.abort("w", &txn("r3", end2, end3)).await.unwrap();
    assert_eq!(published(&s3, &b, "").await, vec!["k1", "k2"]);
    assert_eq!(body(&s3, &b, "k1").await, b"v1b");
    let r = s.recover("w").await.unwrap();
    assert_eq!((r.committed, r.pending), (Some(end2), None));
    assert_eq!(keys(&s3, &b, "_wallaroo/").await, vec!["_wallaroo/offsets/w.json"]);
}

#[tokio::test]
async fn crash_after_offsets_before_cleanup_counts_as_committed() {
    let (s3, b) = bucket().await;
    let s = sink(&b, "p/", ObjectPer::Message).await;
    s.recover("w").await.unwrap();
    let (recs, end) = messages(0, &[("x", "1")]);
    s.stage("w", recs).await.unwrap();
    s.prepare("w", &txn("t", 0, end)).await.unwrap();
    let manifest = body(&s3, &b, "p/_wallaroo/pending/w.json").await;
    s.commit("w", &txn("t", 0, end)).await.unwrap();
    // Put the manifest back: as if the process died after writing the offsets, before deleting it.
    s3.put_object().bucket(&b).key("p/_wallaroo/pending/w.json").body(manifest.into()).send().await.unwrap();
    drop(s);
    let s = sink(&b, "p/", ObjectPer::Message).await;
    let r = s.recover("w").await.unwrap();
    assert_eq!((r.committed, r.pending), (Some(end), None));
    assert_eq!(keys(&s3, &b, "p/_wallaroo/").await, vec!["p/_wallaroo/offsets/w.json"]);
    // The worker may still send Phase 2 commit again: idempotent.
    s.commit("w", &txn("t", 0, end)).await.unwrap();
    assert_eq!(published(&s3, &b, "p/").await, vec!["p/x"]);
}

#[tokio::test]
async fn unprepared_uploads_are_discarded_on_recover() {
    let (s3, b) = bucket().await;
    let s = sink(&b, "", ObjectPer::Message).await;
    s.recover("w").await.unwrap();
    let (recs, _) = messages(0, &[("x", "1"), ("y", "2")]);
    s.stage("w", recs).await.unwrap();
    assert_eq!(keys(&s3, &b, "_wallaroo/staging/").await.len(), 2);
    drop(s);
    let s = sink(&b, "", ObjectPer::Message).await;
    let r = s.recover("w").await.unwrap();
    assert_eq!((r.committed, r.pending), (Some(0), None));
    assert!(keys(&s3, &b, "").await.is_empty());
}

#[tokio::test]
async fn two_workers_at_once() {
    let (s3, b) = bucket().await;
    let s = std::sync::Arc::new(sink(&b, "", ObjectPer::Checkpoint).await);
    let run = |worker: &'static str| {
        let s = s.clone();
        async move {
            s.recover(worker).await.unwrap();
            let mut start = 0;
            for round in 0..3 {
                let kv: Vec<(String, String)> =
                    (0..20).map(|i| (format!("{worker}-{round}-{i}"), format!("{worker}:{round}:{i}\n"))).collect();
                let kv: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let (recs, end) = messages(start, &kv);
                s.stage(worker, recs).await.unwrap();
                s.prepare(worker, &txn(&format!("{worker}-{round}"), start, end)).await.unwrap();
                if round == 1 {
                    s.abort(worker, &txn(&format!("{worker}-{round}"), start, end)).await.unwrap();
                    continue;
                }
                s.commit(worker, &txn(&format!("{worker}-{round}"), start, end)).await.unwrap();
                start = end;
            }
            start
        }
    };
    let (e1, e2) = tokio::join!(run("w1"), run("w2"));
    for (w, end) in [("w1", e1), ("w2", e2)] {
        let objs = published(&s3, &b, &format!("{w}/")).await;
        assert_eq!(objs.len(), 2, "{w}: {objs:?}");
        let mut all = Vec::new();
        for o in &objs {
            all.extend(body(&s3, &b, o).await);
        }
        let text = String::from_utf8(all).unwrap();
        let expected: String = [0, 2].iter().flat_map(|r| (0..20).map(move |i| format!("{w}:{r}:{i}\n"))).collect();
        assert_eq!(text, expected);
        assert_eq!(s.recover(w).await.unwrap().committed, Some(end));
    }
}

#[tokio::test]
async fn checkpoint_objects_assemble_multipart() {
    let (s3, b) = bucket().await;
    // 5 MiB parts: the smallest S3 accepts for all but the last part.
    let s = sink(&b, "big/", ObjectPer::Checkpoint).await.with_part_size(5 << 20);
    s.recover("w").await.unwrap();
    let chunk = "z".repeat(1 << 20);
    let kv: Vec<(&str, &str)> = (0..11).map(|_| ("k", chunk.as_str())).collect();
    let (recs, end) = messages(0, &kv);
    s.stage("w", recs).await.unwrap();
    s.prepare("w", &txn("big", 0, end)).await.unwrap();
    assert!(published(&s3, &b, "big/").await.is_empty());
    s.commit("w", &txn("big", 0, end)).await.unwrap();
    let objs = published(&s3, &b, "big/").await;
    assert_eq!(objs, vec![format!("big/w/{:020}-{end:020}", 0)]);
    let data = body(&s3, &b, &objs[0]).await;
    assert_eq!(data.len(), 11 << 20);
    assert!(data.iter().all(|&c| c == b'z'));
}

#[tokio::test]
async fn missing_bucket_fails_the_round_not_the_sidecar() {
    aws_common::require_moto().await;
    let s = sink(&aws_common::unique("no-such-bucket"), "", ObjectPer::Message).await;
    // No bucket, no state: the worker's offset is adopted and every round fails.
    let r = s.recover("w").await.unwrap();
    assert_eq!((r.committed, r.pending), (None, None));
    let (recs, end) = messages(0, &[("a", "1")]);
    let e = s.stage("w", recs).await.unwrap_err();
    assert!(matches!(e, SinkError::Permanent(_)), "{e:?}");
    let e = s.prepare("w", &txn("t", 0, end)).await.unwrap_err();
    assert!(matches!(e, SinkError::Permanent(_)), "{e:?}");
}
