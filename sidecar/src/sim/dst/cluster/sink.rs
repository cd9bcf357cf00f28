//! The worker's sink side (spec 3.2-3.3, 3.5, 3.7): the intro, byte-offset data behind the valve, the 2PC
//! replies it accepts, and the resolution of a listed transaction after a rollback.
use bytes::Bytes;

use super::{Cluster, Ec, decode_frames};
use crate::protocol::{Frame, Hello, Message, SINK_VERSION, TwoPc};
use crate::sim::dst::pipe::SinkLink;

impl Cluster {
    /// The worker's sink connects and sends the intro (spec 3.2).
    pub fn sink_connect(&mut self, w: usize, link: u64, l: &mut SinkLink) {
        let app = self.cfg.app.clone();
        let cookie = self.cfg.cookie.clone();
        let s = &mut self.sinks[w];
        s.link = Some(link);
        s.ec = Ec::Intro { ok: false, notify_ack: false };
        s.buf.clear();
        s.rtag += 1;
        let frames = [
            Frame::Hello(Hello {
                version: Bytes::from_static(SINK_VERSION.as_bytes()),
                cookie: Bytes::from(cookie),
                program_name: Bytes::from(app),
                instance_name: Bytes::from(s.name.clone()),
            }),
            Frame::Notify { stream_id: 1, stream_name: Bytes::from(s.stream_name.clone()), point_of_ref: s.current },
            match (TwoPc::ListUncommitted { rtag: s.rtag }).to_frame() {
                Ok(f) => f,
                Err(e) => return self.violation(e.to_string()),
            },
        ];
        for f in &frames {
            if let Err(e) = l.to_sink.push_frame(f, 0) {
                self.violation(e);
            }
        }
    }

    /// The sink connection is gone (either side). A 2PC-ready connection forces an abort (spec 3.5).
    pub fn sink_closed(&mut self, w: usize) {
        let s = &mut self.sinks[w];
        s.link = None;
        let was_ready = s.ec == Ec::Ready;
        s.ec = Ec::Disconnected;
        s.rollback_info = None;
        s.buf.clear();
        if was_ready && self.rolling_back.is_none() {
            match (&s.round, self.checkpoint.as_mut()) {
                (Some(r), Some(cp)) if r.vote.is_none() => {
                    cp.doomed.get_or_insert_with(|| format!("sink connection of {} dropped during Phase 1", s.name));
                }
                _ => s.abort_next = true,
            }
        }
    }

    pub(super) fn send_2pc(l: &mut SinkLink, msg: TwoPc) -> Result<(), String> {
        let f = msg.to_frame().map_err(|e| e.to_string())?;
        l.to_sink.push_frame(&f, 0)
    }

    pub fn sink_receive(&mut self, w: usize, l: &mut SinkLink, chunk: &[u8]) {
        self.sinks[w].buf.extend_from_slice(chunk);
        let frames = match decode_frames(&mut self.sinks[w].buf) {
            Ok(f) => f,
            Err(e) => return self.violation(format!("worker {w}: undecodable frame from the sink: {e}")),
        };
        for f in frames {
            self.sink_frame(w, l, f);
        }
    }

