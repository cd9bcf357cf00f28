//! Checkpoints and rollbacks across the cluster (spec 2.7, 2.9, 3.4, 3.5): the barrier, the completion with its
//! ACKs and Phase 2s, and the rollback window that ends with RESTART.
use std::collections::BTreeMap;

use bytes::Bytes;

use super::{Cluster, Ec, InFlight, Round, Snapshot};
use crate::protocol::{Frame, TwoPc, U64_MAX, WhereRange};
use crate::sim::dst::pipe::{SinkLink, SrcLink};

impl Cluster {
    /// The checkpoint barrier (spec 2.7, 3.4): sources record last_acked = last_seen, each sink gets Phase 1.
    /// `sink_links` holds each worker's open sink link, if any.
    pub fn barrier(&mut self, sink_links: &mut [Option<&mut SinkLink>]) {
        self.barrier_id += 1;
        let id = self.barrier_id;
        let mut snapshot = Snapshot { streams: self.inactive.clone(), sink_offsets: Vec::new() };
        for c in self.conns.values_mut() {
            for (sid, cs) in c.streams.iter_mut() {
                cs.last_acked = cs.last_seen;
                cs.since_barrier.clear();
                if self.active.contains_key(sid) {
                    snapshot.streams.insert(*sid, cs.last_acked);
                }
            }
        }
        let mut doomed = None;
        for (w, link) in sink_links.iter_mut().enumerate() {
            // Queued output goes out before Phase 1: the round covers everything produced before the barrier.
            if let Some(l) = link.as_deref_mut() {
                self.sink_pump(w, l);
            }
            let s = &mut self.sinks[w];
            snapshot.sink_offsets.push(s.current);
            if std::mem::take(&mut s.abort_next) {
                doomed.get_or_insert_with(|| format!("{}: a 2PC-ready connection dropped earlier", s.name));
                continue;
            }
            match (s.ec == Ec::Ready && s.round.is_none(), link.as_deref_mut()) {
                (true, Some(l)) => {
                    let txn = s.txn_name(id);
                    let where_list = vec![WhereRange { stream_id: 1, start: s.last, end: s.current }];
                    s.round = Some(Round { txn: txn.clone(), end: s.current, vote: None });
                    if let Err(e) = Self::send_2pc(l, TwoPc::Phase1 { txn_id: txn, where_list }) {
                        self.violations.push(e);
                    }
                }
                _ => {
                    doomed.get_or_insert_with(|| format!("{}: sink not 2PC-ready at the barrier", s.name));
                }
            }
        }
        self.checkpoint = Some(InFlight { id, snapshot, doomed });
    }

    /// Takes the in-flight checkpoint's fate: `Err(reason)` if it must abort.
    pub fn take_doom(&self) -> Option<String> {
        self.checkpoint.as_ref().and_then(|c| c.doomed.clone())
    }

    /// Checkpoint completion: one ACK per source connection, Phase 2 commit to every sink.
    pub fn complete(&mut self, src_links: &mut BTreeMap<u64, SrcLink>, sink_links: &mut [Option<&mut SinkLink>]) {
        let Some(cp) = self.checkpoint.take() else { return };
        let id = cp.id;
        let max = self.cfg.max_credits;
        let mut relinquish = Vec::new();
        let mut errs = Vec::new();
        for (&link, c) in self.conns.iter_mut() {
            if !c.streaming {
                continue;
            }
            let mut entries = Vec::new();
            let mut closing = Vec::new();
            for (&sid, cs) in c.streams.iter() {
                match cs.close_on_or_after {
                    Some(at) if at <= id => {
                        entries.push((sid, cs.last_acked));
                        closing.push(sid);
                    }
                    Some(_) => {}
                    None => entries.push((sid, cs.last_acked)),
                }
            }
            for sid in closing {
                if let Some(cs) = c.streams.remove(&sid) {
                    relinquish.push((sid, link, cs.last_acked));
                }
            }
            let add = max.wrapping_sub(c.credits);
            c.credits = max;
            if (add > 0 || !entries.is_empty())
                && let Some(l) = src_links.get_mut(&link)
                && let Err(e) = Self::send_src(l, &Frame::Ack { credits: add, acks: entries }, add)
            {
                errs.push(e);
            }
        }
        for (sid, link, acked) in relinquish {
            if self.active.get(&sid) == Some(&link) {
                self.active.remove(&sid);
                self.inactive.insert(sid, acked);
            }
        }
        for (&sid, &p) in &cp.snapshot.streams {
            if p != U64_MAX {
                let d = self.durable.entry(sid).or_insert(p);
                *d = (*d).max(p);
            }
        }
        for (w, link) in sink_links.iter_mut().enumerate() {
            let s = &mut self.sinks[w];
            let Some(r) = s.round.take() else { continue };
            s.last = r.end;
            s.durable_out = s.out[..r.end as usize].to_vec();
            s.last_txn = Some(r.txn.clone());
            if s.ec == Ec::Ready
                && let Some(l) = link.as_deref_mut()
                && let Err(e) = Self::send_2pc(l, TwoPc::Phase2 { txn_id: r.txn, commit: true })
            {
                errs.push(e);
            }
        }
        self.completed = (id, cp.snapshot);
        self.stats.completed += 1;
        for e in errs {
            self.violation(e);
        }
    }

