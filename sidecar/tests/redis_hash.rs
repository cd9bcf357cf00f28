//! `sink.redisHash` against the Redis on 127.0.0.1:6379 (start it with tests/services/redis.sh).
//!
//! The transactional contract is driven directly here (recover/stage/prepare/commit/abort), including a
//! "crash" between Phase 1 and Phase 2 (the sink object is dropped and a new one recovers). The end-to-end
//! tests through the real protocol and the sidecar binary live in `redis_hash_e2e.rs`.
use bytes::Bytes;
use redis::AsyncCommands;
use std::collections::HashMap;
use wallaroo_connector::runtime::sink_api::{SinkError, SinkIntegration, SinkRecord, Txn};
use wallaroo_connector::runtime::{Health, Metrics};
use wallaroo_connector::sinks::redis_hash::{Keys, RedisHashSink};
use wallaroo_crds::{PayloadFormat, RedisHashSink as Cfg};

const URL: &str = "redis://127.0.0.1:6379";

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), rand::random::<u32>())
}

async fn redis() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(URL).unwrap();
    client.get_multiplexed_async_connection().await.expect("Redis must run on 127.0.0.1:6379 (tests/services/redis.sh)")
}

async fn sink(key: &str) -> RedisHashSink {
    let cfg = Cfg {
        url: Some(URL.into()),
        url_from: None,
        key: key.into(),
        format: PayloadFormat::LengthPrefixed,
        key_field: None,
        value_field: None,
    };
    RedisHashSink::connect(cfg, Health::new(), Metrics::unlabelled()).await.unwrap()
}

