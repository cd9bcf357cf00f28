//! Every frame the upstream codec produced (../shared/spec/wire-vectors.jsonl) decodes to its fields and
//! re-encodes to the same bytes.
use bytes::{Bytes, BytesMut};
use serde_json::Value;
use wallaroo_connector::protocol::{Frame, FrameCodec, Hello, Message, TwoPc, WhereRange};

fn vectors() -> Vec<Value> {
    let dir = std::env::var("WALLAROO_SPEC_DIR")
        .unwrap_or_else(|_| format!("{}/../../shared/spec", env!("CARGO_MANIFEST_DIR")));
    let path = format!("{dir}/wire-vectors.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn s(v: &Value) -> Bytes {
    Bytes::from(v.as_str().unwrap().as_bytes().to_vec())
}
fn hx(v: &Value) -> Bytes {
    Bytes::from(hex::decode(v.as_str().unwrap()).unwrap())
}
fn u(v: &Value) -> u64 {
    v.as_u64().unwrap()
}
fn strs(v: &Value) -> Vec<Bytes> {
    v.as_array().unwrap().iter().map(s).collect()
}

/// The frame the fields describe, built independently of the decoder.
fn expected(name: &str, f: &Value) -> Frame {
    let two_pc = |m: TwoPc| m.to_frame().unwrap();
    match name {
        "hello" => Frame::Hello(Hello {
            version: s(&f["version"]),
            cookie: s(&f["cookie"]),
            program_name: s(&f["program_name"]),
            instance_name: s(&f["instance_name"]),
        }),
        "ok" => Frame::Ok { initial_credits: u(&f["initial_credits"]) as u32 },
        "error" => Frame::Error { message: s(&f["message"]) },
        "notify" => Frame::Notify {
            stream_id: u(&f["stream_id"]),
            stream_name: hx(&f["stream_name_hex"]),
            point_of_ref: u(&f["point_of_ref"]),
        },
        "notify_ack" => Frame::NotifyAck {
            success: f["success"].as_bool().unwrap(),
            stream_id: u(&f["stream_id"]),
            point_of_ref: u(&f["point_of_ref"]),
        },
        "message" => Frame::Message(Message {
            stream_id: u(&f["stream_id"]),
            message_id: u(&f["message_id"]),
            event_time: f["event_time"].as_i64().unwrap(),
            key: if f["key_hex"].is_null() { None } else { Some(hx(&f["key_hex"])) },
            payload: hx(&f["payload_hex"]),
        }),
        "ack" => Frame::Ack {
            credits: u(&f["credits"]) as u32,
            acks: f["acks"].as_array().unwrap().iter().map(|p| (u(&p[0]), u(&p[1]))).collect(),
        },
        "restart" => Frame::Restart { address: s(&f["address"]) },
        "eos" => Frame::Eos { stream_id: u(&f["stream_id"]) },
        "list_uncommitted" => two_pc(TwoPc::ListUncommitted { rtag: u(&f["rtag"]) }),
        "reply_uncommitted" => two_pc(TwoPc::ReplyUncommitted { rtag: u(&f["rtag"]), txn_ids: strs(&f["txn_ids"]) }),
        "twopc_phase1" => two_pc(TwoPc::Phase1 {
            txn_id: s(&f["txn_id"]),
            where_list: f["where_list"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| WhereRange { stream_id: u(&w[0]), start: u(&w[1]), end: u(&w[2]) })
                .collect(),
        }),
        "twopc_reply" => two_pc(TwoPc::Reply { txn_id: s(&f["txn_id"]), commit: f["commit"].as_bool().unwrap() }),
        "twopc_phase2" => two_pc(TwoPc::Phase2 { txn_id: s(&f["txn_id"]), commit: f["commit"].as_bool().unwrap() }),
        "workers_left" => two_pc(TwoPc::WorkersLeft { rtag: u(&f["rtag"]), workers: strs(&f["workers"]) }),
        other => panic!("vector kind {other} not covered by this test"),
    }
}

#[test]
fn every_vector_decodes_and_reencodes() {
    let vectors = vectors();
    assert!(vectors.len() >= 40, "expected the full vector file, got {} lines", vectors.len());
    for (i, v) in vectors.iter().enumerate() {
        let name = v["name"].as_str().unwrap();
        let wire = hex::decode(v["frame_hex"].as_str().unwrap()).unwrap();
        let want = expected(name, &v["fields"]);

        // Decode through the streaming codec, as a socket would deliver it.
        let mut buf = BytesMut::from(&wire[..]);
        let got = tokio_util::codec::Decoder::decode(&mut FrameCodec::default(), &mut buf)
            .unwrap_or_else(|e| panic!("vector {i} ({name}): {e}"))
            .unwrap_or_else(|| panic!("vector {i} ({name}): incomplete"));
        assert!(buf.is_empty(), "vector {i} ({name}): bytes left over");
        assert_eq!(got, want, "vector {i} ({name}) decoded wrong");

        // 2PC payloads decode to the inner message too.
        if let Frame::Message(m) = &got
            && m.stream_id == 0
            && name != "message"
        {
            let inner = TwoPc::decode(m.payload.clone()).unwrap_or_else(|e| panic!("vector {i} ({name}): {e}"));
            assert_eq!(inner.to_frame().unwrap(), want, "vector {i} ({name}) inner message");
        }

        // Encode the fields back: byte for byte.
        assert_eq!(hex::encode(want.to_bytes().unwrap()), hex::encode(&wire), "vector {i} ({name}) encoded wrong");
    }
}

#[test]
fn byte_by_byte_delivery_yields_the_same_frames() {
    let mut all = Vec::new();
    for v in vectors() {
        all.extend(hex::decode(v["frame_hex"].as_str().unwrap()).unwrap());
    }
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut count = 0;
    for b in all {
        buf.extend_from_slice(&[b]);
        while let Some(_f) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf).unwrap() {
            count += 1;
        }
    }
    assert_eq!(count, vectors().len());
}
