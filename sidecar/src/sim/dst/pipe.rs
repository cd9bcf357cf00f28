//! One direction of a simulated TCP connection: bytes arrive in order, in chunks cut at arbitrary boundaries.
//! The pipe also remembers where each credit-carrying frame ends, so the worker model knows how many credits
//! have actually reached the connector (not merely been sent).
use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::protocol::Frame;

#[derive(Debug, Default)]
pub struct Pipe {
    buf: BytesMut,
    sent: u64,
    delivered: u64,
    /// (byte position where a frame ends, credits it carries), in order.
    marks: VecDeque<(u64, u32)>,
}

impl Pipe {
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.sent += bytes.len() as u64;
    }

    /// Encodes `frame`; `credits` is what the receiver may spend once the whole frame reached it.
    pub fn push_frame(&mut self, frame: &Frame, credits: u32) -> Result<(), String> {
        let mut b = BytesMut::new();
        frame.encode(&mut b).map_err(|e| format!("cannot encode {}: {e}", frame.name()))?;
        self.push(&b);
        if credits > 0 {
            self.marks.push_back((self.sent, credits));
        }
        Ok(())
    }

    /// Takes the next `n` bytes (at least 1, at most what is queued); returns them with the credits of every
    /// frame that is now complete on the receiving side.
    pub fn take(&mut self, n: usize) -> (Bytes, u64) {
        let n = n.clamp(1, self.buf.len().max(1)).min(self.buf.len());
        let chunk = self.buf.split_to(n).freeze();
        self.delivered += n as u64;
        let mut credits = 0u64;
        while let Some(&(end, c)) = self.marks.front() {
            if end > self.delivered {
                break;
            }
            credits += u64::from(c);
            self.marks.pop_front();
        }
        (chunk, credits)
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.marks.clear();
    }
}

/// A connection between a source connector and a worker. Either side may close it; the other side notices only
/// after reading everything that was sent before the close (as with a TCP FIN).
#[derive(Debug)]
pub struct SrcLink {
    pub worker: usize,
    pub to_worker: Pipe,
    pub to_conn: Pipe,
    pub closed_by_conn: bool,
    pub closed_by_worker: bool,
    /// The worker model still holds this connection's state.
    pub worker_alive: bool,
    /// The connector still uses this connection.
    pub conn_alive: bool,
}

impl SrcLink {
    pub fn new(worker: usize) -> Self {
        Self {
            worker,
            to_worker: Pipe::default(),
            to_conn: Pipe::default(),
            closed_by_conn: false,
            closed_by_worker: false,
            worker_alive: true,
            conn_alive: true,
        }
    }
}

/// A connection from a worker's sink to the sink connector. Closes are seen at once by both sides and drop what
/// was in flight (the worker hard-closes it on rollback).
#[derive(Debug, Default)]
pub struct SinkLink {
    pub worker: usize,
    pub to_sink: Pipe,
    pub to_worker: Pipe,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_count_only_once_their_frame_is_complete() {
        let mut p = Pipe::default();
        p.push_frame(&Frame::Ok { initial_credits: 5 }, 5).unwrap();
        p.push_frame(&Frame::Ack { credits: 3, acks: vec![] }, 3).unwrap();
        // OK is 9 bytes on the wire: 8 of them deliver no credit, the 9th delivers 5.
        assert_eq!(p.take(8).1, 0);
        assert_eq!(p.take(1).1, 5);
        let (rest, credits) = p.take(usize::MAX);
        assert_eq!(credits, 3);
        assert!(!rest.is_empty() && p.is_empty());
    }
}
