//! Streaming frame splitter: copes with partial reads and refuses absurd lengths before buffering them.
use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::codec::{DecodeError, EncodeError, Frame};

pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self { max_frame: DEFAULT_MAX_FRAME }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    /// Splits one complete frame body (tag + body) off `src`, or returns `None` if more bytes are needed.
    pub fn split_frame(&self, src: &mut BytesMut) -> Result<Option<bytes::Bytes>, DecodeError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(DecodeError::TooLong { len, max: self.max_frame });
        }
        if len == 0 {
            return Err(DecodeError::Empty);
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        Ok(Some(src.split_to(len).freeze()))
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.split_frame(src)? {
            Some(body) => Ok(Some(Frame::decode(body)?)),
            None => Ok(None),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.encode(dst)?;
        Ok(())
    }
}

/// The largest HELLO the wire can carry: a tag and four u16-length strings (spec 1.4). Before a peer has sent a
/// valid HELLO nothing larger is buffered, so a peer without the cookie cannot make us hold 16 MiB per connection.
pub const MAX_HELLO_FRAME: usize = 1 + 4 * (2 + u16::MAX as usize);

/// Bytes of a MESSAGE frame that name it: tag, stream id, message id.
const MESSAGE_HEAD: usize = 1 + 8 + 8;

/// What a sink reads from a worker connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Frame(Frame),
    /// A MESSAGE whose frame exceeds the limit: its head was read, the rest is skipped without buffering.
    Oversize {
        stream_id: u64,
        message_id: u64,
        frame_len: usize,
        limit: usize,
    },
}

/// The sink's frame reader. Until [`SinkDecoder::authenticated`] it accepts frames up to [`MAX_HELLO_FRAME`] and
/// treats anything larger as an error; afterwards an over-limit MESSAGE is reported as [`Inbound::Oversize`] and
/// skipped in constant memory, so one huge record cannot make the worker reconnect and resend it forever.
#[derive(Debug, Clone)]
pub struct SinkDecoder {
    limit: usize,
    max_frame: usize,
    tolerate_oversize: bool,
    skipping: usize,
}

impl SinkDecoder {
    pub fn new(max_frame: usize) -> Self {
        Self { limit: MAX_HELLO_FRAME.min(max_frame), max_frame, tolerate_oversize: false, skipping: 0 }
    }

    /// The peer proved it knows the cookie: allow full-size frames.
    pub fn authenticated(&mut self) {
        self.limit = self.max_frame;
        self.tolerate_oversize = true;
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Decoder for SinkDecoder {
    type Item = Inbound;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, CodecError> {
        if self.skipping > 0 {
            let n = self.skipping.min(src.len());
            src.advance(n);
            self.skipping -= n;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.limit {
            let too_long = CodecError::from(DecodeError::TooLong { len, max: self.limit });
            // Only a MESSAGE (a record) can be skipped and reported; any other frame that large is garbage.
            if !self.tolerate_oversize || len < MESSAGE_HEAD || (src.len() > 4 && src[4] != super::codec::tag::MESSAGE)
            {
                return Err(too_long);
            }
            if src.len() < 4 + MESSAGE_HEAD {
                return Ok(None);
            }
            let mut head = &src[5..4 + MESSAGE_HEAD];
            let stream_id = head.get_u64();
            let message_id = head.get_u64();
            src.advance(4);
            self.skipping = len;
            let n = self.skipping.min(src.len());
            src.advance(n);
            self.skipping -= n;
            return Ok(Some(Inbound::Oversize { stream_id, message_id, frame_len: len, limit: self.limit }));
        }
        let codec = FrameCodec::new(self.limit);
        match codec.split_frame(src)? {
            Some(body) => Ok(Some(Inbound::Frame(Frame::decode(body)?))),
            None => Ok(None),
        }
    }
}
