//! The consumer thread: owns the librdkafka consumer, polls it, and runs the rebalance callbacks.
//!
//! It is deliberately dumb: the async side ([`super::KafkaSource`]) decides what to start, commit and drain;
//! this thread executes those decisions between polls and reports what it saw. librdkafka calls the rebalance
//! callback from inside `poll`, on this thread, so revoking can block here (bounded) until the async side has
//! drained the partitions, without any other thread touching the consumer.
//!
//! Fetch positions: every assigned partition is assigned at a logical offset (so librdkafka never starts a
//! committed-offset lookup of its own that could race our seek) and paused at once. It is resumed only after
//! the worker said where to start (`Control::Start` → seek). Each seek bumps librdkafka's fetch version, so
//! nothing fetched before it can be returned after it; records are tagged with the epoch (the stream
//! generation) of the latest start so the async side can drop what was in flight across a rewind.
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use wallaroo_crds::StartFrom;

use super::partitions::Tp;
use crate::runtime::source_api::Record;
use crate::runtime::{Health, Metrics};

/// From the consumer thread to the async side.
#[derive(Debug)]
pub enum Event {
    /// The group gave us these partitions (paused until started).
    Assigned(Vec<Tp>),
    /// The group takes these partitions away; answer with [`Control::RevokeDone`] once drained.
    Revoking(Vec<Tp>),
    /// Records of one partition, in offset order, read after the start tagged `epoch`.
    Records { tp: Tp, epoch: u64, records: Vec<Record> },
}

/// Where to start a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// This absolute offset (the worker's point of reference + 1).
    Offset(i64),
    /// The group's committed offset, or `startFrom` when there is none.
    Committed(StartFrom),
}

/// From the async side to the consumer thread.
#[derive(Debug)]
pub enum Control {
    Start {
        tp: Tp,
        at: StartAt,
        epoch: u64,
    },
    /// Commit `next_offset` (the offset of the next record to read) for `tp` to the group.
    Commit {
        tp: Tp,
        next_offset: i64,
    },
    /// Every partition of the last `Revoking` is drained (or the wait timed out).
    RevokeDone,
    /// Stop handing out records (shutdown): pause everything.
    PauseAll,
}

/// Records per event: large enough to amortize channel hand-offs, small enough to keep latency low.
const BATCH: usize = 2048;
/// Payload bytes per event, so that large records do not multiply what waits for the worker's credits.
const BATCH_BYTES: usize = 256 * 1024;
/// How long `poll` blocks when nothing is ready: bounds how late a control message is served.
const POLL_WAIT: Duration = Duration::from_millis(20);
/// How often a disconnected consumer probes the brokers (drives `/readyz` back to ready).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// State of the partitions this member holds, touched only on the consumer thread (the mutex is uncontended;
/// it exists because the rebalance callback reaches it through the shared context).
#[derive(Default)]
struct Held {
    /// Assigned partitions: `Some(epoch)` once started.
    parts: HashMap<Tp, Option<u64>>,
    /// Last offset committed per partition, re-committed synchronously on close.
    committed: HashMap<Tp, i64>,
    /// Starts that could not be executed yet (the committed offset lookup failed), retried later.
    retry: Vec<(Instant, Tp, StartAt, u64)>,
    /// Everything paused because the async side is not keeping up (or shutting down).
    held_back: bool,
    stopping_intake: bool,
}

pub struct Ctx {
    /// Records (bounded: this is where backpressure from the worker reaches Kafka).
    events: mpsc::Sender<Event>,
    /// Assignments and revocations: never blocked behind records, bounded in practice by the rebalance rate.
    group: mpsc::UnboundedSender<Event>,
    control: Mutex<std_mpsc::Receiver<Control>>,
    held: Mutex<Held>,
    /// Set before the consumer is closed: the final revoke must not wait for a drain nobody will answer.
    closing: AtomicBool,
    revoke_wait: Duration,
    health: Health,
    metrics: Metrics,
    connected: AtomicBool,
}

impl Ctx {
    pub fn new(
        events: mpsc::Sender<Event>,
        group: mpsc::UnboundedSender<Event>,
        control: std_mpsc::Receiver<Control>,
        revoke_wait: Duration,
        health: Health,
        metrics: Metrics,
    ) -> Self {
        Self {
            events,
            group,
            control: Mutex::new(control),
            held: Mutex::new(Held::default()),
            closing: AtomicBool::new(false),
            revoke_wait,
            health,
            metrics,
            connected: AtomicBool::new(false),
        }
    }

