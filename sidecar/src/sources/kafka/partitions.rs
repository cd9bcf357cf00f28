//! The async side's bookkeeping, without I/O: which partitions this member holds, which streams the worker
//! started (and at which generation), what to commit, and the drain of revoked partitions. Every decision of
//! the Kafka source is made here and unit-tested; `mod.rs` only moves messages.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use wallaroo_crds::StartFrom;

use super::consumer::{Control, StartAt};
use crate::runtime::source_api::{Command, Emit, Position, Record, stream_id_for};

/// A topic-partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tp {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl Tp {
    pub fn new(topic: &str, partition: i32) -> Self {
        Self { topic: Arc::from(topic), partition }
    }

    /// The stream this partition is announced as: `topic:partition`.
    pub fn stream_name(&self) -> String {
        format!("{}:{}", self.topic, self.partition)
    }
}

/// Where the worker's position puts the consumer: after point of reference `p` is offset `p + 1`; from the
/// beginning is wherever the group got to (its committed offset), else `startFrom`.
pub fn start_at(from: Position, start_from: StartFrom) -> StartAt {
    match from {
        Position::After(p) => StartAt::Offset(i64::try_from(p.saturating_add(1)).unwrap_or(i64::MAX)),
        Position::Beginning => StartAt::Committed(start_from),
    }
}

#[derive(Debug)]
struct Part {
    tp: Tp,
    /// Assigned to this member by the group.
    owned: bool,
    /// Latest `Start` of the stream not followed by `Finished`: the generation records must carry.
    granted: Option<(u64, Position)>,
    /// Highest point of reference the worker acknowledged.
    acked: Option<u64>,
    /// Last offset handed to the consumer to commit.
    committed: Option<i64>,
    /// EOS requested because the partition is being revoked.
    draining: bool,
}

#[derive(Debug)]
struct Revoke {
    tps: Vec<Tp>,
    waiting: HashSet<u64>,
    deadline: Instant,
}

/// What the async side must do.
#[derive(Debug)]
pub enum Out {
    Emit(Emit),
    Control(Control),
}

#[derive(Debug)]
pub struct Book {
    parts: HashMap<u64, Part>,
    by_tp: HashMap<Tp, u64>,
    start_from: StartFrom,
    revoke: Option<Revoke>,
    stopping: bool,
}

impl Book {
    pub fn new(start_from: StartFrom) -> Self {
        Self { parts: HashMap::new(), by_tp: HashMap::new(), start_from, revoke: None, stopping: false }
    }

    fn part(&mut self, tp: &Tp) -> (u64, &mut Part) {
        let id = *self.by_tp.entry(tp.clone()).or_insert_with(|| stream_id_for(tp.stream_name().as_bytes()));
        let p = self.parts.entry(id).or_insert_with(|| Part {
            tp: tp.clone(),
            owned: false,
            granted: None,
            acked: None,
            committed: None,
            draining: false,
        });
        (id, p)
    }

    pub fn owns(&self, stream: u64) -> bool {
        self.parts.get(&stream).is_some_and(|p| p.owned && !p.draining)
    }

    pub fn name(&self, stream: u64) -> Option<String> {
        self.parts.get(&stream).map(|p| p.tp.stream_name())
    }

    /// While a revoke drains, the consumer thread is blocked in its callback: nothing else comes from it.
    pub fn revoking(&self) -> bool {
        self.revoke.is_some()
    }

    pub fn revoke_deadline(&self) -> Option<Instant> {
        self.revoke.as_ref().map(|r| r.deadline)
    }

