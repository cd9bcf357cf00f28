//! The worker's source side (spec 2.2-2.6, 2.8, 2.9): connections, credits, the stream registry, MESSAGE
//! processing and de-duplication, EOS, closes.
use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use super::{Cluster, ConnStream, Origin, SrcConn, decode_frames};
use crate::protocol::{Frame, SOURCE_VERSION, U64_MAX};
use crate::sim::dst::pipe::SrcLink;

impl Cluster {
    pub fn src_accept(&mut self, link: u64, worker: usize) {
        self.conns.insert(
            link,
            SrcConn {
                worker,
                streaming: false,
                credits: self.cfg.max_credits,
                received: 0,
                delivered: 0,
                streams: BTreeMap::new(),
                buf: BytesMut::new(),
            },
        );
    }

    pub fn src_has_conn(&self, link: u64) -> bool {
        self.conns.contains_key(&link)
    }

    /// Credits that reached the connector on `link`.
    pub fn src_credits_delivered(&mut self, link: u64, credits: u64) {
        if let Some(c) = self.conns.get_mut(&link) {
            c.delivered += credits;
        }
    }

    pub(super) fn send_src(l: &mut SrcLink, frame: &Frame, credits: u32) -> Result<(), String> {
        l.to_conn.push_frame(frame, credits)
    }

    /// The worker closes a source connection (spec 2.2 ERROR path, rollback, RESTART): streams go back to the
    /// registry at their last checkpointed point.
    pub fn src_close(&mut self, link: u64, l: &mut SrcLink, plain: bool) {
        l.closed_by_worker = true;
        l.worker_alive = false;
        l.to_worker.clear();
        self.src_forget(link, plain);
    }

    /// The worker noticed the connector closed the connection.
    pub fn src_closed_by_peer(&mut self, link: u64, l: &mut SrcLink) {
        l.worker_alive = false;
        self.src_forget(link, true);
    }

    pub(super) fn src_forget(&mut self, link: u64, plain: bool) {
        let Some(c) = self.conns.remove(&link) else { return };
        for (sid, cs) in c.streams {
            if plain {
                // Processed after the last barrier: the connector resends these from last_acked and, with no
                // rollback, their first processing stays in the output (at-least-once by design, spec 2.9).
                for id in cs.since_barrier {
                    *self.replay_allowance.entry(Origin { stream: sid, id }).or_insert(0) += 1;
                }
            }
            if self.active.get(&sid) == Some(&link) {
                self.active.remove(&sid);
                self.inactive.insert(sid, cs.last_acked);
            }
        }
    }

    /// Bytes from the connector reached the worker.
    pub fn src_receive(&mut self, link: u64, l: &mut SrcLink, chunk: &[u8]) {
        let frames = {
            let Some(c) = self.conns.get_mut(&link) else { return };
            c.buf.extend_from_slice(chunk);
            decode_frames(&mut c.buf)
        };
        let frames = match frames {
            Ok(f) => f,
            Err(e) => {
                self.violation(format!("source link {link}: undecodable frame: {e}"));
                return self.src_error(link, l, "Unable to decode message");
            }
        };
        for f in frames {
            if !self.conns.contains_key(&link) {
                break;
            }
            self.src_frame(link, l, f);
        }
    }

    pub(super) fn src_error(&mut self, link: u64, l: &mut SrcLink, msg: &str) {
        // Best effort, as the worker: the connection closes right after, whether or not the ERROR is encoded.
        let _ = Self::send_src(l, &Frame::Error { message: Bytes::from(msg.to_string()) }, 0);
        self.src_close(link, l, true);
    }