    fn set_connected(&self, up: bool) {
        if self.connected.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("connected to the Kafka cluster");
            } else {
                tracing::warn!("lost every Kafka broker; librdkafka keeps reconnecting");
            }
        }
        self.health.set_external(up);
        self.metrics.external_connected.set(i64::from(up));
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // A poisoned lock means a panic on this same thread already; the data is still consistent enough to stop.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves every queued control message. Returns false when the async side is gone.
    fn serve_controls(&self, consumer: &BaseConsumer<Ctx>) -> Result<bool, std_mpsc::TryRecvError> {
        let mut revoke_done = false;
        loop {
            let msg = {
                let rx = self.control.lock().unwrap_or_else(|p| p.into_inner());
                rx.try_recv()
            };
            match msg {
                Ok(Control::RevokeDone) => revoke_done = true,
                Ok(c) => self.apply(consumer, c, CommitMode::Async),
                Err(std_mpsc::TryRecvError::Empty) => return Ok(revoke_done),
                Err(e) => return Err(e),
            }
        }
    }

    fn apply(&self, consumer: &BaseConsumer<Ctx>, c: Control, mode: CommitMode) {
        match c {
            Control::Start { tp, at, epoch } => self.start(consumer, tp, at, epoch),
            Control::Commit { tp, next_offset } => {
                if !self.held().parts.contains_key(&tp) {
                    tracing::debug!(topic = %tp.topic, partition = tp.partition, "not committing a partition we no longer hold");
                    return;
                }
                let mut tpl = TopicPartitionList::new();
                if let Err(e) = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next_offset)) {
                    tracing::warn!(error = %e, "bad commit offset");
                    return;
                }
                match consumer.commit(&tpl, mode) {
                    Ok(()) => {
                        tracing::debug!(topic = %tp.topic, partition = tp.partition, next_offset, "offset committed");
                        self.held().committed.insert(tp, next_offset);
                    }
                    Err(e) => {
                        // The next Durable commits a later offset; until then a restart re-reads a little more.
                        self.metrics.error("commit", "source");
                        tracing::warn!(topic = %tp.topic, partition = tp.partition, next_offset, error = %e, "offset commit failed");
                    }
                }
            }
            Control::RevokeDone => {}
            Control::PauseAll => {
                let mut held = self.held();
                held.stopping_intake = true;
                let tpl = started_list(&held);
                if let Err(e) = consumer.pause(&tpl) {
                    tracing::debug!(error = %e, "pause on shutdown");
                }
                held.held_back = true;
            }
        }
    }

    /// Seeks a held partition to where the worker wants it and resumes fetching.
    fn start(&self, consumer: &BaseConsumer<Ctx>, tp: Tp, at: StartAt, epoch: u64) {
        if !self.held().parts.contains_key(&tp) {
            tracing::debug!(topic = %tp.topic, partition = tp.partition, "start for a partition we do not hold; ignored");
            return;
        }
        let offset = match at {
            StartAt::Offset(o) => Offset::Offset(o),
            StartAt::Committed(from) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&tp.topic, tp.partition);
                match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
                    Ok(c) => match c.find_partition(&tp.topic, tp.partition).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => Offset::Offset(o),
                        _ => match absolute_start(consumer, &tp, from) {
                            Ok(o) => Offset::Offset(o),
                            Err(e) => {
                                self.metrics.error("offset_fetch", "source");
                                tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e, "cannot read the partition's offsets; retrying");
                                self.held().retry.push((Instant::now() + Duration::from_secs(1), tp, at, epoch));
                                return;
                            }
                        },
                    },
                    Err(e) => {
                        // Guessing would either replay the whole partition or skip data: retry instead.
                        self.metrics.error("offset_fetch", "source");
                        tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e, "cannot read the committed offset; retrying");
                        self.held().retry.push((Instant::now() + Duration::from_secs(1), tp, at, epoch));
                        return;
                    }
                }
            }
        };
        // Keep it paused while we move it so nothing from the old position slips through.
        let mut one = TopicPartitionList::new();
        one.add_partition(&tp.topic, tp.partition);
        let _ = consumer.pause(&one);
        if let Err(e) = consumer.seek(&tp.topic, tp.partition, offset, Duration::from_secs(10)) {
            self.metrics.error("seek", "source");
            tracing::warn!(topic = %tp.topic, partition = tp.partition, ?offset, error = %e, "seek failed; retrying");
            self.held().retry.push((Instant::now() + Duration::from_secs(1), tp, at, epoch));
            return;
        }
        let mut held = self.held();
        held.parts.insert(tp.clone(), Some(epoch));
        if !held.held_back
            && let Err(e) = consumer.resume(&one)
        {
            tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e, "resume failed");
        }
        tracing::info!(topic = %tp.topic, partition = tp.partition, ?offset, epoch, "partition started");
    }

    fn retry_due(&self, consumer: &BaseConsumer<Ctx>) {
        let now = Instant::now();
        let due: Vec<_> = {
            let mut held = self.held();
            let (due, later): (Vec<_>, Vec<_>) = held.retry.drain(..).partition(|r| r.0 <= now);
            held.retry = later;
            due
        };
        for (_, tp, at, epoch) in due {
            self.start(consumer, tp, at, epoch);
        }
    }
}