    /// The group assigned partitions: announce their streams. A stream the worker already started (and did
    /// not finish) gets no new `Start` from the runtime, so it is started again right here.
    pub fn assigned(&mut self, tps: Vec<Tp>) -> Vec<Out> {
        let start_from = self.start_from;
        let mut out = Vec::new();
        for tp in tps {
            let (_, p) = self.part(&tp);
            p.owned = true;
            p.draining = false;
            out.push(Out::Emit(Emit::Stream { name: tp.stream_name() }));
            if let Some((generation, from)) = p.granted {
                // The worker may have acknowledged beyond the position of that start.
                let from = match (from, p.acked) {
                    (Position::After(a), Some(b)) => Position::After(a.max(b)),
                    (Position::Beginning, Some(b)) => Position::After(b),
                    (f, None) => f,
                };
                out.push(Out::Control(Control::Start {
                    tp: tp.clone(),
                    at: start_at(from, start_from),
                    epoch: generation,
                }));
            }
        }
        out
    }

    /// The group revokes partitions: end their streams and wait (until `deadline`) for the worker to confirm
    /// or acknowledge them. Partitions the worker never started need no drain.
    pub fn revoking_started(&mut self, tps: Vec<Tp>, deadline: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        let mut waiting = HashSet::new();
        for tp in &tps {
            let (id, p) = self.part(tp);
            if let Some((generation, _)) = p.granted
                && p.owned
            {
                p.draining = true;
                waiting.insert(id);
                out.push(Out::Emit(Emit::End { stream: id, generation }));
            }
        }
        self.revoke = Some(Revoke { tps, waiting, deadline });
        out.extend(self.maybe_finish_revoke(false));
        out
    }

    /// The drain deadline passed: let the partitions go with whatever was committed.
    pub fn revoke_timed_out(&mut self) -> Vec<Out> {
        self.maybe_finish_revoke(true)
    }

    fn maybe_finish_revoke(&mut self, force: bool) -> Vec<Out> {
        let done = self.revoke.as_ref().is_some_and(|r| force || r.waiting.is_empty());
        if !done {
            return Vec::new();
        }
        let Some(r) = self.revoke.take() else {
            return Vec::new();
        };
        if !r.waiting.is_empty() {
            tracing::warn!(
                streams = r.waiting.len(),
                "revoke drain timed out; unacknowledged records will be re-read by the new owner"
            );
        }
        for tp in &r.tps {
            let (_, p) = self.part(tp);
            p.owned = false;
            p.draining = false;
            p.committed = None;
        }
        vec![Out::Control(Control::RevokeDone)]
    }

    /// A command from the runtime.
    pub fn command(&mut self, cmd: Command) -> Vec<Out> {
        let start_from = self.start_from;
        let mut out = Vec::new();
        match cmd {
            Command::Start { stream, from, generation } => {
                let Some(p) = self.parts.get_mut(&stream) else {
                    return out;
                };
                p.granted = Some((generation, from));
                if p.owned && !p.draining && !self.stopping {
                    out.push(Out::Control(Control::Start {
                        tp: p.tp.clone(),
                        at: start_at(from, start_from),
                        epoch: generation,
                    }));
                } else if p.draining {
                    // Granted again while its revoke drains (the connection was lost mid-drain): the session keeps
                    // an end request per generation, so the EOS must be asked for again, or the drain waits for
                    // its deadline. Found by the simulation (seed 2660).
                    out.push(Out::Emit(Emit::End { stream, generation }));
                }
            }
            Command::Durable { stream, through } => {
                let Some(p) = self.parts.get_mut(&stream) else {
                    return out;
                };
                p.acked = Some(p.acked.map_or(through, |a| a.max(through)));
                let next = i64::try_from(through.saturating_add(1)).unwrap_or(i64::MAX);
                // Only the member holding the partition may commit for it; never move the group backwards.
                if p.owned && p.committed.is_none_or(|c| next > c) {
                    p.committed = Some(next);
                    out.push(Out::Control(Control::Commit { tp: p.tp.clone(), next_offset: next }));
                }
            }
            Command::Finished { stream } => {
                let Some(p) = self.parts.get_mut(&stream) else {
                    return out;
                };
                p.granted = None;
                if p.draining {
                    if let Some(r) = self.revoke.as_mut() {
                        r.waiting.remove(&stream);
                    }
                    out.extend(self.maybe_finish_revoke(false));
                } else if p.owned && !self.stopping {
                    // Ended by an earlier revoke whose drain timed out, and ours again since: run it again.
                    out.push(Out::Emit(Emit::Stream { name: p.tp.stream_name() }));
                }
            }
        }
        out
    }

