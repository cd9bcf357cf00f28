//! Frames of spec section 1.4, as typed values over `Bytes` so decoding slices instead of copying.
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// "No point of reference / nothing processed yet".
pub const U64_MAX: u64 = u64::MAX;

pub mod tag {
    pub const HELLO: u8 = 0;
    pub const OK: u8 = 1;
    pub const ERROR: u8 = 2;
    pub const NOTIFY: u8 = 3;
    pub const NOTIFY_ACK: u8 = 4;
    pub const MESSAGE: u8 = 5;
    pub const ACK: u8 = 6;
    pub const RESTART: u8 = 7;
    pub const EOS: u8 = 8;
    pub const WORKERS_LEFT: u8 = 9;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: Bytes,
    pub cookie: Bytes,
    pub program_name: Bytes,
    pub instance_name: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub stream_id: u64,
    pub message_id: u64,
    pub event_time: i64,
    /// A zero-length key on the wire decodes as `None`: the two cannot be told apart.
    pub key: Option<Bytes>,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Ok {
        initial_credits: u32,
    },
    Error {
        message: Bytes,
    },
    Notify {
        stream_id: u64,
        stream_name: Bytes,
        point_of_ref: u64,
    },
    NotifyAck {
        success: bool,
        stream_id: u64,
        point_of_ref: u64,
    },
    Message(Message),
    Ack {
        credits: u32,
        acks: Vec<(u64, u64)>,
    },
    /// `address` may be empty (a lenient decode of an empty body, as Python allows).
    Restart {
        address: Bytes,
    },
    Eos {
        stream_id: u64,
    },
    /// Top-level tag 9: only in the Pony codec, never sent by anyone; decoded for completeness.
    WorkersLeft {
        rtag: u64,
        workers: Vec<Bytes>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty frame: a frame needs at least its 1-byte tag")]
    Empty,
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    #[error("{frame}: truncated while reading {field}")]
    Truncated { frame: &'static str, field: &'static str },
    #[error("{frame}: {extra} unexpected trailing bytes")]
    Trailing { frame: &'static str, extra: usize },
    #[error("frame length {len} exceeds the maximum of {max} bytes (raise max frame size if this is legitimate)")]
    TooLong { len: usize, max: usize },
    #[error("2PC message: {0}")]
    TwoPc(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("{field} is {len} bytes; the wire allows at most {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
}

/// A bounds-checked reader over a frame body; every read names what it was reading so errors are useful.
pub(crate) struct Reader {
    buf: Bytes,
    frame: &'static str,
}

impl Reader {
    pub(crate) fn new(buf: Bytes, frame: &'static str) -> Self {
        Self { buf, frame }
    }
    fn need(&self, n: usize, field: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n { Err(DecodeError::Truncated { frame: self.frame, field }) } else { Ok(()) }
    }
    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16())
    }
    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32())
    }
    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64())
    }
    pub(crate) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.need(8, field)?;
        Ok(self.buf.get_i64())
    }
    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, field)?;
        Ok(self.buf.split_to(n))
    }
    pub(crate) fn short_bytes(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.u16(field)? as usize;
        self.bytes(n, field)
    }
    pub(crate) fn long_bytes(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.u32(field)? as usize;
        self.bytes(n, field)
    }
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.remaining()
    }
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.buf.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing { frame: self.frame, extra }),
        }
    }
    /// Guards `count`-prefixed lists so a hostile count cannot make us allocate gigabytes up front.
    pub(crate) fn list_capacity(&self, count: u32, min_item: usize) -> usize {
        (count as usize).min(self.buf.remaining() / min_item.max(1))
    }
}

pub(crate) fn put_short(buf: &mut BytesMut, field: &'static str, v: &[u8]) -> Result<(), EncodeError> {
    let len =
        u16::try_from(v.len()).map_err(|_| EncodeError::TooLong { field, len: v.len(), max: u16::MAX as usize })?;
    buf.put_u16(len);
    buf.put_slice(v);
    Ok(())
}

fn short_len(v: &[u8]) -> usize {
    2 + v.len()
}