/// `startFrom` as an absolute offset (never a logical one: see the assignment callback).
fn absolute_start(consumer: &BaseConsumer<Ctx>, tp: &Tp, from: StartFrom) -> Result<i64, KafkaError> {
    let (low, high) = consumer.fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(10))?;
    Ok(match from {
        StartFrom::Earliest => low,
        StartFrom::Latest => high,
    })
}

fn started_list(held: &Held) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (tp, epoch) in &held.parts {
        if epoch.is_some() {
            tpl.add_partition(&tp.topic, tp.partition);
        }
    }
    tpl
}

fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements().iter().map(|e| Tp::new(e.topic(), e.partition())).collect()
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => self.set_connected(false),
            // Single connection drops are normal (idle reaping, broker restarts); librdkafka reconnects.
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                tracing::debug!(%reason, "broker connection dropped")
            }
            _ => {
                self.metrics.error("kafka", "source");
                tracing::warn!(error = %error, %reason, "kafka client error");
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let tps = tps_of(tpl);
                // Start every fetcher at an absolute offset (the log end): a logical one (stored, beginning,
                // end) makes librdkafka look the offset up asynchronously, and a late answer would override
                // the seek to the worker's position and skip records. The pause below stops it at once.
                for tp in &tps {
                    let at = match consumer.fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(10)) {
                        Ok((_, high)) => Offset::Offset(high),
                        Err(e) => {
                            tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e, "cannot read the log end; starting paused at a logical offset");
                            Offset::End
                        }
                    };
                    let _ = tpl.set_partition_offset(&tp.topic, tp.partition, at);
                }
                let r = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = r {
                    self.metrics.error("assign", "source");
                    tracing::error!(error = %e, "assign failed");
                    return;
                }
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "pausing newly assigned partitions failed");
                }
                {
                    let mut held = self.held();
                    for tp in &tps {
                        held.parts.insert(tp.clone(), None);
                    }
                }
                tracing::info!(partitions = ?tps, "partitions assigned");
                if self.group.send(Event::Assigned(tps)).is_err() {
                    tracing::debug!("assignment after the source stopped");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let tps = tps_of(tpl);
                tracing::info!(partitions = ?tps, lost = consumer.assignment_lost(), "partitions revoked");
                if !self.closing.load(Ordering::Relaxed) && !tps.is_empty() {
                    self.drain_revoked(consumer, tps.clone());
                }
                {
                    let mut held = self.held();
                    for tp in &tps {
                        held.parts.remove(tp);
                        held.committed.remove(tp);
                    }
                    held.retry.retain(|r| !tps.contains(&r.1));
                }
                let r = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
            other => {
                self.metrics.error("rebalance", "source");
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                let _ = consumer.unassign();
                self.held().parts.clear();
            }
        }
    }
}