    /// Records from the consumer: passed on only for a held, started stream at the current generation.
    pub fn records(&mut self, tp: &Tp, epoch: u64, records: Vec<Record>) -> Option<Emit> {
        if self.stopping {
            return None;
        }
        let id = *self.by_tp.get(tp)?;
        let p = self.parts.get(&id)?;
        match p.granted {
            Some((generation, _)) if generation == epoch && p.owned && !p.draining => {
                Some(Emit::Records { stream: id, generation, records })
            }
            _ => None,
        }
    }

    /// Shutdown: no new records; acknowledgements are still committed.
    pub fn stop_intake(&mut self) {
        self.stopping = true;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn rec(o: u64) -> Record {
        Record { por: o, key: None, payload: Bytes::from(o.to_string()) }
    }

    fn id(tp: &Tp) -> u64 {
        stream_id_for(tp.stream_name().as_bytes())
    }

    #[test]
    fn stream_names_and_start_positions() {
        let tp = Tp::new("orders", 3);
        assert_eq!(tp.stream_name(), "orders:3");
        assert_eq!(start_at(Position::After(41), StartFrom::Earliest), StartAt::Offset(42));
        assert_eq!(start_at(Position::Beginning, StartFrom::Latest), StartAt::Committed(StartFrom::Latest));
    }

    #[test]
    fn assign_announces_and_start_seeks_after_the_worker_position() {
        let mut b = Book::new(StartFrom::Earliest);
        let tp = Tp::new("t", 0);
        let out = b.assigned(vec![tp.clone()]);
        assert!(matches!(&out[..], [Out::Emit(Emit::Stream { name })] if name == "t:0"));
        let out = b.command(Command::Start { stream: id(&tp), from: Position::After(9), generation: 1 });
        assert!(matches!(&out[..], [Out::Control(Control::Start { at: StartAt::Offset(10), epoch: 1, .. })]));
        // Records of the current generation pass, older ones do not.
        assert!(b.records(&tp, 1, vec![rec(10)]).is_some());
        assert!(b.records(&tp, 0, vec![rec(5)]).is_none());
    }

    #[test]
    fn durable_commits_next_offset_once_and_only_forward() {
        let mut b = Book::new(StartFrom::Earliest);
        let tp = Tp::new("t", 1);
        b.assigned(vec![tp.clone()]);
        b.command(Command::Start { stream: id(&tp), from: Position::Beginning, generation: 1 });
        let out = b.command(Command::Durable { stream: id(&tp), through: 7 });
        assert!(matches!(&out[..], [Out::Control(Control::Commit { next_offset: 8, .. })]));
        assert!(b.command(Command::Durable { stream: id(&tp), through: 7 }).is_empty());
        assert!(b.command(Command::Durable { stream: id(&tp), through: 3 }).is_empty());
    }

    #[test]
    fn no_commit_for_partitions_not_held() {
        let mut b = Book::new(StartFrom::Earliest);
        let tp = Tp::new("t", 2);
        b.assigned(vec![tp.clone()]);
        b.command(Command::Start { stream: id(&tp), from: Position::Beginning, generation: 1 });
        let out = b.revoking_started(vec![tp.clone()], Instant::now());
        assert!(matches!(&out[..], [Out::Emit(Emit::End { generation: 1, .. })]));
        let out = b.revoke_timed_out();
        assert!(matches!(&out[..], [Out::Control(Control::RevokeDone)]));
        assert!(b.command(Command::Durable { stream: id(&tp), through: 4 }).is_empty());
    }

    #[test]
    fn revoke_waits_for_finished_and_commits_durable_meanwhile() {
        let mut b = Book::new(StartFrom::Earliest);
        let (a, c) = (Tp::new("t", 0), Tp::new("t", 1));
        b.assigned(vec![a.clone(), c.clone()]);
        b.command(Command::Start { stream: id(&a), from: Position::Beginning, generation: 1 });
        // c was never started: nothing to drain for it.
        let out = b.revoking_started(vec![a.clone(), c.clone()], Instant::now() + Duration::from_secs(10));
        assert_eq!(out.len(), 1);
        assert!(b.revoking());
        assert!(b.records(&a, 1, vec![rec(1)]).is_none(), "no records after the end was requested");
        let out = b.command(Command::Durable { stream: id(&a), through: 20 });
        assert!(matches!(&out[..], [Out::Control(Control::Commit { next_offset: 21, .. })]));
        let out = b.command(Command::Finished { stream: id(&a) });
        assert!(matches!(&out[..], [Out::Control(Control::RevokeDone)]));
        assert!(!b.revoking());
        assert!(!b.owns(id(&a)));
    }

    #[test]
    fn a_stream_granted_again_while_draining_is_ended_again() {
        // Simulation seed 2660: the revoke's EOS was queued, the connection was lost (RESTART), the stream was
        // granted again at a new generation, and without a new end request the drain never completed.
        let mut b = Book::new(StartFrom::Earliest);
        let tp = Tp::new("t", 0);
        b.assigned(vec![tp.clone()]);
        b.command(Command::Start { stream: id(&tp), from: Position::Beginning, generation: 1 });
        b.revoking_started(vec![tp.clone()], Instant::now() + Duration::from_secs(10));
        let out = b.command(Command::Start { stream: id(&tp), from: Position::After(12), generation: 2 });
        assert!(matches!(&out[..], [Out::Emit(Emit::End { generation: 2, .. })]), "{out:?}");
        let out = b.command(Command::Finished { stream: id(&tp) });
        assert!(matches!(&out[..], [Out::Control(Control::RevokeDone)]));
    }

    #[test]
    fn revoke_of_unstarted_partitions_completes_at_once() {
        let mut b = Book::new(StartFrom::Earliest);
        let tp = Tp::new("t", 0);
        b.assigned(vec![tp.clone()]);
        let out = b.revoking_started(vec![tp], Instant::now());
        assert!(matches!(&out[..], [Out::Control(Control::RevokeDone)]));
    }

    #[test]
    fn reassigned_stream_that_is_still_open_restarts_from_the_acked_point() {
        let mut b = Book::new(StartFrom::Earliest);
        let tp = Tp::new("t", 0);
        b.assigned(vec![tp.clone()]);
        b.command(Command::Start { stream: id(&tp), from: Position::After(3), generation: 2 });
        b.command(Command::Durable { stream: id(&tp), through: 50 });
        b.revoking_started(vec![tp.clone()], Instant::now());
        b.revoke_timed_out();
        // Assigned again before the worker confirmed the EOS: restart ourselves at the same generation.
        let out = b.assigned(vec![tp.clone()]);
        assert!(matches!(&out[1], Out::Control(Control::Start { at: StartAt::Offset(51), epoch: 2, .. })));
        // If the EOS is confirmed later, the stream is announced again to get a fresh start.
        let out = b.command(Command::Finished { stream: id(&tp) });
        assert!(matches!(&out[..], [Out::Emit(Emit::Stream { .. })]));
    }

    #[test]
    fn shutdown_stops_records_but_keeps_committing() {
        let mut b = Book::new(StartFrom::Latest);
        let tp = Tp::new("t", 0);
        b.assigned(vec![tp.clone()]);
        b.command(Command::Start { stream: id(&tp), from: Position::Beginning, generation: 1 });
        b.stop_intake();
        assert!(b.records(&tp, 1, vec![rec(1)]).is_none());
        assert_eq!(b.command(Command::Durable { stream: id(&tp), through: 1 }).len(), 1);
    }
}
