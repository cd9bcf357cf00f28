//! Every rule of the spec's checklists (2.11 for sources, 3.12 for sinks) against the sans-IO sessions: no
//! sockets, no clock. Each test names the rule it pins.
mod decoder;
mod sink;
mod source;

use bytes::{Bytes, BytesMut};

use super::{Frame, FrameCodec, TwoPc};

/// Splits a session's output into frames.
pub(super) fn frames(out: Bytes) -> Vec<Frame> {
    let codec = FrameCodec::default();
    let mut buf = BytesMut::from(&out[..]);
    let mut v = Vec::new();
    while let Some(body) = codec.split_frame(&mut buf).expect("well-formed output") {
        v.push(Frame::decode(body).expect("decodable frame"));
    }
    assert!(buf.is_empty(), "trailing partial frame in output");
    v
}

/// The 2PC message inside a stream-0 MESSAGE.
pub(super) fn twopc(f: &Frame) -> TwoPc {
    match f {
        Frame::Message(m) if m.stream_id == 0 => TwoPc::decode(m.payload.clone()).expect("2PC payload"),
        other => panic!("expected a stream-0 MESSAGE, got {other:?}"),
    }
}