    /// Rollback starts (a worker crashed, or the checkpoint aborted): every source connection is closed, every
    /// sink connection hard-closed, the in-flight checkpoint dropped (spec 2.9, 3.5).
    /// Returns the sink links to close (the caller closes both ends).
    pub fn start_rollback(&mut self, src_links: &mut BTreeMap<u64, SrcLink>) -> Vec<u64> {
        self.stats.rollbacks += 1;
        self.checkpoint = None;
        self.rolling_back = Some(self.completed.0);
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for link in conns {
            if let Some(l) = src_links.get_mut(&link) {
                self.src_close(link, l, false);
            } else {
                self.conns.remove(&link);
            }
        }
        let mut closed = Vec::new();
        for w in 0..self.sinks.len() {
            if let Some(link) = self.sinks[w].link.take() {
                closed.push(link);
            }
            let s = &mut self.sinks[w];
            s.ec = Ec::Disconnected;
            s.rollback_info = None;
            s.abort_next = false;
            s.round = None;
            s.buf.clear();
        }
        closed
    }

    /// Rollback completes: the registry and the sinks' offsets are restored from the last completed checkpoint;
    /// connections made during the window get RESTART (to `restart_to`, else their own worker), then are closed.
    pub fn complete_rollback(
        &mut self,
        src_links: &mut BTreeMap<u64, SrcLink>,
        sink_links: &mut BTreeMap<u64, SinkLink>,
        restart_to: Option<usize>,
    ) {
        let Some(target) = self.rolling_back.take() else { return };
        let snap = self.completed.1.clone();
        self.active.clear();
        self.inactive = snap.streams.clone();
        for (w, s) in self.sinks.iter_mut().enumerate() {
            let off = snap.sink_offsets.get(w).copied().unwrap_or(0);
            s.current = off;
            s.last = off;
            s.sent = off;
            s.out.truncate(off as usize);
            let keep = s.starts.partition_point(|&o| o < off);
            s.starts.truncate(keep);
            s.rollback_info = Some(target);
        }
        for w in 0..self.sinks.len() {
            if let Some(link) = self.sinks[w].link
                && let Some(l) = sink_links.get_mut(&link)
            {
                self.resolve(w, l);
            }
        }
        let conns: Vec<(u64, usize)> = self.conns.iter().map(|(k, c)| (*k, c.worker)).collect();
        for (link, worker) in conns {
            // RESTART names this worker (same address) or another one (a shrink moving the source, spec 2.9).
            let to = restart_to.unwrap_or(worker);
            let address = Bytes::from(format!("{}:7100", self.cfg.workers[to]));
            if let Some(l) = src_links.get_mut(&link) {
                self.stats.restarts += 1;
                if let Err(e) = Self::send_src(l, &Frame::Restart { address: address.clone() }, 0) {
                    self.violation(e);
                }
                self.src_close(link, l, false);
            }
        }
    }

    /// The committed snapshot's point of reference of a stream, for diagnostics.
    pub fn registry_dump(&self) -> String {
        format!("active={:?} inactive={:?} completed={}", self.active, self.inactive, self.completed.0)
    }
}
