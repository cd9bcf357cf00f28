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
