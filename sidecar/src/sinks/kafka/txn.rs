//! The per-worker round state machine of the Kafka sink, over a small [`TxnProducer`] trait so it is tested
//! without a broker (`sidecar/tests/kafka_sink.rs` runs the transactional mode against Apache Kafka too).
//!
//! Mapping of the 2PC calls:
//! - `recover` (every HELLO of the worker) → `init` the first time only (transactional: `init_transactions`,
//!   which fences an older producer with the same `transactional.id` and aborts its open transaction). On a
//!   reconnect the producer lives on: a transaction that voted commit stays open and is reported as pending, so
//!   the worker's Phase 2 after ListUncommitted commits it; a round that had not reached Phase 1 is aborted (the
//!   worker sends it again from its checkpoint).
//! - first `stage` of a round → `begin`, then `send`.
//! - `prepare` → `flush`: every record of the round acknowledged by the broker (inside the open transaction
//!   when transactional), else an error and an abort vote.
//! - `commit` → `commit` (`commit_transaction`), `abort` → `abort` (`abort_transaction`).
//!
//! Non-transactional producers implement `begin`/`commit`/`abort` as no-ops: a round's records are visible
//! as soon as they are acknowledged, so an aborted round may still have been published (at-least-once).
use bytes::Bytes;

use crate::runtime::sink_api::{SinkError, Txn};

/// The producer operations the sink needs, per worker.
#[async_trait::async_trait]
pub trait TxnProducer: Send + Sync {
    /// Prepares the producer; for a transactional one, fences older instances and aborts their open work.
    async fn init(&self) -> Result<(), SinkError>;
    async fn begin(&self) -> Result<(), SinkError>;
    /// Hands records to the producer (may return before they are acknowledged; bounded in flight).
    async fn send(&self, records: Vec<(Option<Bytes>, Bytes)>) -> Result<(), SinkError>;
    /// Returns once every record sent since `begin` is acknowledged; the first failure is returned.
    async fn flush(&self) -> Result<(), SinkError>;
    async fn commit(&self) -> Result<(), SinkError>;
    async fn abort(&self) -> Result<(), SinkError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// `init` has not succeeded yet (or must run again after a fatal error).
    Uninit,
    /// No transaction open.
    Idle,
    /// Records of the round are being sent; `failed` holds the first failure (the round must abort).
    Open { failed: Option<String> },
    /// Every record of `txn` is acknowledged; waiting for Phase 2.
    Prepared { txn: Txn },
}

/// One worker's round, driving a [`TxnProducer`].
pub struct Round<P: TxnProducer> {
    producer: P,
    state: State,
}

impl<P: TxnProducer> Round<P> {
    pub fn new(producer: P) -> Self {
        Self { producer, state: State::Uninit }
    }

    /// A (re)connection of the worker: returns the transaction that voted commit and awaits Phase 2, if any.
    ///
    /// Only a producer that was never initialized (or lost its transactional state to a fatal error) is
    /// initialized here: re-initializing a live one would abort the prepared transaction, whose round the worker
    /// may already count as committed (it completed cluster-wide while the connection was down).
    pub async fn recover(&mut self) -> Result<Option<Txn>, SinkError> {
        match &self.state {
            State::Uninit => {
                self.init().await?;
                Ok(None)
            }
            State::Idle => Ok(None),
            // Records of a round that never voted: the worker sends them again from its last checkpoint.
            State::Open { .. } => {
                self.abort().await?;
                Ok(None)
            }
            State::Prepared { txn } => Ok(Some(txn.clone())),
        }
    }

    /// Initializes the producer. Anything open is gone afterwards (aborted by the broker).
    async fn init(&mut self) -> Result<(), SinkError> {
        self.producer.init().await?;
        self.state = State::Idle;
        Ok(())
    }

    async fn ensure_init(&mut self) -> Result<(), SinkError> {
        if self.state == State::Uninit {
            self.init().await?;
        }
        Ok(())
    }

    /// After a fatal producer error (`Permanent` from a transaction call: fenced, epoch expired, transaction
    /// timed out) the transactional state is gone; the next call initializes the producer again.
    fn after_txn_error(&mut self, e: SinkError) -> SinkError {
        if matches!(e, SinkError::Permanent(_)) {
            self.state = State::Uninit;
        }
        e
    }

