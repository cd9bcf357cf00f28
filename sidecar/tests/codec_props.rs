//! Property tests: every encodable frame round-trips; no input makes the decoder panic.
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::Decoder;
use wallaroo_connector::protocol::{Frame, FrameCodec, Hello, Message, TwoPc, WhereRange};

fn short() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (short(), short(), short(), short()).prop_map(|(version, cookie, program_name, instance_name)| {
            Frame::Hello(Hello { version, cookie, program_name, instance_name })
        }),
        any::<u32>().prop_map(|initial_credits| Frame::Ok { initial_credits }),
        short().prop_map(|message| Frame::Error { message }),
        (any::<u64>(), short(), any::<u64>()).prop_map(|(stream_id, stream_name, point_of_ref)| Frame::Notify {
            stream_id,
            stream_name,
            point_of_ref
        }),
        (any::<bool>(), any::<u64>(), any::<u64>()).prop_map(|(success, stream_id, point_of_ref)| Frame::NotifyAck {
            success,
            stream_id,
            point_of_ref
        }),
        (any::<u64>(), any::<u64>(), any::<i64>(), proptest::option::of(short()), short()).prop_map(
            |(stream_id, message_id, event_time, key, payload)| {
                // An empty key is "no key" on the wire.
                let key = key.filter(|k| !k.is_empty());
                Frame::Message(Message { stream_id, message_id, event_time, key, payload })
            }
        ),
        (any::<u32>(), proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8))
            .prop_map(|(credits, acks)| Frame::Ack { credits, acks }),
        short().prop_map(|address| Frame::Restart { address }),
        any::<u64>().prop_map(|stream_id| Frame::Eos { stream_id }),
    ]
}

fn two_pc() -> impl Strategy<Value = TwoPc> {
    prop_oneof![
        any::<u64>().prop_map(|rtag| TwoPc::ListUncommitted { rtag }),
        (any::<u64>(), proptest::collection::vec(short(), 0..4))
            .prop_map(|(rtag, txn_ids)| TwoPc::ReplyUncommitted { rtag, txn_ids }),
        (short(), proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..4)).prop_map(
            |(txn_id, w)| {
                TwoPc::Phase1 {
                    txn_id,
                    where_list: w
                        .into_iter()
                        .map(|(stream_id, start, end)| WhereRange { stream_id, start, end })
                        .collect(),
                }
            }
        ),
        (short(), any::<bool>()).prop_map(|(txn_id, commit)| TwoPc::Reply { txn_id, commit }),
        (short(), any::<bool>()).prop_map(|(txn_id, commit)| TwoPc::Phase2 { txn_id, commit }),
        (any::<u64>(), proptest::collection::vec(short(), 0..4))
            .prop_map(|(rtag, workers)| TwoPc::WorkersLeft { rtag, workers }),
    ]
}

proptest! {
    #[test]
    fn frames_round_trip(f in frame()) {
        let wire = f.to_bytes().unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        let back = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(back, f);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn two_pc_round_trips(m in two_pc()) {
        let back = TwoPc::decode(m.encode().unwrap()).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(f)) = codec.decode(&mut buf) {
            if let Frame::Message(m) = f {
                let _ = TwoPc::decode(m.payload);
            }
        }
        let _ = TwoPc::decode(Bytes::from(data));
    }

    #[test]
    fn oversized_lengths_are_refused_before_buffering(len in 1025u32..) {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        prop_assert!(FrameCodec::new(1024).decode(&mut buf).is_err());
    }
}