    /// Spec 2.2, one frame.
    pub(super) fn src_frame(&mut self, link: u64, l: &mut SrcLink, frame: Frame) {
        let max = self.cfg.max_credits;
        let refill = self.cfg.refill_credits;
        let rolling_back = self.rolling_back.is_some();
        let Some(c) = self.conns.get_mut(&link) else { return };
        if c.streaming {
            c.received += 1;
            if c.received > c.delivered {
                let (r, d) = (c.received, c.delivered);
                self.violation(format!(
                    "credit overrun on source link {link}: frame {r} after HELLO, only {d} credits reached the connector"
                ));
                return self.src_error(link, l, "credit overrun");
            }
        }
        c.credits = c.credits.wrapping_sub(1);
        if c.streaming && c.credits <= refill {
            let add = max.wrapping_sub(c.credits);
            c.credits = max;
            if let Err(e) = Self::send_src(l, &Frame::Ack { credits: add, acks: vec![] }, add) {
                self.violation(e);
            }
        }
        let Some(c) = self.conns.get_mut(&link) else { return };
        let streaming = c.streaming;
        let worker = c.worker;
        match frame {
            Frame::Hello(h) => {
                if streaming {
                    self.violation(format!("second HELLO on source link {link} (the worker would Fail())"));
                    self.src_close(link, l, true);
                } else if h.version.as_ref() != SOURCE_VERSION.as_bytes()
                    || h.cookie.as_ref() != self.cfg.cookie.as_bytes()
                {
                    self.violation(format!("bad HELLO on source link {link}: {h:?}"));
                    self.src_error(link, l, "bad HELLO");
                } else {
                    c.credits = max;
                    c.streaming = true;
                    c.received = 0;
                    c.delivered = 0;
                    if let Err(e) = Self::send_src(l, &Frame::Ok { initial_credits: max }, max) {
                        self.violation(e);
                    }
                }
            }
            Frame::Notify { stream_id, point_of_ref, .. } => {
                if !streaming {
                    self.violation(format!("NOTIFY before HELLO on source link {link}"));
                    return self.src_error(link, l, "Bad protocol FSM state");
                }
                let here = c.streams.contains_key(&stream_id);
                let refuse = rolling_back || here || self.active.contains_key(&stream_id);
                if refuse {
                    self.stats.refused += 1;
                    let f = Frame::NotifyAck { success: false, stream_id, point_of_ref };
                    if let Err(e) = Self::send_src(l, &f, 0) {
                        self.violation(e);
                    }
                    return;
                }
                // Registry (spec 2.5): inactive -> its stored last_acked; new -> U64_MAX from a local leader, the
                // NOTIFY's own value from a remote one.
                let por = match self.inactive.remove(&stream_id) {
                    Some(p) => p,
                    None if worker == self.leader() => U64_MAX,
                    None => point_of_ref,
                };
                self.active.insert(stream_id, link);
                if let Some(c) = self.conns.get_mut(&link) {
                    c.streams.insert(
                        stream_id,
                        ConnStream {
                            last_seen: por,
                            last_acked: por,
                            last_id: None,
                            close_on_or_after: None,
                            since_barrier: Vec::new(),
                        },
                    );
                }
                let f = Frame::NotifyAck { success: true, stream_id, point_of_ref: por };
                if let Err(e) = Self::send_src(l, &f, 0) {
                    self.violation(e);
                }
            }
            Frame::Message(m) => {
                if !streaming {
                    self.violation(format!("MESSAGE before HELLO on source link {link}"));
                    return self.src_error(link, l, "Bad protocol FSM state");
                }
                if rolling_back {
                    return;
                }
                let Some(cs) = c.streams.get_mut(&m.stream_id).filter(|s| s.close_on_or_after.is_none()) else {
                    self.violation(format!(
                        "MESSAGE on stream {:#x} not granted on source link {link} (id {})",
                        m.stream_id, m.message_id
                    ));
                    return self.src_error(link, l, "Bad/unregistered stream_id");
                };
                if let Some(last) = cs.last_id
                    && m.message_id <= last
                {
                    let what = format!(
                        "message id regression on source link {link}, stream {:#x}: {} after {last}",
                        m.stream_id, m.message_id
                    );
                    cs.last_id = Some(m.message_id);
                    self.violation(what);
                    return;
                }
                cs.last_id = Some(m.message_id);
                if cs.last_seen != U64_MAX && m.message_id <= cs.last_seen {
                    self.stats.duplicates_dropped += 1;
                    return;
                }
                cs.last_seen = m.message_id;
                cs.since_barrier.push(m.message_id);
                self.stats.processed += 1;
                // The identity application: the record goes to this worker's sink output unchanged.
                self.produce(worker, &m.payload);
            }
            Frame::Eos { stream_id } => {
                let next = self.barrier_id + 1;
                match c.streams.get_mut(&stream_id) {
                    Some(cs) if cs.close_on_or_after.is_none() => cs.close_on_or_after = Some(next),
                    _ => {
                        self.violation(format!("EOS for stream {stream_id:#x} not active on source link {link}"));
                        self.src_error(link, l, "Unable to decode message");
                    }
                }
            }
            Frame::Error { .. } => self.src_close(link, l, true),
            other => {
                self.violation(format!("{} from the source connector on link {link}", other.name()));
                self.src_error(link, l, "Invalid message");
            }
        }
    }

    pub(super) fn produce(&mut self, worker: usize, payload: &[u8]) {
        let s = &mut self.sinks[worker];
        s.starts.push(s.current);
        s.out.extend_from_slice(payload);
        s.current += payload.len() as u64;
    }
}
