//! The invariants: after every step, and at the end of a run (see docs/testing.md, "What is checked").
use std::collections::BTreeMap;

use super::World;
use crate::protocol::U64_MAX;
use crate::sim::dst::cluster::Origin;
use crate::sim::dst::log::parse_records;

impl World {
    /// Invariants that hold after every step.
    pub(super) fn check_step(&mut self) {
        // Sources never commit upstream past what the worker made durable.
        for p in 0..self.log.partitions.len() {
            let Some(next) = self.log.committed[p] else { continue };
            let Some(sid) = self.src.stream_of(p) else { continue };
            let durable_next = self.cluster.durable.get(&sid).map_or(0, |d| *d as i64 + 1);
            if next > durable_next {
                self.violate(format!(
                    "partition {p}: group offset committed at {next}, but the worker made only offsets < {durable_next} durable"
                ));
            }
        }
        // The store's committed data is a prefix of what the worker checkpointed: nothing from an aborted round.
        let mut bad = Vec::new();
        self.store.with(|s| {
            for sink in &self.cluster.sinks {
                let committed = s.workers.get(&sink.name).map(|d| d.committed.as_slice()).unwrap_or(&[]);
                if committed.len() > sink.durable_out.len() || committed != &sink.durable_out[..committed.len()] {
                    bad.push(format!(
                        "{}: the store committed {} bytes that are not the worker's checkpointed output ({} bytes): {:?} vs {:?}",
                        sink.name,
                        committed.len(),
                        sink.durable_out.len(),
                        String::from_utf8_lossy(committed),
                        String::from_utf8_lossy(&sink.durable_out)
                    ));
                }
            }
        });
        for b in bad {
            self.violate(b);
        }
    }

    pub(super) fn done(&self) -> bool {
        self.src.revoked
            && self.src.session.all_finished()
            && !self.cluster.checkpoint_in_flight()
            && self.cluster.rolling_back.is_none()
            && self.src_links.values().all(|l| l.to_worker.is_empty() && l.to_conn.is_empty())
            && self.sink_links.values().all(|l| l.to_worker.is_empty() && l.to_sink.is_empty())
            && self.store.with(|s| {
                self.cluster.sinks.iter().all(|k| {
                    let d = s.workers.get(&k.name);
                    k.last == k.current
                        && d.is_none_or(|d| d.pending.is_none())
                        && d.map_or(0, |d| d.committed.len() as u64) == k.last
                })
            })
    }

    pub(super) fn diagnose(&self) -> String {
        format!(
            "revoke_started={} streaming={} credits={} revoked={} all_finished={} open={:?} committed={:?} sizes={:?} rolling_back={:?} in_flight={} sinks={:?} links={} registry: {}",
            self.src.revoke_started,
            self.src.session.is_streaming(),
            self.src.session.credits(),
            self.src.revoked,
            self.src.session.all_finished(),
            self.src.open,
            self.log.committed,
            self.cfg.records,
            self.cluster.rolling_back,
            self.cluster.checkpoint_in_flight(),
            self.cluster
                .sinks
                .iter()
                .map(|s| format!("{}:{:?}/last={}/cur={}/abort_next={}", s.name, s.ec, s.last, s.current, s.abort_next))
                .collect::<Vec<_>>(),
            self.src_links.len(),
            self.cluster.registry_dump()
        )
    }

    /// End of run: every record reached the store's committed data exactly once (or, for records a plain
    /// connection drop made the worker process twice, at most once per such drop more).
    pub(super) fn check_end(&mut self) {
        for p in 0..self.log.partitions.len() {
            let len = self.log.len(p) as i64;
            if self.log.committed[p] != Some(len) {
                self.violate(format!(
                    "partition {p}: group offset {:?} at the end, log has {len} records",
                    self.log.committed[p]
                ));
            }
        }
        let mut counts: BTreeMap<(u32, u64), u32> = BTreeMap::new();
        let mut bad = Vec::new();
        self.store.with(|s| {
            for sink in &self.cluster.sinks {
                let committed = s.workers.get(&sink.name).map(|d| d.committed.clone()).unwrap_or_default();
                if committed != sink.durable_out {
                    bad.push(format!("{}: committed data differs from the worker's checkpointed output", sink.name));
                }
                match parse_records(&committed) {
                    Some(recs) => {
                        for r in recs {
                            *counts.entry(r).or_insert(0) += 1;
                        }
                    }
                    None => bad.push(format!("{}: committed data holds bytes no record produced", sink.name)),
                }
            }
        });
        for (p, &n) in self.cfg.records.iter().enumerate() {
            let sid = self.src.stream_of(p).unwrap_or(U64_MAX);
            for o in 0..n {
                let c = counts.remove(&(p as u32, o)).unwrap_or(0);
                let allowed =
                    1 + self.cluster.replay_allowance.get(&Origin { stream: sid, id: o }).copied().unwrap_or(0);
                if c == 0 {
                    bad.push(format!("record p{p}o{o} never reached the store's committed data"));
                } else if c > allowed {
                    bad.push(format!("record p{p}o{o} committed {c} times (at most {allowed} allowed)"));
                }
            }
        }
        for (r, c) in counts {
            bad.push(format!("the store committed {c} copies of {r:?}, which the log does not hold"));
        }
        for b in bad {
            self.violate(b);
        }
    }
}