    pub(super) fn sink_frame(&mut self, w: usize, l: &mut SinkLink, frame: Frame) {
        let name = self.sinks[w].name.clone();
        let ec = self.sinks[w].ec.clone();
        match (ec, frame) {
            (Ec::Intro { ok: false, notify_ack: false }, Frame::Ok { initial_credits }) => {
                if initial_credits < 2 {
                    self.violation(format!("{name}: OK with {initial_credits} credits (HEY, too few credits)"));
                }
                self.sinks[w].ec = Ec::Intro { ok: true, notify_ack: false };
            }
            (Ec::Intro { ok: true, notify_ack: false }, Frame::NotifyAck { success, stream_id, .. }) => {
                if !success || stream_id != 1 {
                    self.violation(format!("{name}: NOTIFY_ACK({success}, {stream_id})"));
                }
                self.sinks[w].ec = Ec::Intro { ok: true, notify_ack: true };
            }
            (Ec::Intro { ok: true, notify_ack: true }, Frame::Message(m)) if m.stream_id == 0 => {
                match TwoPc::decode(m.payload) {
                    Ok(TwoPc::ReplyUncommitted { txn_ids, .. }) => match txn_ids.len() {
                        0 => self.sinks[w].ec = Ec::Ready,
                        1 => {
                            self.sinks[w].ec = Ec::WaitingRollback(txn_ids[0].clone());
                            self.resolve(w, l);
                        }
                        n => self.violation(format!("{name}: {n} uncommitted transactions (the worker requires one)")),
                    },
                    other => self.violation(format!("{name}: expected ReplyUncommitted, got {other:?}")),
                }
            }
            (Ec::Ready, Frame::Message(Message { stream_id: 0, payload, .. })) => match TwoPc::decode(payload) {
                Ok(TwoPc::Reply { txn_id, commit }) => {
                    let s = &mut self.sinks[w];
                    match s.round.as_mut() {
                        Some(r) if r.vote.is_none() && r.txn == txn_id => {
                            r.vote = Some(commit);
                            if !commit && let Some(cp) = self.checkpoint.as_mut() {
                                cp.doomed.get_or_insert_with(|| format!("{name} voted abort"));
                            }
                        }
                        Some(r) if r.vote.is_none() => {
                            let want = String::from_utf8_lossy(&r.txn).into_owned();
                            self.violation(format!(
                                "{name}: reply for {} while waiting for {want} (the worker would Fail())",
                                String::from_utf8_lossy(&txn_id)
                            ));
                        }
                        _ => self.violation(format!(
                            "{name}: stray TwoPCReply for {} with no Phase 1 waiting",
                            String::from_utf8_lossy(&txn_id)
                        )),
                    }
                }
                other => self.violation(format!("{name}: stray 2PC message from the sink: {other:?}")),
            },
            (ec, f) => self.violation(format!("{name}: {} from the sink while {ec:?}", f.name())),
        }
    }

    /// WaitingForRollbackPayload: Phase 2 for the listed txn, commit iff it is the rollback checkpoint's.
    pub(super) fn resolve(&mut self, w: usize, l: &mut SinkLink) {
        let s = &mut self.sinks[w];
        let (Ec::WaitingRollback(txn), Some(rb)) = (s.ec.clone(), s.rollback_info) else { return };
        let commit = txn == s.txn_name(rb);
        s.ec = Ec::Ready;
        if let Err(e) = Self::send_2pc(l, TwoPc::Phase2 { txn_id: txn, commit }) {
            self.violation(e);
        }
    }

    /// Writes the output produced since the last send, if the valve is open.
    pub fn sink_pump(&mut self, w: usize, l: &mut SinkLink) {
        if self.rolling_back.is_some() {
            return;
        }
        let s = &mut self.sinks[w];
        if s.ec != Ec::Ready || s.round.is_some() {
            return;
        }
        let first = s.starts.partition_point(|&o| o < s.sent);
        let mut errs = Vec::new();
        for i in first..s.starts.len() {
            let start = s.starts[i];
            let end = s.starts.get(i + 1).copied().unwrap_or(s.current);
            if std::mem::take(&mut s.lose_next) {
                continue;
            }
            let (a, b) = (start as usize, end as usize);
            let f = Frame::Message(Message {
                stream_id: 1,
                message_id: start,
                event_time: 0,
                key: None,
                payload: Bytes::copy_from_slice(&s.out[a..b]),
            });
            if let Err(e) = l.to_sink.push_frame(&f, 0) {
                errs.push(e);
            }
        }
        s.sent = s.current;
        for e in errs {
            self.violation(e);
        }
    }

    pub fn sink_can_pump(&self, w: usize) -> bool {
        let s = &self.sinks[w];
        self.rolling_back.is_none() && s.ec == Ec::Ready && s.round.is_none() && s.unsent()
    }

    /// Fault: Phase 2 commit of the last completed round sent again (the sink must ignore it silently).
    pub fn sink_dup_phase2(&mut self, w: usize, l: &mut SinkLink) {
        let s = &self.sinks[w];
        if s.ec != Ec::Ready || s.round.is_some() {
            return;
        }
        if let Some(txn) = s.last_txn.clone()
            && let Err(e) = Self::send_2pc(l, TwoPc::Phase2 { txn_id: txn, commit: true })
        {
            self.violation(e);
        }
    }

    /// Fault: Phase 2 for a transaction the sink never saw.
    pub fn sink_unknown_phase2(&mut self, w: usize, l: &mut SinkLink, commit: bool) {
        let s = &self.sinks[w];
        if s.ec != Ec::Ready || s.round.is_some() {
            return;
        }
        let txn = s.txn_name(self.barrier_id + 1000);
        if let Err(e) = Self::send_2pc(l, TwoPc::Phase2 { txn_id: txn, commit }) {
            self.violation(e);
        }
    }
}
