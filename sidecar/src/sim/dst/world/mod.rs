//! The seeded scheduler: every step picks one enabled event (a byte chunk delivered in either direction, a
//! connector or worker action, a checkpoint step, or a fault drawn from the seed), applies it, and checks the
//! invariants. Nothing here reads a clock, spawns a thread or iterates a hash map, so a seed replays bit for bit.
mod checks;
mod config;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

pub use config::{Config, Faults, Report, Violation};

use super::cluster::{Cluster, ClusterConfig, Ec};
use super::connectors::{SinkConnector, SourceConnector};
use super::log::PartitionedLog;
use super::pipe::{SinkLink, SrcLink};
use super::rng::{Rng, TraceHash};
use super::store::MemStore;
use crate::protocol::sink::SinkSessionConfig;
use crate::protocol::source::SourceSessionConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    SrcToWorker(u64),
    SrcToConn(u64),
    WorkerSeesClose(u64),
    ConnSeesClose(u64),
    SinkToSink(u64),
    SinkToWorker(u64),
    Connect,
    Read(usize),
    Pump,
    SinkPump(usize),
    SinkConnect(usize),
    Barrier,
    Decide,
    RollbackDone,
    Revoke,
    SrcDrop,
    SinkDrop(usize),
    SrcCrash,
    SinkCrash,
    WorkerCrash,
    Outage,
    Refuse,
    Gap(usize),
    DupPhase2(usize),
    UnknownPhase2(usize),
}

struct World {
    cfg: Config,
    rng: Rng,
    step: u64,
    hash: TraceHash,
    tail: VecDeque<String>,
    log: PartitionedLog,
    cluster: Cluster,
    src: SourceConnector,
    sink: SinkConnector,
    store: Arc<MemStore>,
    src_links: BTreeMap<u64, SrcLink>,
    sink_links: BTreeMap<u64, SinkLink>,
    next_link: u64,
    violations: Vec<Violation>,
    started: bool,
    outage: bool,
}

const TAIL: usize = 40;

/// Runs one simulation, fully determined by `seed`.
pub fn run(seed: u64) -> Report {
    run_config(Config::from_seed(seed))
}

pub fn run_config(cfg: Config) -> Report {
    let mut w = World::new(cfg);
    w.run()
}