    pub async fn stage(&mut self, records: Vec<(Option<Bytes>, Bytes)>) -> Result<(), SinkError> {
        self.ensure_init().await?;
        match &self.state {
            State::Idle => {
                if let Err(e) = self.producer.begin().await {
                    return Err(self.after_txn_error(e));
                }
                self.state = State::Open { failed: None };
            }
            State::Open { failed: Some(reason) } => {
                // The round is lost already: do not publish more of it.
                return Err(SinkError::Permanent(format!("earlier record of this round failed: {reason}")));
            }
            State::Open { failed: None } => {}
            State::Prepared { txn } => {
                return Err(SinkError::Permanent(format!(
                    "records staged while transaction {} awaits Phase 2",
                    txn.id_str()
                )));
            }
            State::Uninit => unreachable_state()?,
        }
        if let Err(e) = self.producer.send(records).await {
            self.state = State::Open { failed: Some(e.to_string()) };
            return Err(e);
        }
        Ok(())
    }

    /// Records a staging failure that happened before the producer saw the records (e.g. a payload that does
    /// not match `format`): the round must not commit.
    pub fn poison(&mut self, reason: String) {
        if let State::Open { failed } = &mut self.state {
            failed.get_or_insert(reason);
        } else if self.state == State::Idle {
            // Nothing was begun; remember the failure so the vote is abort. No transaction to abort later.
            self.state = State::Open { failed: Some(reason) };
        }
    }

    /// Phase 1: `Ok` votes commit once every record of the round is acknowledged.
    pub async fn prepare(&mut self, txn: &Txn) -> Result<(), SinkError> {
        self.ensure_init().await?;
        match self.state.clone() {
            State::Idle => {
                // An empty round: nothing to publish, nothing to flush.
                if let Err(e) = self.producer.begin().await {
                    return Err(self.after_txn_error(e));
                }
            }
            State::Open { failed: Some(reason) } => return Err(SinkError::Permanent(reason)),
            State::Open { failed: None } => {
                if let Err(e) = self.producer.flush().await {
                    // Delivery failures do not heal by asking again: the round votes abort now.
                    let reason = e.to_string();
                    self.state = State::Open { failed: Some(reason.clone()) };
                    return Err(SinkError::Permanent(reason));
                }
            }
            State::Prepared { txn: p } if p.id == txn.id => return Ok(()),
            State::Prepared { txn: p } => {
                return Err(SinkError::Permanent(format!("transaction {} is still pending", p.id_str())));
            }
            State::Uninit => unreachable_state()?,
        }
        self.state = State::Prepared { txn: txn.clone() };
        Ok(())
    }

    /// Phase 2 commit. Idempotent: committing with nothing prepared (e.g. again after a retry) is a no-op.
    /// A transient failure keeps the transaction prepared (the worker's reconnect asks again); a fatal one
    /// means the broker aborted it, which is reported and not retried.
    pub async fn commit(&mut self, txn: &Txn) -> Result<(), SinkError> {
        match &self.state {
            State::Prepared { txn: p } if p.id == txn.id => {
                if let Err(e) = self.producer.commit().await {
                    return Err(self.after_txn_error(e));
                }
                self.state = State::Idle;
                Ok(())
            }
            State::Prepared { txn: p } => Err(SinkError::Permanent(format!(
                "commit of {} but {} is the prepared transaction",
                txn.id_str(),
                p.id_str()
            ))),
            _ => Ok(()),
        }
    }

    /// Phase 2 abort (or abort vote). Idempotent. If the producer cannot abort, it is initialized again,
    /// which aborts the open transaction on the broker side.
    pub async fn abort(&mut self) -> Result<(), SinkError> {
        match self.state {
            State::Open { .. } | State::Prepared { .. } => {
                if let Err(e) = self.producer.abort().await {
                    tracing::warn!(error = %e, "abort failed; re-initializing the producer");
                    self.state = State::Uninit;
                    self.init().await?;
                    return Ok(());
                }
                self.state = State::Idle;
                Ok(())
            }
            State::Idle | State::Uninit => Ok(()),
        }
    }

    /// The transaction waiting for Phase 2, if any.
    pub fn prepared(&self) -> Option<&Txn> {
        match &self.state {
            State::Prepared { txn } => Some(txn),
            _ => None,
        }
    }
}