impl Frame {
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "HELLO",
            Frame::Ok { .. } => "OK",
            Frame::Error { .. } => "ERROR",
            Frame::Notify { .. } => "NOTIFY",
            Frame::NotifyAck { .. } => "NOTIFY_ACK",
            Frame::Message(_) => "MESSAGE",
            Frame::Ack { .. } => "ACK",
            Frame::Restart { .. } => "RESTART",
            Frame::Eos { .. } => "EOS_MESSAGE",
            Frame::WorkersLeft { .. } => "WORKERS_LEFT",
        }
    }

    /// Decodes a frame body: the bytes after the u32 length (tag first).
    pub fn decode(body: Bytes) -> Result<Frame, DecodeError> {
        if body.is_empty() {
            return Err(DecodeError::Empty);
        }
        let t = body[0];
        let rest = body.slice(1..);
        let frame = match t {
            tag::HELLO => {
                let mut r = Reader::new(rest, "HELLO");
                let f = Frame::Hello(Hello {
                    version: r.short_bytes("version")?,
                    cookie: r.short_bytes("cookie")?,
                    program_name: r.short_bytes("program_name")?,
                    instance_name: r.short_bytes("instance_name")?,
                });
                r.finish()?;
                f
            }
            tag::OK => {
                let mut r = Reader::new(rest, "OK");
                let f = Frame::Ok { initial_credits: r.u32("initial_credits")? };
                r.finish()?;
                f
            }
            tag::ERROR => {
                let mut r = Reader::new(rest, "ERROR");
                let f = Frame::Error { message: r.short_bytes("message")? };
                r.finish()?;
                f
            }
            tag::NOTIFY => {
                let mut r = Reader::new(rest, "NOTIFY");
                let f = Frame::Notify {
                    stream_id: r.u64("stream_id")?,
                    stream_name: r.short_bytes("stream_name")?,
                    point_of_ref: r.u64("point_of_ref")?,
                };
                r.finish()?;
                f
            }
            tag::NOTIFY_ACK => {
                let mut r = Reader::new(rest, "NOTIFY_ACK");
                // Pony's reading: only 1 means success.
                let f = Frame::NotifyAck {
                    success: r.u8("success")? == 1,
                    stream_id: r.u64("stream_id")?,
                    point_of_ref: r.u64("point_of_ref")?,
                };
                r.finish()?;
                f
            }
            tag::MESSAGE => {
                let mut r = Reader::new(rest, "MESSAGE");
                let stream_id = r.u64("stream_id")?;
                let message_id = r.u64("message_id")?;
                let event_time = r.i64("event_time")?;
                let key = r.short_bytes("key")?;
                let payload = r.rest();
                Frame::Message(Message {
                    stream_id,
                    message_id,
                    event_time,
                    key: if key.is_empty() { None } else { Some(key) },
                    payload,
                })
            }
            tag::ACK => {
                let mut r = Reader::new(rest, "ACK");
                let credits = r.u32("credits")?;
                let count = r.u32("count")?;
                let mut acks = Vec::with_capacity(r.list_capacity(count, 16));
                for _ in 0..count {
                    acks.push((r.u64("stream_id")?, r.u64("point_of_ref")?));
                }
                r.finish()?;
                Frame::Ack { credits, acks }
            }
            tag::RESTART => {
                let mut r = Reader::new(rest, "RESTART");
                let address = if r.remaining() == 0 { Bytes::new() } else { r.long_bytes("address")? };
                r.finish()?;
                Frame::Restart { address }
            }
            tag::EOS => {
                let mut r = Reader::new(rest, "EOS_MESSAGE");
                let f = Frame::Eos { stream_id: r.u64("stream_id")? };
                r.finish()?;
                f
            }
            tag::WORKERS_LEFT => {
                let mut r = Reader::new(rest, "WORKERS_LEFT");
                let rtag = r.u64("rtag")?;
                let count = r.u32("count")?;
                let mut workers = Vec::with_capacity(r.list_capacity(count, 2));
                for _ in 0..count {
                    workers.push(r.short_bytes("worker_name")?);
                }
                r.finish()?;
                Frame::WorkersLeft { rtag, workers }
            }
            other => return Err(DecodeError::UnknownTag(other)),
        };
        Ok(frame)
    }

    /// Size of the body (tag included), i.e. the value of the length prefix.
    fn body_len(&self) -> usize {
        1 + match self {
            Frame::Hello(h) => {
                short_len(&h.version) + short_len(&h.cookie) + short_len(&h.program_name) + short_len(&h.instance_name)
            }
            Frame::Ok { .. } => 4,
            Frame::Error { message } => short_len(message),
            Frame::Notify { stream_name, .. } => 16 + short_len(stream_name),
            Frame::NotifyAck { .. } => 17,
            Frame::Message(m) => 24 + short_len(m.key.as_deref().unwrap_or(&[])) + m.payload.len(),
            Frame::Ack { acks, .. } => 8 + 16 * acks.len(),
            Frame::Restart { address } => 4 + address.len(),
            Frame::Eos { .. } => 8,
            Frame::WorkersLeft { workers, .. } => 12 + workers.iter().map(|w| short_len(w)).sum::<usize>(),
        }
    }

    /// Appends the length-prefixed frame to `buf`, exactly in the Pony layout.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let len = self.body_len();
        let len32 =
            u32::try_from(len).map_err(|_| EncodeError::TooLong { field: "frame", len, max: u32::MAX as usize })?;
        let start = buf.len();
        buf.reserve(4 + len);
        buf.put_u32(len32);
        let res = self.encode_body(buf);
        if res.is_err() {
            buf.truncate(start);
        }
        res
    }

    fn encode_body(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Frame::Hello(h) => {
                buf.put_u8(tag::HELLO);
                put_short(buf, "HELLO.version", &h.version)?;
                put_short(buf, "HELLO.cookie", &h.cookie)?;
                put_short(buf, "HELLO.program_name", &h.program_name)?;
                put_short(buf, "HELLO.instance_name", &h.instance_name)?;
            }
            Frame::Ok { initial_credits } => {
                buf.put_u8(tag::OK);
                buf.put_u32(*initial_credits);
            }
            Frame::Error { message } => {
                buf.put_u8(tag::ERROR);
                put_short(buf, "ERROR.message", message)?;
            }
            Frame::Notify { stream_id, stream_name, point_of_ref } => {
                buf.put_u8(tag::NOTIFY);
                buf.put_u64(*stream_id);
                put_short(buf, "NOTIFY.stream_name", stream_name)?;
                buf.put_u64(*point_of_ref);
            }
            Frame::NotifyAck { success, stream_id, point_of_ref } => {
                buf.put_u8(tag::NOTIFY_ACK);
                buf.put_u8(u8::from(*success));
                buf.put_u64(*stream_id);
                buf.put_u64(*point_of_ref);
            }
            Frame::Message(m) => {
                buf.put_u8(tag::MESSAGE);
                buf.put_u64(m.stream_id);
                buf.put_u64(m.message_id);
                buf.put_i64(m.event_time);
                put_short(buf, "MESSAGE.key", m.key.as_deref().unwrap_or(&[]))?;
                buf.put_slice(&m.payload);
            }
            Frame::Ack { credits, acks } => {
                buf.put_u8(tag::ACK);
                buf.put_u32(*credits);
                let n = u32::try_from(acks.len()).map_err(|_| EncodeError::TooLong {
                    field: "ACK.entries",
                    len: acks.len(),
                    max: u32::MAX as usize,
                })?;
                buf.put_u32(n);
                for (sid, por) in acks {
                    buf.put_u64(*sid);
                    buf.put_u64(*por);
                }
            }
            Frame::Restart { address } => {
                buf.put_u8(tag::RESTART);
                buf.put_u32(address.len() as u32);
                buf.put_slice(address);
            }
            Frame::Eos { stream_id } => {
                buf.put_u8(tag::EOS);
                buf.put_u64(*stream_id);
            }
            Frame::WorkersLeft { rtag, workers } => {
                buf.put_u8(tag::WORKERS_LEFT);
                buf.put_u64(*rtag);
                buf.put_u32(workers.len() as u32);
                for w in workers {
                    put_short(buf, "WORKERS_LEFT.worker_name", w)?;
                }
            }
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::new();
        self.encode(&mut buf)?;
        Ok(buf.freeze())
    }
}

