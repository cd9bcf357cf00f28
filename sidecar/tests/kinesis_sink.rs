//! Kinesis sink against moto (`tests/services/moto.sh`). Moto never refuses single records, so the retry test
//! puts a small HTTP proxy between the sink and moto that withholds every other record of the first PutRecords
//! calls from moto and answers for them the way Kinesis does when a shard is throttled.
mod aws_common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wallaroo_connector::runtime::Health;
use wallaroo_connector::runtime::sink_api::{Guarantee, SinkIntegration, SinkRecord, Txn};
use wallaroo_connector::sinks::kinesis::KinesisSink;
use wallaroo_crds::{KinesisSink as KinesisSinkConfig, PayloadFormat};

fn config(stream: &str, endpoint: &str) -> KinesisSinkConfig {
    let (id, secret) = aws_common::creds();
    KinesisSinkConfig {
        stream: stream.to_string(),
        region: aws_common::REGION.to_string(),
        endpoint: Some(endpoint.to_string()),
        format: PayloadFormat::Json,
        key_field: Some("id".to_string()),
        value_field: Some("v".to_string()),
        access_key_id_from: id,
        secret_access_key_from: secret,
    }
}

fn records(n: usize) -> (Vec<SinkRecord>, u64) {
    let mut off = 0;
    let mut out = Vec::new();
    for i in 0..n {
        let p = Bytes::from(json!({"id": format!("key-{}", i % 7), "v": format!("value-{i}")}).to_string());
        let len = p.len() as u64;
        out.push(SinkRecord { offset: off, payload: p });
        off += len;
    }
    (out, off)
}

/// Checks that every message arrived exactly once and (when `ordered`) in order per partition key.
fn check(landed: &[(String, String, Vec<u8>)], n: usize, ordered: bool) {
    let mut per_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (_, key, data) in landed {
        let text = std::str::from_utf8(data).unwrap();
        let i: usize = text.strip_prefix("value-").unwrap().parse().unwrap();
        assert_eq!(key, &format!("key-{}", i % 7));
        per_key.entry(key.as_str()).or_default().push(i);
    }
    let mut all: Vec<usize> = per_key.values().flatten().copied().collect();
    all.sort();
    assert_eq!(all, (0..n).collect::<Vec<_>>(), "every message exactly once");
    for (k, v) in per_key.iter().filter(|_| ordered) {
        assert!(v.windows(2).all(|w| w[0] < w[1]), "order of {k}: {v:?}");
    }
}

#[tokio::test]
async fn records_land_in_batches() {
    let k = aws_common::kinesis().await;
    let stream = aws_common::unique("sink");
    aws_common::create_stream(&k, &stream, 2).await;
    let sink = KinesisSink::connect(config(&stream, aws_common::ENDPOINT), Health::new()).await.unwrap();
    assert_eq!(sink.guarantee(), Guarantee::AtLeastOnce);
    sink.recover("w").await.unwrap();
    // 1234 records: two full batches of 500 leave during staging, the rest in Phase 1.
    let (recs, end) = records(1234);
    sink.stage("w", recs).await.unwrap();
    let before = aws_common::read_all(&k, &stream).await.len();
    assert_eq!(before, 1000, "full batches are sent while staging");
    sink.prepare("w", &Txn { id: Bytes::from_static(b"t"), start: 0, end }).await.unwrap();
    sink.commit("w", &Txn { id: Bytes::from_static(b"t"), start: 0, end }).await.unwrap();
    check(&aws_common::read_all(&k, &stream).await, 1234, true);
}

