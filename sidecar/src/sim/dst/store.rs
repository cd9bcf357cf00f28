//! The sink's external system: a transactional store per worker. `stage` buffers bytes, `prepare` makes them
//! durable but unpublished (a prepared transaction survives a sidecar crash), `commit` publishes, `abort`
//! discards, `recover` reports the committed offset and at most one pending transaction. It implements the real
//! [`SinkIntegration`] contract; the simulation calls it through `futures::executor::block_on` (no await point
//! ever suspends, so this is a plain function call).
//!
//! Like a real system it does not second-guess the bytes it is given: it appends what `stage` hands it. The
//! simulation's invariants compare what ends up committed with what the worker checkpointed, which is how a
//! connector bug that commits the wrong bytes is caught.
use std::collections::BTreeMap;
use std::sync::Mutex;

use super::rng::Rng;
use crate::runtime::sink_api::{Guarantee, Recovery, SinkError, SinkIntegration, SinkRecord, Txn};

#[derive(Debug, Default, Clone)]
pub struct WorkerData {
    pub committed: Vec<u8>,
    pub pending: Option<(Txn, Vec<u8>)>,
    /// In-flight writes of the current session: not durable, gone on `recover`.
    pub staged: Vec<u8>,
}

#[derive(Debug)]
pub struct StoreState {
    pub workers: BTreeMap<String, WorkerData>,
    /// While on, each stage/prepare/commit/recover call fails transiently with probability 1/2.
    pub outage: bool,
    /// The next this-many stage or prepare calls are refused permanently (e.g. a rejected write).
    pub refuse: u32,
    pub rng: Rng,
    /// Contract breaches by the caller (the sink session and its driver), found by the store itself.
    pub violations: Vec<String>,
    pub calls: u64,
}

#[derive(Debug)]
pub struct MemStore {
    state: Mutex<StoreState>,
}

impl MemStore {
    pub fn new(rng: Rng) -> Self {
        Self {
            state: Mutex::new(StoreState {
                workers: BTreeMap::new(),
                outage: false,
                refuse: 0,
                rng,
                violations: Vec::new(),
                calls: 0,
            }),
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut StoreState) -> T) -> T {
        let mut g = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    fn fault(&self, what: &str, refusable: bool) -> Result<(), SinkError> {
        self.with(|s| {
            s.calls += 1;
            if refusable && s.refuse > 0 {
                s.refuse -= 1;
                return Err(SinkError::Permanent(format!("{what}: write refused")));
            }
            if s.outage && s.rng.chance(1, 2) {
                return Err(SinkError::Transient(format!("{what}: store unavailable")));
            }
            Ok(())
        })
    }
}

#[async_trait::async_trait]
impl SinkIntegration for MemStore {
    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }

    async fn recover(&self, worker: &str) -> Result<Recovery, SinkError> {
        self.fault("recover", false)?;
        Ok(self.with(|s| {
            let w = s.workers.entry(worker.to_string()).or_default();
            w.staged.clear();
            Recovery { committed: Some(w.committed.len() as u64), pending: w.pending.as_ref().map(|(t, _)| t.clone()) }
        }))
    }

    async fn stage(&self, worker: &str, records: Vec<SinkRecord>) -> Result<(), SinkError> {
        self.fault("stage", true)?;
        self.with(|s| {
            let w = s.workers.entry(worker.to_string()).or_default();
            for r in records {
                w.staged.extend_from_slice(&r.payload);
            }
        });
        Ok(())
    }

    async fn prepare(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        self.fault("prepare", true)?;
        self.with(|s| {
            let w = s.workers.entry(worker.to_string()).or_default();
            if let Some((p, _)) = &w.pending {
                let msg = format!("{worker}: prepare of {} while {} is still pending", txn.id_str(), p.id_str());
                s.violations.push(msg.clone());
                return Err(SinkError::Permanent(msg));
            }
            let bytes = std::mem::take(&mut w.staged);
            w.pending = Some((txn.clone(), bytes));
            Ok(())
        })
    }

    async fn commit(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        self.fault("commit", false)?;
        self.with(|s| {
            let w = s.workers.entry(worker.to_string()).or_default();
            match w.pending.take() {
                Some((p, bytes)) if p.id == txn.id => {
                    w.committed.extend_from_slice(&bytes);
                    Ok(())
                }
                Some(other) => {
                    let msg = format!("{worker}: commit of {} but {} is pending", txn.id_str(), other.0.id_str());
                    w.pending = Some(other);
                    s.violations.push(msg.clone());
                    Err(SinkError::Permanent(msg))
                }
                // Idempotent: a commit repeated after a crash finds it already published.
                None if w.committed.len() as u64 >= txn.end => Ok(()),
                None => {
                    let msg = format!("{worker}: commit of {} that was never prepared", txn.id_str());
                    s.violations.push(msg.clone());
                    Err(SinkError::Permanent(msg))
                }
            }
        })
    }

    async fn abort(&self, worker: &str, txn: &Txn) -> Result<(), SinkError> {
        self.with(|s| {
            let w = s.workers.entry(worker.to_string()).or_default();
            if (w.committed.len() as u64) > txn.start {
                s.violations.push(format!(
                    "{worker}: abort of {} from offset {} below the committed end {}",
                    txn.id_str(),
                    txn.start,
                    w.committed.len()
                ));
            }
            w.staged.clear();
            if w.pending.as_ref().is_some_and(|(p, _)| p.id == txn.id || p.start >= txn.start) {
                w.pending = None;
            }
        });
        Ok(())
    }

    async fn forget(&self, worker: &str) -> Result<(), SinkError> {
        self.with(|s| s.workers.remove(worker));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::executor::block_on;

    use super::*;

    fn txn(id: &str, start: u64, end: u64) -> Txn {
        Txn { id: Bytes::from(id.to_string()), start, end }
    }

    #[test]
    fn prepared_survives_recover_and_staged_does_not() {
        let s = MemStore::new(Rng::new(1));
        let rec = |o: u64, p: &'static str| SinkRecord { offset: o, payload: Bytes::from_static(p.as_bytes()) };
        block_on(s.stage("w", vec![rec(0, "ab")])).unwrap();
        block_on(s.prepare("w", &txn("t1", 0, 2))).unwrap();
        block_on(s.stage("w", vec![rec(2, "cd")])).unwrap();
        let r = block_on(s.recover("w")).unwrap();
        assert_eq!(r.committed, Some(0));
        assert_eq!(r.pending, Some(txn("t1", 0, 2)));
        block_on(s.commit("w", &txn("t1", 0, 2))).unwrap();
        // Idempotent after a crash.
        block_on(s.commit("w", &txn("t1", 0, 2))).unwrap();
        s.with(|st| {
            assert_eq!(st.workers["w"].committed, b"ab");
            assert!(st.violations.is_empty());
        });
    }

    #[test]
    fn a_second_pending_transaction_is_a_violation() {
        let s = MemStore::new(Rng::new(1));
        block_on(s.prepare("w", &txn("t1", 0, 0))).unwrap();
        assert!(block_on(s.prepare("w", &txn("t2", 0, 0))).is_err());
        s.with(|st| assert_eq!(st.violations.len(), 1));
    }
}