/// The hot path: appends a MESSAGE frame without building a `Frame` value.
pub fn encode_message(
    buf: &mut BytesMut,
    stream_id: u64,
    message_id: u64,
    key: Option<&[u8]>,
    payload: &[u8],
) -> Result<(), EncodeError> {
    encode_message_parts(buf, stream_id, message_id, key, &[payload])
}

/// Like [`encode_message`], with a payload made of several slices (saves a copy for batched sink output).
pub fn encode_message_parts(
    buf: &mut BytesMut,
    stream_id: u64,
    message_id: u64,
    key: Option<&[u8]>,
    payload: &[&[u8]],
) -> Result<(), EncodeError> {
    let key = key.unwrap_or(&[]);
    if key.len() > u16::MAX as usize {
        return Err(EncodeError::TooLong { field: "MESSAGE.key", len: key.len(), max: u16::MAX as usize });
    }
    let payload_len: usize = payload.iter().map(|p| p.len()).sum();
    let len = 1 + 24 + 2 + key.len() + payload_len;
    let len32 =
        u32::try_from(len).map_err(|_| EncodeError::TooLong { field: "MESSAGE", len, max: u32::MAX as usize })?;
    buf.reserve(4 + len);
    buf.put_u32(len32);
    buf.put_u8(tag::MESSAGE);
    buf.put_u64(stream_id);
    buf.put_u64(message_id);
    buf.put_i64(0);
    buf.put_u16(key.len() as u16);
    buf.put_slice(key);
    for p in payload {
        buf.put_slice(p);
    }
    Ok(())
}