#[tokio::test]
async fn refused_records_are_retried() {
    let k = aws_common::kinesis().await;
    let stream = aws_common::unique("sink-retry");
    aws_common::create_stream(&k, &stream, 1).await;
    let refusals = Arc::new(AtomicU32::new(3));
    let proxy = throttling_proxy("127.0.0.1:5000".parse().unwrap(), refusals.clone()).await;
    let sink = KinesisSink::connect(config(&stream, &format!("http://{proxy}")), Health::new()).await.unwrap();
    sink.recover("w").await.unwrap();
    let (recs, end) = records(40);
    sink.stage("w", recs).await.unwrap();
    sink.prepare("w", &Txn { id: Bytes::from_static(b"t"), start: 0, end }).await.unwrap();
    assert_eq!(refusals.load(Ordering::SeqCst), 0, "the proxy refused records three times");
    let landed = aws_common::read_all(&k, &stream).await;
    // Retried records land after records of the same key that were accepted in the meantime (documented).
    check(&landed, 40, false);
}

/// Reads one HTTP/1.1 message head and its Content-Length body; None at end of stream.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < pos + 4 + len {
                let mut chunk = [0u8; 65536];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[pos + 4..pos + 4 + len].to_vec();
            buf.drain(..pos + 4 + len);
            return Some((head, body));
        }
        let mut chunk = [0u8; 65536];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn with_length(head: &str, len: usize) -> Vec<u8> {
    let mut out = String::new();
    for l in head.lines() {
        if !l.to_ascii_lowercase().starts_with("content-length:") {
            out.push_str(l);
            out.push_str("\r\n");
        }
    }
    out.push_str(&format!("content-length: {len}\r\n\r\n"));
    out.into_bytes()
}

async fn throttling_proxy(upstream: SocketAddr, refusals: Arc<AtomicU32>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let mut cbuf = Vec::new();
                while let Some((head, body)) = read_message(&mut client, &mut cbuf).await {
                    let put_records = head.to_ascii_lowercase().contains("kinesis_20131202.putrecords");
                    let refuse = put_records
                        && refusals.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                    let mut kept_mask = Vec::new();
                    let body = if refuse {
                        let mut req: Value = serde_json::from_slice(&body).unwrap();
                        let all = req["Records"].as_array().unwrap().clone();
                        kept_mask = (0..all.len()).map(|i| i % 2 == 0).collect();
                        let kept: Vec<Value> =
                            all.into_iter().zip(&kept_mask).filter(|(_, k)| **k).map(|(r, _)| r).collect();
                        req["Records"] = Value::Array(kept);
                        serde_json::to_vec(&req).unwrap()
                    } else {
                        body
                    };
                    // One upstream connection per request, closed by the server after its answer.
                    let head: String = head
                        .lines()
                        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                        .chain(std::iter::once("connection: close"))
                        .collect::<Vec<_>>()
                        .join("\r\n");
                    let mut msg = with_length(&head, body.len());
                    msg.extend_from_slice(&body);
                    let mut up = TcpStream::connect(upstream).await.unwrap();
                    up.write_all(&msg).await.unwrap();
                    let mut raw = Vec::new();
                    up.read_to_end(&mut raw).await.unwrap();
                    let pos = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                    let rhead: String = String::from_utf8_lossy(&raw[..pos])
                        .lines()
                        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                        .collect::<Vec<_>>()
                        .join("\r\n");
                    let rbody = raw[pos + 4..].to_vec();
                    let rbody = if refuse {
                        let resp: Value = serde_json::from_slice(&rbody).unwrap();
                        let mut accepted = resp["Records"].as_array().unwrap().clone().into_iter();
                        let mut failed = 0;
                        let merged: Vec<Value> = kept_mask
                            .iter()
                            .map(|k| {
                                if *k {
                                    accepted.next().unwrap()
                                } else {
                                    failed += 1;
                                    json!({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "Rate exceeded for shard (test proxy)"})
                                }
                            })
                            .collect();
                        serde_json::to_vec(&json!({"FailedRecordCount": failed, "Records": merged})).unwrap()
                    } else {
                        rbody
                    };
                    let mut out = with_length(&rhead, rbody.len());
                    out.extend_from_slice(&rbody);
                    if client.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}