fn unreachable_state() -> Result<(), SinkError> {
    Err(SinkError::Transient("producer not initialized".into()))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a broker would hold: per transaction, its records; `visible` is what a read_committed consumer sees.
    #[derive(Default, Debug)]
    struct Log {
        calls: Vec<&'static str>,
        open: Vec<Bytes>,
        unacked: Vec<Bytes>,
        visible: Vec<Bytes>,
        fail_send: bool,
        fail_delivery: bool,
        fail_commit_once: bool,
        fail_commit_fatal: bool,
        fail_abort: bool,
    }

    /// A fake transactional producer with Kafka's visibility rules.
    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<Log>>);

    #[async_trait::async_trait]
    impl TxnProducer for Fake {
        async fn init(&self) -> Result<(), SinkError> {
            let mut l = self.0.lock().unwrap();
            l.calls.push("init");
            // Fencing aborts whatever a previous incarnation left open.
            l.open.clear();
            l.unacked.clear();
            Ok(())
        }
        async fn begin(&self) -> Result<(), SinkError> {
            self.0.lock().unwrap().calls.push("begin");
            Ok(())
        }
        async fn send(&self, records: Vec<(Option<Bytes>, Bytes)>) -> Result<(), SinkError> {
            let mut l = self.0.lock().unwrap();
            l.calls.push("send");
            if l.fail_send {
                return Err(SinkError::Permanent("record too large".into()));
            }
            l.unacked.extend(records.into_iter().map(|(_, v)| v));
            Ok(())
        }
        async fn flush(&self) -> Result<(), SinkError> {
            let mut l = self.0.lock().unwrap();
            l.calls.push("flush");
            if l.fail_delivery {
                return Err(SinkError::Transient("delivery timed out".into()));
            }
            let acked = std::mem::take(&mut l.unacked);
            l.open.extend(acked);
            Ok(())
        }
        async fn commit(&self) -> Result<(), SinkError> {
            let mut l = self.0.lock().unwrap();
            l.calls.push("commit");
            if l.fail_commit_once {
                l.fail_commit_once = false;
                return Err(SinkError::Transient("coordinator moved".into()));
            }
            if l.fail_commit_fatal {
                // The broker aborted the transaction (timed out, or the producer was fenced).
                l.fail_commit_fatal = false;
                l.open.clear();
                return Err(SinkError::Permanent("producer fenced".into()));
            }
            let open = std::mem::take(&mut l.open);
            l.visible.extend(open);
            Ok(())
        }
        async fn abort(&self) -> Result<(), SinkError> {
            let mut l = self.0.lock().unwrap();
            l.calls.push("abort");
            if l.fail_abort {
                return Err(SinkError::Permanent("fatal".into()));
            }
            l.open.clear();
            l.unacked.clear();
            Ok(())
        }
    }

    fn txn(id: &str) -> Txn {
        Txn { id: Bytes::copy_from_slice(id.as_bytes()), start: 0, end: 0 }
    }

    fn recs(vals: &[&'static str]) -> Vec<(Option<Bytes>, Bytes)> {
        vals.iter().map(|v| (None, Bytes::from_static(v.as_bytes()))).collect()
    }

    #[tokio::test]
    async fn committed_round_becomes_visible_only_at_phase_2() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.recover().await.unwrap();
        r.stage(recs(&["a", "b"])).await.unwrap();
        r.stage(recs(&["c"])).await.unwrap();
        r.prepare(&txn("t1")).await.unwrap();
        assert!(fake.0.lock().unwrap().visible.is_empty());
        assert_eq!(r.prepared().map(|t| t.id_str()), Some("t1".into()));
        r.commit(&txn("t1")).await.unwrap();
        let l = fake.0.lock().unwrap();
        assert_eq!(l.visible, vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")]);
        assert_eq!(l.calls, vec!["init", "begin", "send", "send", "flush", "commit"]);
    }

    #[tokio::test]
    async fn abort_discards_and_next_round_begins_again() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.recover().await.unwrap();
        r.stage(recs(&["x"])).await.unwrap();
        r.prepare(&txn("t1")).await.unwrap();
        r.abort().await.unwrap();
        r.stage(recs(&["y"])).await.unwrap();
        r.prepare(&txn("t2")).await.unwrap();
        r.commit(&txn("t2")).await.unwrap();
        assert_eq!(fake.0.lock().unwrap().visible, vec![Bytes::from("y")]);
    }

    #[tokio::test]
    async fn send_failure_votes_abort_and_refuses_more_records() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.recover().await.unwrap();
        fake.0.lock().unwrap().fail_send = true;
        assert!(r.stage(recs(&["big"])).await.is_err());
        fake.0.lock().unwrap().fail_send = false;
        assert!(r.stage(recs(&["more"])).await.is_err(), "a failed round takes no more records");
        assert!(matches!(r.prepare(&txn("t1")).await, Err(SinkError::Permanent(_))));
        r.abort().await.unwrap();
        assert!(fake.0.lock().unwrap().visible.is_empty());
    }

    #[tokio::test]
    async fn delivery_failure_at_prepare_is_a_permanent_abort_vote() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.stage(recs(&["a"])).await.unwrap();
        fake.0.lock().unwrap().fail_delivery = true;
        assert!(matches!(r.prepare(&txn("t1")).await, Err(SinkError::Permanent(_))));
        // Asking again does not turn the vote into a commit.
        fake.0.lock().unwrap().fail_delivery = false;
        assert!(r.prepare(&txn("t1")).await.is_err());
    }

    #[tokio::test]
    async fn poisoned_round_votes_abort() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.recover().await.unwrap();
        r.poison("payload is not JSON".into());
        assert!(r.prepare(&txn("t1")).await.is_err());
        r.abort().await.unwrap();
        r.prepare(&txn("t2")).await.unwrap();
    }

    #[tokio::test]
    async fn commit_is_retryable_and_idempotent() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.stage(recs(&["a"])).await.unwrap();
        r.prepare(&txn("t1")).await.unwrap();
        fake.0.lock().unwrap().fail_commit_once = true;
        assert!(r.commit(&txn("t1")).await.is_err());
        r.commit(&txn("t1")).await.unwrap();
        r.commit(&txn("t1")).await.unwrap();
        let l = fake.0.lock().unwrap();
        assert_eq!(l.visible, vec![Bytes::from("a")]);
        assert_eq!(l.calls.iter().filter(|c| **c == "commit").count(), 2);
    }

    #[tokio::test]
    async fn recovery_fences_what_a_crashed_instance_left_open() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.stage(recs(&["lost"])).await.unwrap();
        r.prepare(&txn("t1")).await.unwrap();
        // The sidecar dies before Phase 2; a new instance with the same transactional.id starts.
        let mut again = Round::new(fake.clone());
        again.recover().await.unwrap();
        assert!(again.prepared().is_none());
        again.commit(&txn("t1")).await.unwrap();
        assert!(fake.0.lock().unwrap().visible.is_empty(), "the fenced transaction was aborted, not published");
    }

    #[tokio::test]
    async fn a_reconnect_keeps_the_prepared_transaction_for_phase_2() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        assert_eq!(r.recover().await.unwrap(), None);
        r.stage(recs(&["a", "b"])).await.unwrap();
        r.prepare(&txn("t1")).await.unwrap();
        // The worker's connection drops after the commit vote; it reconnects and asks what is pending.
        assert_eq!(r.recover().await.unwrap().map(|t| t.id_str()), Some("t1".into()));
        assert_eq!(r.recover().await.unwrap().map(|t| t.id_str()), Some("t1".into()), "asking twice");
        r.commit(&txn("t1")).await.unwrap();
        let l = fake.0.lock().unwrap();
        assert_eq!(l.visible, vec![Bytes::from("a"), Bytes::from("b")]);
        assert_eq!(l.calls.iter().filter(|c| **c == "init").count(), 1, "the producer was initialized again");
    }

    #[tokio::test]
    async fn a_reconnect_discards_a_round_that_had_not_voted() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.stage(recs(&["resent-later"])).await.unwrap();
        assert_eq!(r.recover().await.unwrap(), None);
        r.stage(recs(&["x"])).await.unwrap();
        r.prepare(&txn("t1")).await.unwrap();
        r.commit(&txn("t1")).await.unwrap();
        assert_eq!(fake.0.lock().unwrap().visible, vec![Bytes::from("x")]);
    }

    #[tokio::test]
    async fn a_fatal_commit_error_reinitializes_at_the_next_reconnect() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.stage(recs(&["a"])).await.unwrap();
        r.prepare(&txn("t1")).await.unwrap();
        fake.0.lock().unwrap().fail_commit_fatal = true;
        assert!(matches!(r.commit(&txn("t1")).await, Err(SinkError::Permanent(_))));
        // Nothing is pending any more (the broker aborted it) and the producer starts afresh.
        assert_eq!(r.recover().await.unwrap(), None);
        r.stage(recs(&["b"])).await.unwrap();
        r.prepare(&txn("t2")).await.unwrap();
        r.commit(&txn("t2")).await.unwrap();
        let l = fake.0.lock().unwrap();
        assert_eq!(l.visible, vec![Bytes::from("b")]);
        assert_eq!(l.calls.iter().filter(|c| **c == "init").count(), 2);
    }

    #[tokio::test]
    async fn failed_abort_reinitializes() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.stage(recs(&["a"])).await.unwrap();
        fake.0.lock().unwrap().fail_abort = true;
        r.abort().await.unwrap();
        let l = fake.0.lock().unwrap();
        assert_eq!(l.calls.iter().filter(|c| **c == "init").count(), 2);
        assert!(l.open.is_empty() && l.unacked.is_empty());
    }

    #[tokio::test]
    async fn empty_round_commits() {
        let fake = Fake::default();
        let mut r = Round::new(fake.clone());
        r.prepare(&txn("t1")).await.unwrap();
        r.commit(&txn("t1")).await.unwrap();
        assert!(r.prepared().is_none());
    }
}
