use bytes::{BufMut, BytesMut};
use tokio_util::codec::Decoder;

use crate::protocol::{Frame, Inbound, MAX_HELLO_FRAME, Message, SinkDecoder};

fn message_frame(message_id: u64, payload_len: usize) -> BytesMut {
    let mut b = BytesMut::new();
    Frame::Message(Message {
        stream_id: 1,
        message_id,
        event_time: 0,
        key: None,
        payload: vec![7u8; payload_len].into(),
    })
    .encode(&mut b)
    .unwrap();
    b
}

#[test]
fn before_hello_nothing_larger_than_a_hello_is_accepted() {
    let mut d = SinkDecoder::new(16 << 20);
    let mut buf = BytesMut::new();
    buf.put_u32((MAX_HELLO_FRAME + 1) as u32);
    buf.put_u8(5);
    assert!(d.decode(&mut buf).is_err(), "an unauthenticated peer could make us buffer 16 MiB");
}

#[test]
fn an_oversize_record_is_reported_and_skipped_in_pieces() {
    let limit = MAX_HELLO_FRAME;
    let mut d = SinkDecoder::new(limit);
    d.authenticated();
    let big = message_frame(40, limit + 10);
    let small = message_frame(41 + limit as u64, 3);
    let mut stream = big.clone();
    stream.extend_from_slice(&small);
    let mut got = Vec::new();
    let mut buf = BytesMut::new();
    // Feed it 4 KiB at a time: the decoder must never need the whole record in memory.
    for chunk in stream.chunks(4096) {
        buf.extend_from_slice(chunk);
        while let Some(item) = d.decode(&mut buf).unwrap() {
            got.push(item);
        }
        assert!(buf.len() <= 4096 + 64, "buffered {} bytes of a record being skipped", buf.len());
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(matches!(got[0], Inbound::Oversize { stream_id: 1, message_id: 40, .. }));
    assert!(matches!(&got[1], Inbound::Frame(Frame::Message(m)) if m.payload.len() == 3));
}

#[test]
fn an_oversize_frame_that_is_not_a_record_is_an_error() {
    let mut d = SinkDecoder::new(MAX_HELLO_FRAME);
    d.authenticated();
    let mut buf = BytesMut::new();
    buf.put_u32((MAX_HELLO_FRAME + 1) as u32);
    buf.put_u8(6);
    assert!(d.decode(&mut buf).is_err());
}