impl World {
    fn new(cfg: Config) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let store_rng = rng.fork();
        let cookie = crate::runtime_default_cookie().to_string();
        let workers: Vec<String> = (0..cfg.workers).map(|i| format!("w{i}")).collect();
        let mut log = PartitionedLog::new(&cfg.records);
        let cluster = Cluster::new(ClusterConfig {
            workers,
            cookie: cookie.clone(),
            app: "dst".into(),
            max_credits: cfg.max_credits,
            refill_credits: cfg.refill_credits,
        });
        let src = SourceConnector::new(
            SourceSessionConfig {
                version: crate::protocol::SOURCE_VERSION.into(),
                cookie: cookie.clone(),
                program_name: "dst".into(),
                instance_name: "src-0".into(),
            },
            cfg.records.len(),
            cfg.configured,
            &mut log,
        );
        let store = Arc::new(MemStore::new(store_rng));
        let sink = SinkConnector::new(
            SinkSessionConfig { cookie, ..SinkSessionConfig::default() },
            store.clone(),
            cfg.sink_attempts,
        );
        Self {
            cfg,
            rng,
            step: 0,
            hash: TraceHash::default(),
            tail: VecDeque::new(),
            log,
            cluster,
            src,
            sink,
            store,
            src_links: BTreeMap::new(),
            sink_links: BTreeMap::new(),
            next_link: 1,
            violations: Vec::new(),
            started: false,
            outage: false,
        }
    }

    fn faulty(&self) -> bool {
        self.step < self.cfg.fault_steps
    }

    fn run(&mut self) -> Report {
        let mut finished = false;
        while self.step < self.cfg.max_steps {
            self.step += 1;
            if self.step == self.cfg.fault_steps {
                // Faults stop: the external system recovers for good.
                self.outage = false;
                self.store.with(|s| {
                    s.outage = false;
                    s.refuse = 0;
                });
            }
            let kinds = self.enabled();
            let Some(kind) = self.pick(&kinds) else {
                self.violate("no event is enabled (deadlock)".into());
                break;
            };
            let line = self.apply(kind);
            self.hash.add(line.as_bytes());
            self.tail.push_back(format!("step {}: {line}", self.step));
            if self.tail.len() > TAIL && !self.cfg.full_trace {
                self.tail.pop_front();
            }
            self.collect();
            self.check_step();
            if !self.violations.is_empty() {
                break;
            }
            if !self.faulty() && self.done() {
                finished = true;
                break;
            }
        }
        if self.violations.is_empty() {
            if finished {
                self.check_end();
            } else {
                let diag = self.diagnose();
                self.violate(format!(
                    "streams did not finish within {} steps after faults stopped: {diag}",
                    self.cfg.max_steps
                ));
            }
        }
        let st = &self.cluster.stats;
        let summary = format!(
            "workers={} records={:?} credits={}/{} faults_until={} completed={} rollbacks={} restarts={} processed={} refused={}",
            self.cfg.workers,
            self.cfg.records,
            self.cfg.max_credits,
            self.cfg.refill_credits,
            self.cfg.fault_steps,
            st.completed,
            st.rollbacks,
            st.restarts,
            st.processed,
            st.refused
        );
        self.hash.add(summary.as_bytes());
        Report {
            seed: self.cfg.seed,
            steps: self.step,
            hash: self.hash.0,
            violations: self.violations.clone(),
            tail: self.tail.iter().cloned().collect(),
            summary,
        }
    }

    fn violate(&mut self, what: String) {
        self.violations.push(Violation { step: self.step, what });
    }

    fn collect(&mut self) {
        let mut found: Vec<String> = std::mem::take(&mut self.cluster.violations);
        found.append(&mut self.src.violations);
        found.append(&mut self.sink.violations);
        found.extend(self.store.with(|s| std::mem::take(&mut s.violations)));
        for f in found {
            self.violate(f);
        }
    }

    fn enabled(&self) -> Vec<(Kind, u64)> {
        let mut k = Vec::new();
        for (&id, l) in &self.src_links {
            if l.worker_alive && !l.to_worker.is_empty() {
                k.push((Kind::SrcToWorker(id), 20));
            }
            if l.conn_alive && !l.to_conn.is_empty() && !l.closed_by_conn {
                k.push((Kind::SrcToConn(id), 20));
            }
            if l.closed_by_conn && l.worker_alive && l.to_worker.is_empty() {
                k.push((Kind::WorkerSeesClose(id), 8));
            }
            if l.closed_by_worker && l.conn_alive && l.to_conn.is_empty() {
                k.push((Kind::ConnSeesClose(id), 8));
            }
        }
        for (&id, l) in &self.sink_links {
            if !l.to_sink.is_empty() {
                k.push((Kind::SinkToSink(id), 20));
            }
            if !l.to_worker.is_empty() {
                k.push((Kind::SinkToWorker(id), 20));
            }
        }
        if self.src.link.is_none() {
            k.push((Kind::Connect, 5));
        }
        for p in self.src.readable(&self.log) {
            k.push((Kind::Read(p), 6));
        }
        if self.src.link.is_some() && self.src.session.can_send() && self.src.has_buffered() {
            k.push((Kind::Pump, 12));
        }
        let rolling = self.cluster.rolling_back.is_some();
        for (w, s) in self.cluster.sinks.iter().enumerate() {
            if self.cluster.sink_can_pump(w) {
                k.push((Kind::SinkPump(w), 8));
            }
            if s.link.is_none() {
                k.push((Kind::SinkConnect(w), 5));
            }
        }
        let idle = !rolling && !self.cluster.checkpoint_in_flight();
        let sinks = &self.cluster.sinks;
        if idle && self.started {
            // After faults stop, a barrier waits for sinks that are still connecting (one that needs a rollback to
            // resolve its pending transaction, or that must abort, gets it).
            let quiet_ok = sinks.iter().all(|s| s.ec == Ec::Ready)
                || sinks.iter().any(|s| matches!(s.ec, Ec::WaitingRollback(_)) || s.abort_next);
            if self.faulty() || quiet_ok {
                k.push((Kind::Barrier, 2));
            }
        }
        if self.cluster.decidable() {
            k.push((Kind::Decide, 6));
        }
        if rolling {
            k.push((Kind::RollbackDone, 3));
        }
        if !self.faulty() && self.revoke_ready() {
            k.push((Kind::Revoke, 10));
        }
        if self.faulty() {
            let f = self.cfg.faults;
            if f.src_drop && self.src.link.is_some() {
                k.push((Kind::SrcDrop, 1));
            }
            if f.src_crash {
                k.push((Kind::SrcCrash, 1));
            }
            if f.sink_crash {
                k.push((Kind::SinkCrash, 1));
            }
            if f.worker_crash && !rolling {
                k.push((Kind::WorkerCrash, 1));
            }
            if f.outage {
                k.push((Kind::Outage, 1));
            }
            if f.refuse {
                k.push((Kind::Refuse, 1));
            }
            for (w, s) in sinks.iter().enumerate() {
                if f.sink_drop && s.link.is_some() {
                    k.push((Kind::SinkDrop(w), 1));
                }
                if f.gap && s.unsent() {
                    k.push((Kind::Gap(w), 1));
                }
                if f.phase2_noise && s.ec == Ec::Ready && !s.round_open() {
                    k.push((Kind::DupPhase2(w), 1));
                    k.push((Kind::UnknownPhase2(w), 1));
                }
            }
        }
        k
    }

    fn revoke_ready(&self) -> bool {
        !self.src.revoke_started
            && self.cluster.rolling_back.is_none()
            && !self.cluster.checkpoint_in_flight()
            && self.src.session.is_streaming()
            && self.src.open.len() == self.src.partitions()
            && self.cluster.sinks.iter().all(|s| s.ec == Ec::Ready && !s.abort_next)
            && (0..self.log.partitions.len())
                .all(|p| self.log.committed[p].is_some_and(|c| c >= self.log.len(p) as i64))
    }

    fn pick(&mut self, kinds: &[(Kind, u64)]) -> Option<Kind> {
        let total: u64 = kinds.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut x = self.rng.below(total);
        for (k, w) in kinds {
            if x < *w {
                return Some(*k);
            }
            x -= w;
        }
        None
    }

    /// A chunk size: often everything queued, otherwise cut at an arbitrary byte.
    fn chunk(&mut self, len: usize) -> usize {
        if self.rng.chance(1, 2) { len } else { self.rng.range(1, len as u64) as usize }
    }

    fn new_link(&mut self) -> u64 {
        let id = self.next_link;
        self.next_link += 1;
        id
    }

    /// The connector side closes its source connection; the worker notices once it read what was sent before.
    fn conn_close(&mut self, link: u64) {
        if let Some(l) = self.src_links.get_mut(&link) {
            l.closed_by_conn = true;
            l.conn_alive = false;
            l.to_conn.clear();
        }
        if self.src.link == Some(link) {
            self.src.disconnected();
        }
        self.gc_links();
    }

    fn gc_links(&mut self) {
        self.src_links.retain(|_, l| l.worker_alive || l.conn_alive);
    }

    fn sink_link_close(&mut self, link: u64) {
        if let Some(l) = self.sink_links.remove(&link) {
            self.sink.drop_conn(link);
            self.cluster.sink_closed(l.worker);
        }
    }

    fn write_src_output(&mut self) {
        if self.src.want_close {
            if let Some(link) = self.src.link {
                self.conn_close(link);
            }
            return;
        }
        let out = self.src.session.take_output();
        if let Some(link) = self.src.link
            && let Some(l) = self.src_links.get_mut(&link)
            && !out.is_empty()
        {
            l.to_worker.push(&out);
        }
    }

    fn with_sink_links<T>(
        &mut self,
        f: impl FnOnce(&mut Cluster, &mut [Option<&mut SinkLink>], &mut BTreeMap<u64, SrcLink>) -> T,
    ) -> T {
        let mut by_id: BTreeMap<u64, &mut SinkLink> = self.sink_links.iter_mut().map(|(k, v)| (*k, v)).collect();
        let mut per: Vec<Option<&mut SinkLink>> =
            self.cluster.sinks.iter().map(|s| s.link.and_then(|id| by_id.remove(&id))).collect();
        f(&mut self.cluster, &mut per, &mut self.src_links)
    }

    fn rollback(&mut self) {
        let closed = self.cluster.start_rollback(&mut self.src_links);
        for link in closed {
            self.sink_links.remove(&link);
            self.sink.drop_conn(link);
        }
        self.gc_links();
    }

    fn apply(&mut self, kind: Kind) -> String {
        match kind {
            Kind::SrcToWorker(id) => {
                let n = self.src_links.get(&id).map_or(0, |l| l.to_worker.len());
                let n = self.chunk(n);
                let Some(l) = self.src_links.get_mut(&id) else { return String::new() };
                let (chunk, _) = l.to_worker.take(n);
                self.cluster.src_receive(id, l, &chunk);
                self.gc_links();
                format!("src link {id} -> worker {} bytes", chunk.len())
            }
            Kind::SrcToConn(id) => {
                let n = self.src_links.get(&id).map_or(0, |l| l.to_conn.len());
                let n = self.chunk(n);
                let Some(l) = self.src_links.get_mut(&id) else { return String::new() };
                let (chunk, credits) = l.to_conn.take(n);
                self.cluster.src_credits_delivered(id, credits);
                if self.src.link == Some(id) {
                    self.src.on_bytes(&chunk, &mut self.log);
                    self.write_src_output();
                }
                format!("src link {id} -> connector {} bytes ({credits} credits)", chunk.len())
            }
            Kind::WorkerSeesClose(id) => {
                if let Some(l) = self.src_links.get_mut(&id) {
                    self.cluster.src_closed_by_peer(id, l);
                }
                self.gc_links();
                format!("worker sees src link {id} closed")
            }
            Kind::ConnSeesClose(id) => {
                if let Some(l) = self.src_links.get_mut(&id) {
                    l.conn_alive = false;
                }
                if self.src.link == Some(id) {
                    self.src.disconnected();
                }
                self.gc_links();
                format!("connector sees src link {id} closed")
            }
            Kind::SinkToSink(id) => {
                let n = self.sink_links.get(&id).map_or(0, |l| l.to_sink.len());
                let n = self.chunk(n);
                let Some(l) = self.sink_links.get_mut(&id) else { return String::new() };
                let (chunk, _) = l.to_sink.take(n);
                let (out, close) = self.sink.on_bytes(id, &chunk);
                if let Some(l) = self.sink_links.get_mut(&id) {
                    l.to_worker.push(&out);
                }
                if let Some(reason) = &close {
                    self.sink_link_close(id);
                    return format!("sink link {id} -> sink {} bytes; sink closes: {reason}", chunk.len());
                }
                format!("sink link {id} -> sink {} bytes, {} back", chunk.len(), out.len())
            }
            Kind::SinkToWorker(id) => {
                let n = self.sink_links.get(&id).map_or(0, |l| l.to_worker.len());
                let n = self.chunk(n);
                let Some(l) = self.sink_links.get_mut(&id) else { return String::new() };
                let (chunk, _) = l.to_worker.take(n);
                let w = l.worker;
                self.cluster.sink_receive(w, l, &chunk);
                if self.cluster.sinks.iter().all(|s| s.ec == Ec::Ready) {
                    self.started = true;
                }
                format!("sink link {id} -> worker {w} {} bytes", chunk.len())
            }
            Kind::Connect => {
                let id = self.new_link();
                let w = self.src.target;
                self.src_links.insert(id, SrcLink::new(w));
                self.cluster.src_accept(id, w);
                self.src.connected(id);
                self.write_src_output();
                format!("connector connects to w{w} (link {id})")
            }
            Kind::Read(p) => {
                let n = self.rng.range(1, 5);
                self.src.read(p, n, &self.log);
                format!("integration reads {n} of partition {p}")
            }
            Kind::Pump => {
                let before = self.src.sent;
                self.src.pump();
                self.src.handle_events(&mut self.log);
                self.write_src_output();
                format!("connector sends {} records", self.src.sent - before)
            }
            Kind::SinkPump(w) => {
                if let Some(link) = self.cluster.sinks[w].link
                    && let Some(l) = self.sink_links.get_mut(&link)
                {
                    self.cluster.sink_pump(w, l);
                }
                format!("worker {w} sends its output")
            }
            Kind::SinkConnect(w) => {
                let id = self.new_link();
                let mut l = SinkLink { worker: w, ..Default::default() };
                self.sink.accept(id);
                self.cluster.sink_connect(w, id, &mut l);
                self.sink_links.insert(id, l);
                format!("worker {w} sink connects (link {id})")
            }
            Kind::Barrier => {
                self.with_sink_links(|c, per, _| c.barrier(per));
                format!("barrier; doomed: {:?}", self.cluster.take_doom())
            }
            Kind::Decide => {
                if let Some(reason) = self.cluster.take_doom() {
                    self.rollback();
                    return format!("checkpoint aborts ({reason}): rollback starts");
                }
                if self.cfg.faults.other_abort && self.faulty() && self.rng.chance(1, 8) {
                    self.rollback();
                    return "another participant aborts the checkpoint: rollback starts".into();
                }
                self.with_sink_links(|c, per, src| c.complete(src, per));
                format!("checkpoint {} completes", self.cluster.completed_id())
            }
            Kind::RollbackDone => {
                let to = if self.cfg.faults.restart_other && self.rng.chance(1, 2) {
                    Some(self.rng.below(self.cfg.workers as u64) as usize)
                } else {
                    None
                };
                self.cluster.complete_rollback(&mut self.src_links, &mut self.sink_links, to);
                self.gc_links();
                format!("rollback to checkpoint {} completes; RESTART to {to:?}", self.cluster.completed_id())
            }
            Kind::Revoke => {
                self.src.revoke_all(&mut self.log);
                self.write_src_output();
                "group revokes every partition (streams end)".into()
            }
            Kind::SrcDrop => {
                if let Some(link) = self.src.link {
                    self.conn_close(link);
                }
                "fault: source connection drops".into()
            }
            Kind::SinkDrop(w) => {
                if let Some(link) = self.cluster.sinks[w].link {
                    self.sink_link_close(link);
                }
                format!("fault: sink connection of w{w} drops")
            }
            Kind::SrcCrash => {
                if let Some(link) = self.src.link {
                    self.conn_close(link);
                }
                self.src.crash(&mut self.log);
                "fault: source sidecar crashes".into()
            }
            Kind::SinkCrash => {
                for link in self.sink.crash() {
                    if let Some(l) = self.sink_links.remove(&link) {
                        self.cluster.sink_closed(l.worker);
                    }
                }
                "fault: sink sidecar crashes".into()
            }
            Kind::WorkerCrash => {
                self.rollback();
                "fault: a worker crashes: rollback starts".into()
            }
            Kind::Outage => {
                self.outage = !self.outage;
                let on = self.outage;
                self.store.with(|s| s.outage = on);
                format!("fault: store outage {}", if on { "starts" } else { "ends" })
            }
            Kind::Refuse => {
                self.store.with(|s| s.refuse += 1);
                "fault: the store refuses the next write".into()
            }
            Kind::Gap(w) => {
                self.cluster.sinks[w].lose_next = true;
                format!("fault: w{w} drops its next record while counting it")
            }
            Kind::DupPhase2(w) => {
                if let Some(link) = self.cluster.sinks[w].link
                    && let Some(l) = self.sink_links.get_mut(&link)
                {
                    self.cluster.sink_dup_phase2(w, l);
                }
                format!("fault: w{w} repeats its last Phase 2")
            }
            Kind::UnknownPhase2(w) => {
                let commit = self.rng.chance(1, 2);
                if let Some(link) = self.cluster.sinks[w].link
                    && let Some(l) = self.sink_links.get_mut(&link)
                {
                    self.cluster.sink_unknown_phase2(w, l, commit);
                }
                format!("fault: w{w} sends Phase 2 ({commit}) for an unknown transaction")
            }
        }
    }
}