impl Ctx {
    /// Hands the revoked partitions to the async side and serves its commits (synchronously, so they land
    /// before the partitions move) until it says they are drained. Bounded: the async side gives up after
    /// `revokeTimeoutSeconds`; this wait has a margin on top in case the async side itself is stuck.
    fn drain_revoked(&self, consumer: &BaseConsumer<Ctx>, tps: Vec<Tp>) {
        if self.group.send(Event::Revoking(tps)).is_err() {
            return;
        }
        let deadline = Instant::now() + self.revoke_wait + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("the source did not finish draining revoked partitions in time; letting them go");
                return;
            }
            let msg = {
                let rx = self.control.lock().unwrap_or_else(|p| p.into_inner());
                rx.recv_timeout(left.min(Duration::from_millis(100)))
            };
            match msg {
                Ok(Control::RevokeDone) => return,
                Ok(c) => self.apply(consumer, c, CommitMode::Sync),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

/// What the consumer thread needs besides the consumer.
pub struct ThreadArgs {
    pub topics: Vec<String>,
}

/// Runs the poll loop until the async side drops its control sender. Returns an error only for start-up
/// problems (subscribe failed).
pub fn run(consumer: BaseConsumer<Ctx>, args: ThreadArgs) -> Result<(), String> {
    let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| format!("subscribe to {topics:?}: {e}"))?;
    let ctx = consumer.context().clone();
    let mut last_probe = Instant::now() - PROBE_EVERY;
    // Records read while the async side could not take them (backpressure); delivered before anything new.
    let mut stash: Vec<Event> = Vec::new();
    'outer: loop {
        match ctx.serve_controls(&consumer) {
            Ok(_) => {}
            Err(_) => break 'outer,
        }
        ctx.retry_due(&consumer);
        if !ctx.connected.load(Ordering::Relaxed) && last_probe.elapsed() >= PROBE_EVERY {
            last_probe = Instant::now();
            // Metadata answers only when a broker does; an idle consumer has no other signal that it is back.
            if consumer.fetch_metadata(topics.first().copied(), Duration::from_millis(500)).is_ok() {
                ctx.set_connected(true);
            }
        }

        // Deliver what backpressure held back first.
        if !stash.is_empty() {
            if !deliver(&ctx, &consumer, &mut stash) {
                break 'outer;
            }
            continue;
        }

        let mut batches: Vec<(Tp, u64, Vec<Record>)> = Vec::new();
        let (mut n, mut bytes) = (0usize, 0usize);
        let mut wait = POLL_WAIT;
        while n < BATCH && bytes < BATCH_BYTES {
            let Some(res) = consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let m = match res {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(_)) => continue,
                Err(e) => {
                    ctx.metrics.error("consume", "source");
                    tracing::warn!(error = %e, "consume error");
                    break;
                }
            };
            ctx.set_connected(true);
            let tp = Tp::new(m.topic(), m.partition());
            let epoch = match ctx.held().parts.get(&tp) {
                Some(Some(e)) => *e,
                // Not started (or no longer ours): it is paused, the records come again after the seek.
                _ => {
                    tracing::debug!(topic = %tp.topic, partition = tp.partition, offset = m.offset(), "record of a partition not started; dropped");
                    continue;
                }
            };
            let Ok(offset) = u64::try_from(m.offset()) else {
                continue;
            };
            let rec = Record {
                por: offset,
                key: m.key().map(Bytes::copy_from_slice),
                payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
            };
            n += 1;
            bytes += rec.payload.len() + rec.key.as_ref().map_or(0, Bytes::len);
            match batches.last_mut() {
                Some((t, e, v)) if *t == tp && *e == epoch => v.push(rec),
                _ => batches.push((tp, epoch, vec![rec])),
            }
        }
        for (tp, epoch, records) in &batches {
            tracing::trace!(
                topic = %tp.topic,
                partition = tp.partition,
                epoch,
                first = records.first().map(|r| r.por),
                last = records.last().map(|r| r.por),
                "records read"
            );
        }
        stash.extend(batches.into_iter().map(|(tp, epoch, records)| Event::Records { tp, epoch, records }));
        if !stash.is_empty() && !deliver(&ctx, &consumer, &mut stash) {
            break 'outer;
        }
    }
    // Final commits of what the worker acknowledged, then leave the group without waiting for a drain.
    let committed = {
        let held = ctx.held();
        let mut tpl = TopicPartitionList::new();
        for (tp, off) in &held.committed {
            let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*off));
        }
        tpl
    };
    if committed.count() > 0
        && let Err(e) = consumer.commit(&committed, CommitMode::Sync)
    {
        tracing::warn!(error = %e, "final offset commit failed");
    }
    ctx.closing.store(true, Ordering::Relaxed);
    drop(consumer);
    Ok(())
}

/// Sends stashed events to the async side. While its channel is full, every started partition is paused and
/// the consumer keeps polling (serving rebalances and controls, staying in the group) without taking records.
/// False when the async side is gone.
fn deliver(ctx: &Ctx, consumer: &BaseConsumer<Ctx>, stash: &mut Vec<Event>) -> bool {
    let events = std::mem::take(stash);
    let mut paused_here = false;
    for ev in events {
        let mut ev = ev;
        loop {
            match ctx.events.try_send(ev) {
                Ok(()) => break,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    ev = back;
                    if !paused_here {
                        let mut held = ctx.held();
                        if !held.held_back {
                            let _ = consumer.pause(&started_list(&held));
                            held.held_back = true;
                            paused_here = true;
                        }
                    }
                    if ctx.serve_controls(consumer).is_err() {
                        return false;
                    }
                    ctx.retry_due(consumer);
                    // Paused partitions yield nothing; this only serves rebalance and error callbacks.
                    if let Some(Ok(m)) = consumer.poll(POLL_WAIT) {
                        // A partition started meanwhile may slip one record through before its pause; keep it.
                        let tp = Tp::new(m.topic(), m.partition());
                        if let (Some(Some(epoch)), Ok(offset)) =
                            (ctx.held().parts.get(&tp).copied(), u64::try_from(m.offset()))
                        {
                            let rec = Record {
                                por: offset,
                                key: m.key().map(Bytes::copy_from_slice),
                                payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
                            };
                            stash.push(Event::Records { tp, epoch, records: vec![rec] });
                        }
                    }
                }
            }
        }
    }
    if paused_here {
        let mut held = ctx.held();
        if !held.stopping_intake {
            let _ = consumer.resume(&started_list(&held));
            held.held_back = false;
        }
    }
    true
}
