//! 2PC messages (spec 1.5): a bare inner tag + body, carried as the payload of a stream-0 MESSAGE.
use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{DecodeError, EncodeError, Frame, Message, Reader, put_short};

pub mod inner_tag {
    pub const LIST_UNCOMMITTED: u8 = 201;
    pub const REPLY_UNCOMMITTED: u8 = 202;
    pub const PHASE1: u8 = 203;
    pub const REPLY: u8 = 204;
    pub const PHASE2: u8 = 205;
    pub const WORKERS_LEFT: u8 = 206;
}

/// One entry of a Phase 1 "where list": bytes `[start, end)` of stream `stream_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhereRange {
    pub stream_id: u64,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwoPc {
    ListUncommitted {
        rtag: u64,
    },
    ReplyUncommitted {
        rtag: u64,
        txn_ids: Vec<Bytes>,
    },
    Phase1 {
        txn_id: Bytes,
        where_list: Vec<WhereRange>,
    },
    /// The Phase 1 vote. There is no reply to Phase 2.
    Reply {
        txn_id: Bytes,
        commit: bool,
    },
    Phase2 {
        txn_id: Bytes,
        commit: bool,
    },
    WorkersLeft {
        rtag: u64,
        workers: Vec<Bytes>,
    },
}

impl TwoPc {
    pub fn name(&self) -> &'static str {
        match self {
            TwoPc::ListUncommitted { .. } => "ListUncommitted",
            TwoPc::ReplyUncommitted { .. } => "ReplyUncommitted",
            TwoPc::Phase1 { .. } => "TwoPCPhase1",
            TwoPc::Reply { .. } => "TwoPCReply",
            TwoPc::Phase2 { .. } => "TwoPCPhase2",
            TwoPc::WorkersLeft { .. } => "WorkersLeft",
        }
    }

    pub fn decode(payload: Bytes) -> Result<TwoPc, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::TwoPc("empty stream-0 payload".into()));
        }
        let t = payload[0];
        let mut r = Reader::new(payload.slice(1..), "2PC");
        let msg = match t {
            inner_tag::LIST_UNCOMMITTED => TwoPc::ListUncommitted { rtag: r.u64("rtag")? },
            inner_tag::REPLY_UNCOMMITTED => {
                let rtag = r.u64("rtag")?;
                let count = r.u32("count")?;
                let mut txn_ids = Vec::with_capacity(r.list_capacity(count, 2));
                for _ in 0..count {
                    txn_ids.push(r.short_bytes("txn_id")?);
                }
                TwoPc::ReplyUncommitted { rtag, txn_ids }
            }
            inner_tag::PHASE1 => {
                let txn_id = r.short_bytes("txn_id")?;
                let count = r.u32("count")?;
                let mut where_list = Vec::with_capacity(r.list_capacity(count, 24));
                for _ in 0..count {
                    where_list.push(WhereRange {
                        stream_id: r.u64("stream_id")?,
                        start: r.u64("start_por")?,
                        end: r.u64("end_por")?,
                    });
                }
                TwoPc::Phase1 { txn_id, where_list }
            }
            // Pony reads any non-zero byte as commit; we do the same and always emit 0/1.
            inner_tag::REPLY => TwoPc::Reply { txn_id: r.short_bytes("txn_id")?, commit: r.u8("commit")? != 0 },
            inner_tag::PHASE2 => TwoPc::Phase2 { txn_id: r.short_bytes("txn_id")?, commit: r.u8("commit")? != 0 },
            inner_tag::WORKERS_LEFT => {
                let rtag = r.u64("rtag")?;
                let count = r.u32("count")?;
                let mut workers = Vec::with_capacity(r.list_capacity(count, 2));
                for _ in 0..count {
                    workers.push(r.short_bytes("worker_name")?);
                }
                TwoPc::WorkersLeft { rtag, workers }
            }
            other => return Err(DecodeError::TwoPc(format!("unknown inner tag {other}"))),
        };
        r.finish()?;
        Ok(msg)
    }

    pub fn encode(&self) -> Result<Bytes, EncodeError> {
        let mut b = BytesMut::with_capacity(32);
        match self {
            TwoPc::ListUncommitted { rtag } => {
                b.put_u8(inner_tag::LIST_UNCOMMITTED);
                b.put_u64(*rtag);
            }
            TwoPc::ReplyUncommitted { rtag, txn_ids } => {
                b.put_u8(inner_tag::REPLY_UNCOMMITTED);
                b.put_u64(*rtag);
                b.put_u32(txn_ids.len() as u32);
                for t in txn_ids {
                    put_short(&mut b, "ReplyUncommitted.txn_id", t)?;
                }
            }
            TwoPc::Phase1 { txn_id, where_list } => {
                b.put_u8(inner_tag::PHASE1);
                put_short(&mut b, "TwoPCPhase1.txn_id", txn_id)?;
                b.put_u32(where_list.len() as u32);
                for w in where_list {
                    b.put_u64(w.stream_id);
                    b.put_u64(w.start);
                    b.put_u64(w.end);
                }
            }
            TwoPc::Reply { txn_id, commit } => {
                b.put_u8(inner_tag::REPLY);
                put_short(&mut b, "TwoPCReply.txn_id", txn_id)?;
                b.put_u8(u8::from(*commit));
            }
            TwoPc::Phase2 { txn_id, commit } => {
                b.put_u8(inner_tag::PHASE2);
                put_short(&mut b, "TwoPCPhase2.txn_id", txn_id)?;
                b.put_u8(u8::from(*commit));
            }
            TwoPc::WorkersLeft { rtag, workers } => {
                b.put_u8(inner_tag::WORKERS_LEFT);
                b.put_u64(*rtag);
                b.put_u32(workers.len() as u32);
                for w in workers {
                    put_short(&mut b, "WorkersLeft.worker_name", w)?;
                }
            }
        }
        Ok(b.freeze())
    }

    /// Wraps the message as the worker and sinks do: MESSAGE(stream 0, id 0, time 0, no key).
    pub fn to_frame(&self) -> Result<Frame, EncodeError> {
        Ok(Frame::Message(Message { stream_id: 0, message_id: 0, event_time: 0, key: None, payload: self.encode()? }))
    }
}