fn lp(k: &str, v: &str) -> Bytes {
    let mut b = (k.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(k.as_bytes());
    b.extend_from_slice(v.as_bytes());
    Bytes::from(b)
}

/// Records at contiguous offsets from `start`; returns them and the end offset.
fn records(start: u64, pairs: &[(&str, &str)]) -> (Vec<SinkRecord>, u64) {
    let mut off = start;
    let mut out = Vec::new();
    for (k, v) in pairs {
        let payload = lp(k, v);
        out.push(SinkRecord { offset: off, payload: payload.clone() });
        off += payload.len() as u64;
    }
    (out, off)
}

fn txn(id: &str, start: u64, end: u64) -> Txn {
    Txn { id: Bytes::from(id.to_string()), start, end }
}

async fn hash(key: &str) -> HashMap<String, String> {
    redis().await.hgetall(key).await.unwrap()
}

#[tokio::test]
async fn committed_rounds_apply_once_and_aborted_rounds_never() {
    let key = unique("hash");
    let s = sink(&key).await;
    let r = s.recover("w1").await.unwrap();
    assert_eq!(r.committed, Some(0));
    assert_eq!(r.pending, None);

    let (recs, end1) = records(0, &[("a", "1"), ("b", "2"), ("a", "3")]);
    s.stage("w1", recs).await.unwrap();
    let t1 = txn("t1", 0, end1);
    s.prepare("w1", &t1).await.unwrap();
    assert!(hash(&key).await.is_empty(), "nothing is visible after Phase 1");
    s.commit("w1", &t1).await.unwrap();
    let h = hash(&key).await;
    assert_eq!(h.get("a").map(String::as_str), Some("3"), "later writes of a round win, as with plain HSETs");
    assert_eq!(h.get("b").map(String::as_str), Some("2"));
    // Phase 2 again (a retried commit after a lost reply) changes nothing.
    redis().await.hset::<_, _, _, ()>(&key, "b", "changed-by-someone-else").await.unwrap();
    s.commit("w1", &t1).await.unwrap();
    assert_eq!(hash(&key).await.get("b").map(String::as_str), Some("changed-by-someone-else"));

    let (recs, end2) = records(end1, &[("c", "x"), ("a", "aborted")]);
    s.stage("w1", recs).await.unwrap();
    let t2 = txn("t2", end1, end2);
    s.prepare("w1", &t2).await.unwrap();
    s.abort("w1", &t2).await.unwrap();
    s.abort("w1", &t2).await.unwrap();
    let h = hash(&key).await;
    assert_eq!(h.get("c"), None);
    assert_eq!(h.get("a").map(String::as_str), Some("3"));

    // The aborted range is written again by the next round.
    let (recs, end3) = records(end1, &[("c", "y")]);
    s.stage("w1", recs).await.unwrap();
    let t3 = txn("t3", end1, end3);
    s.prepare("w1", &t3).await.unwrap();
    s.commit("w1", &t3).await.unwrap();
    assert_eq!(hash(&key).await.get("c").map(String::as_str), Some("y"));

    let keys = Keys::new(&key, "w1");
    let mut c = redis().await;
    let offset: Option<u64> = c.get(&keys.offset).await.unwrap();
    assert_eq!(offset, Some(end3));
    let leftovers: bool = c.exists(&[&keys.stage, &keys.txn]).await.unwrap();
    assert!(!leftovers, "staging and marker are gone after Phase 2");
    assert_eq!(s.recover("w1").await.unwrap().committed, Some(end3));
    s.forget("w1").await.unwrap();
    let _: () = c.del(&key).await.unwrap();
}

#[tokio::test]
async fn crash_between_phases_resolves_both_ways() {
    let key = unique("hash");
    // A field written twice (the later value wins) and bytes Lua must not mangle (NUL, UTF-8).
    let (recs, end) = records(0, &[("k1", "v0"), ("k1", "v1"), ("k2", "a\u{0}b\u{e9}")]);
    {
        let s = sink(&key).await;
        s.recover("w1").await.unwrap();
        s.stage("w1", recs.clone()).await.unwrap();
        s.prepare("w1", &txn("t1", 0, end)).await.unwrap();
        // The sidecar dies here: no Phase 2.
    }
    let s = sink(&key).await;
    let r = s.recover("w1").await.unwrap();
    assert_eq!(r.committed, Some(0));
    assert_eq!(r.pending, Some(txn("t1", 0, end)), "the prepared round is reported after a restart");
    s.commit("w1", &txn("t1", 0, end)).await.unwrap();
    let h = hash(&key).await;
    assert_eq!(h.len(), 2);
    assert_eq!(h.get("k1").map(String::as_str), Some("v1"));
    assert_eq!(h.get("k2").map(String::as_str), Some("a\u{0}b\u{e9}"));
    let r = s.recover("w1").await.unwrap();
    assert_eq!((r.committed, r.pending), (Some(end), None));

    // Same, resolved by abort this time.
    let (recs, end2) = records(end, &[("k3", "v3")]);
    {
        let s = sink(&key).await;
        s.recover("w1").await.unwrap();
        s.stage("w1", recs).await.unwrap();
        s.prepare("w1", &txn("t2", end, end2)).await.unwrap();
    }
    let s = sink(&key).await;
    let r = s.recover("w1").await.unwrap();
    assert_eq!(r.pending, Some(txn("t2", end, end2)));
    s.abort("w1", &txn("t2", end, end2)).await.unwrap();
    assert_eq!(hash(&key).await.get("k3"), None);
    let r = s.recover("w1").await.unwrap();
    assert_eq!((r.committed, r.pending), (Some(end), None));
    s.forget("w1").await.unwrap();
    let _: () = redis().await.del(&key).await.unwrap();
}

#[tokio::test]
async fn two_workers_at_once_keep_separate_state() {
    let key = unique("hash");
    let s = std::sync::Arc::new(sink(&key).await);
    let mut tasks = Vec::new();
    for w in ["wa", "wb"] {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.recover(w).await.unwrap();
            let mut off = 0;
            for round in 0..20 {
                let k = format!("{w}-{round}");
                let (recs, end) = records(off, &[(k.as_str(), "v")]);
                s.stage(w, recs).await.unwrap();
                let t = txn(&format!("{w}-t{round}"), off, end);
                s.prepare(w, &t).await.unwrap();
                if round % 3 == 2 {
                    s.abort(w, &t).await.unwrap();
                } else {
                    s.commit(w, &t).await.unwrap();
                    off = end;
                }
            }
            off
        }));
    }
    let mut ends = Vec::new();
    for t in tasks {
        ends.push(t.await.unwrap());
    }
    let h = hash(&key).await;
    for w in ["wa", "wb"] {
        for round in 0..20 {
            let present = h.contains_key(&format!("{w}-{round}"));
            assert_eq!(present, round % 3 != 2, "worker {w} round {round}");
        }
    }
    assert_eq!(s.recover("wa").await.unwrap().committed, Some(ends[0]));
    assert_eq!(s.recover("wb").await.unwrap().committed, Some(ends[1]));
    s.forget("wa").await.unwrap();
    s.forget("wb").await.unwrap();
    let _: () = redis().await.del(&key).await.unwrap();
}

#[tokio::test]
async fn wrong_type_at_key_votes_abort() {
    let key = unique("string");
    let mut c = redis().await;
    let _: () = c.set(&key, "not a hash").await.unwrap();
    let s = sink(&key).await;
    s.recover("w1").await.unwrap();
    let (recs, end) = records(0, &[("a", "1")]);
    s.stage("w1", recs).await.unwrap();
    let err = s.prepare("w1", &txn("t1", 0, end)).await.unwrap_err();
    assert!(matches!(&err, SinkError::Permanent(m) if m.contains("WRONGTYPE")), "{err:?}");
    let value: String = c.get(&key).await.unwrap();
    assert_eq!(value, "not a hash");
    let _: () = c.del(&key).await.unwrap();
}

#[tokio::test]
async fn bad_payload_is_permanent() {
    let key = unique("hash");
    let s = sink(&key).await;
    s.recover("w1").await.unwrap();
    let err = s
        .stage("w1", vec![SinkRecord { offset: 0, payload: Bytes::from_static(b"\x00\x00\x00\x09ab") }])
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Permanent(_)), "{err:?}");
}
