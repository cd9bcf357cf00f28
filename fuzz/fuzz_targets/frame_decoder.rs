#![no_main]
//! The streaming decoder and the 2PC decoder must never panic, whatever arrives on the socket.
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use wallaroo_connector::protocol::{Frame, FrameCodec, TwoPc};

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        if let Frame::Message(m) = frame {
            let _ = TwoPc::decode(m.payload);
        }
    }
    let _ = TwoPc::decode(Bytes::copy_from_slice(data));
});
