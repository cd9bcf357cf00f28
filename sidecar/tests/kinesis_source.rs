//! Kinesis source against moto (`tests/services/moto.sh`), driven through the source contract by a small
//! stand-in for the runtime: it starts every announced stream at a given position, logs every event in order,
//! confirms ends of stream, and can "kill" the integration (abort its task: nothing in memory survives) and
//! start a new one at the positions the worker acknowledged.
mod aws_common;

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wallaroo_connector::runtime::source_api::{
    Command, Emit, Position, Record, SourceContext, SourceIntegration, stream_id_for,
};
use wallaroo_connector::runtime::{Health, Metrics};
use wallaroo_connector::sources::kinesis::por::parts;
use wallaroo_connector::sources::kinesis::{KinesisSource, stream_name};
use wallaroo_crds::{KinesisSource as KinesisSourceConfig, StartFrom};

fn config(stream: &str, start_from: StartFrom) -> KinesisSourceConfig {
    let (id, secret) = aws_common::creds();
    KinesisSourceConfig {
        stream: stream.to_string(),
        region: aws_common::REGION.to_string(),
        endpoint: Some(aws_common::ENDPOINT.to_string()),
        start_from,
        access_key_id_from: id,
        secret_access_key_from: secret,
        poll_interval_ms: Some(50),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Announced(String),
    Records(String, Vec<Record>),
    Ended(String),
}

struct Harness {
    emit: mpsc::Receiver<Emit>,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    names: HashMap<u64, String>,
    generations: HashMap<u64, u64>,
    /// Where each stream starts when it is announced (the worker's acknowledged point of reference).
    positions: HashMap<String, Position>,
    events: Vec<Event>,
}

impl Harness {
    fn start(cfg: KinesisSourceConfig, positions: HashMap<String, Position>) -> Self {
        let (etx, erx) = mpsc::channel(64);
        let (ctx_, crx) = mpsc::channel(1024);
        let shutdown = CancellationToken::new();
        let ctx = SourceContext {
            emit: etx,
            commands: crx,
            health: Health::new(),
            metrics: Metrics::unlabelled(),
            shutdown: shutdown.clone(),
            instance: "test".into(),
        };
        let task = tokio::spawn(async move {
            if let Err(e) = Box::new(KinesisSource::new(cfg)).run(ctx).await {
                panic!("kinesis source failed: {e}");
            }
        });
        Self {
            emit: erx,
            commands: ctx_,
            shutdown,
            task,
            names: HashMap::new(),
            generations: HashMap::new(),
            positions,
            events: Vec::new(),
        }
    }

    /// Handles emits until `done(self)` holds (panics after `secs`).
    async fn run_until(&mut self, secs: u64, done: impl Fn(&Harness) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            let e = tokio::time::timeout_at(deadline, self.emit.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out; events so far: {:?}", self.summary()))
                .expect("the source stopped");
            match e {
                Emit::Stream { name } => {
                    let id = stream_id_for(name.as_bytes());
                    self.names.insert(id, name.clone());
                    self.events.push(Event::Announced(name.clone()));
                    let from = self.positions.get(&name).copied().unwrap_or(Position::Beginning);
                    self.restart(id, from).await;
                }
                Emit::Records { stream, generation, records } => {
                    if self.generations.get(&stream) == Some(&generation) {
                        self.events.push(Event::Records(self.names[&stream].clone(), records));
                    }
                }
                Emit::End { stream, generation } => {
                    if self.generations.get(&stream) == Some(&generation) {
                        self.events.push(Event::Ended(self.names[&stream].clone()));
                        // The worker confirms the end at its next checkpoint.
                        self.commands.send(Command::Finished { stream }).await.unwrap();
                    }
                }
            }
        }
    }

    async fn restart(&mut self, stream: u64, from: Position) {
        let g = self.generations.get(&stream).map_or(1, |g| g + 1);
        self.generations.insert(stream, g);
        self.commands.send(Command::Start { stream, from, generation: g }).await.unwrap();
    }

    /// Records of one stream in delivery order (current generations only).
    fn records(&self, name: &str) -> Vec<Record> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Records(n, r) if n == name => Some(r.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn total(&self) -> usize {
        self.events.iter().map(|e| if let Event::Records(_, r) = e { r.len() } else { 0 }).sum()
    }

    fn summary(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| match e {
                Event::Announced(n) => format!("announced {n}"),
                Event::Records(n, r) => format!("{} records of {n}", r.len()),
                Event::Ended(n) => format!("ended {n}"),
            })
            .collect()
    }

    /// kill -9: the integration's task is gone with everything it held in memory.
    fn kill(self) {
        self.task.abort();
        self.shutdown.cancel();
    }
}

async fn put(k: &aws_sdk_kinesis::Client, stream: &str, from: usize, n: usize) {
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(100) {
        let entries = chunk
            .iter()
            .map(|i| {
                PutRecordsRequestEntry::builder()
                    .partition_key(format!("pk-{}", i % 13))
                    .data(Blob::new(format!("msg-{i}")))
                    .build()
                    .unwrap()
            })
            .collect();
        let out = k.put_records().stream_name(stream).set_records(Some(entries)).send().await.unwrap();
        assert_eq!(out.failed_record_count(), Some(0));
    }
}

/// What Kinesis holds per shard, in sequence order.
async fn per_shard(k: &aws_sdk_kinesis::Client, stream: &str) -> HashMap<String, Vec<Vec<u8>>> {
    let mut m: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for (shard, _, data) in aws_common::read_all(k, stream).await {
        m.entry(shard).or_default().push(data);
    }
    m
}

fn payloads(r: &[Record]) -> Vec<String> {
    r.iter().map(|r| String::from_utf8_lossy(&r.payload).into_owned()).collect()
}

fn texts(v: &[Vec<u8>]) -> Vec<String> {
    v.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect()
}

#[tokio::test]
async fn every_record_once_in_shard_order_and_exact_resume() {
    let k = aws_common::kinesis().await;
    let stream = aws_common::unique("src");
    aws_common::create_stream(&k, &stream, 2).await;
    put(&k, &stream, 0, 400).await;
    let expected = per_shard(&k, &stream).await;
    assert_eq!(expected.len(), 2, "both shards got records");

    let mut h = Harness::start(config(&stream, StartFrom::Earliest), HashMap::new());
    h.run_until(60, |h| h.total() >= 400).await;
    let mut acked = HashMap::new();
    let mut same_ms = 0;
    let mut cuts_in_a_millisecond = 0;
    for (shard, want) in &expected {
        let name = stream_name(&stream, shard);
        let got = h.records(&name);
        assert_eq!(payloads(&got), texts(want), "{shard}: every record once, in sequence order");
        assert!(got.windows(2).all(|w| w[0].por < w[1].por), "points of reference increase");
        same_ms += got.iter().filter(|r| parts(r.por).1 > 0).count();
        // Acknowledge through a record followed by one of the same millisecond when there is one, so the
        // resume has to count within a millisecond.
        let cut = (got.len() / 3..got.len() - 1)
            .find(|&i| parts(got[i].por).0 == parts(got[i + 1].por).0)
            .unwrap_or(got.len() / 2);
        if parts(got[cut].por).0 == parts(got[cut + 1].por).0 {
            cuts_in_a_millisecond += 1;
        }
        acked.insert(name, (got[cut].por, payloads(&got[cut + 1..])));
    }
    assert!(same_ms > 0, "records in one millisecond: the index part is exercised");
    assert!(cuts_in_a_millisecond > 0, "at least one resume point sits inside a millisecond");

    // Within the process: the worker rewinds (reconnect) to an acknowledged point: exact via the sequence map.
    let (name0, (p0, rest0)) = acked.iter().next().map(|(n, v)| (n.clone(), v.clone())).unwrap();
    let id0 = stream_id_for(name0.as_bytes());
    let before = h.events.len();
    h.restart(id0, Position::After(p0)).await;
    h.run_until(30, |h| {
        h.events[before..]
            .iter()
            .map(|e| if let Event::Records(n, r) = e { if *n == name0 { r.len() } else { 0 } } else { 0 })
            .sum::<usize>()
            >= rest0.len()
    })
    .await;
    let replayed: Vec<String> = h.events[before..]
        .iter()
        .filter_map(|e| if let Event::Records(n, r) = e { (*n == name0).then(|| payloads(r)) } else { None })
        .flatten()
        .collect();
    assert_eq!(replayed, rest0, "rewind inside the process resumes right after the acknowledged record");

    // kill -9, then a new process starts at the acknowledged points: nothing acknowledged comes again,
    // nothing after it is missing (recounted from the arrival timestamp).
    h.kill();
    put(&k, &stream, 400, 50).await;
    let after = per_shard(&k, &stream).await;
    let positions = acked.iter().map(|(n, (p, _))| (n.clone(), Position::After(*p))).collect();
    let mut h = Harness::start(config(&stream, StartFrom::Earliest), positions);
    let want_total: usize = acked.values().map(|(_, rest)| rest.len()).sum::<usize>() + 50;
    h.run_until(60, |h| h.total() >= want_total).await;
    for (shard, all) in &after {
        let name = stream_name(&stream, shard);
        let (_, rest) = &acked[&name];
        let got = payloads(&h.records(&name));
        let mut want = rest.clone();
        want.extend(texts(&all[expected[shard].len()..]));
        assert_eq!(got, want, "{shard}: exactly the records after the acknowledged one");
    }
    // Nothing more trickles in.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(e) = h.emit.try_recv() {
        assert!(!matches!(e, Emit::Records { .. }), "unexpected extra records: {e:?}");
    }
    h.kill();
}

#[tokio::test]
async fn latest_skips_what_was_there_before() {
    let k = aws_common::kinesis().await;
    let stream = aws_common::unique("src-latest");
    aws_common::create_stream(&k, &stream, 1).await;
    put(&k, &stream, 0, 20).await;
    let mut h = Harness::start(config(&stream, StartFrom::Latest), HashMap::new());
    h.run_until(30, |h| !h.generations.is_empty()).await;
    // Give the reader time to take its LATEST iterator, then write.
    tokio::time::sleep(Duration::from_millis(500)).await;
    put(&k, &stream, 20, 5).await;
    h.run_until(30, |h| h.total() >= 5).await;
    let shard = per_shard(&k, &stream).await.into_keys().next().unwrap();
    let got = payloads(&h.records(&stream_name(&stream, &shard)));
    assert_eq!(got, (20..25).map(|i| format!("msg-{i}")).collect::<Vec<_>>());
    // The worker rewinds to the beginning before acknowledging anything: the records read since the LATEST
    // start come again (LATEST again would lose them).
    let name = stream_name(&stream, &shard);
    let id = stream_id_for(name.as_bytes());
    let before = h.events.len();
    h.restart(id, Position::Beginning).await;
    h.run_until(30, |h| {
        h.events[before..].iter().map(|e| if let Event::Records(_, r) = e { r.len() } else { 0 }).sum::<usize>() >= 5
    })
    .await;
    let again: Vec<String> = h.events[before..]
        .iter()
        .filter_map(|e| if let Event::Records(_, r) = e { Some(payloads(r)) } else { None })
        .flatten()
        .collect();
    assert_eq!(again, (20..25).map(|i| format!("msg-{i}")).collect::<Vec<_>>());
    h.kill();
}

async fn shard_ids(k: &aws_sdk_kinesis::Client, stream: &str) -> Vec<String> {
    let out = k.list_shards().stream_name(stream).send().await.unwrap();
    out.shards.unwrap_or_default().into_iter().map(|s| s.shard_id).collect()
}

/// SplitShard: both children start only after the parent ended. (Moto keeps routing writes to the closed
/// parent, whose hash range still matches first, so its children never receive records; the merge test below
/// covers records in a child.)
#[tokio::test]
async fn split_announces_children_after_the_parent_ended() {
    let k = aws_common::kinesis().await;
    let stream = aws_common::unique("src-split");
    aws_common::create_stream(&k, &stream, 1).await;
    put(&k, &stream, 0, 30).await;
    let parent = shard_ids(&k, &stream).await.remove(0);
    let mut h = Harness::start(config(&stream, StartFrom::Earliest), HashMap::new());
    h.run_until(30, |h| h.total() >= 30).await;
    k.split_shard()
        .stream_name(&stream)
        .shard_to_split(&parent)
        .new_starting_hash_key((1u128 << 127).to_string())
        .send()
        .await
        .unwrap();
    let children: Vec<String> = shard_ids(&k, &stream).await.into_iter().filter(|s| *s != parent).collect();
    assert_eq!(children.len(), 2);
    let names: Vec<String> = children.iter().map(|c| stream_name(&stream, c)).collect();
    h.run_until(60, |h| names.iter().all(|n| h.events.contains(&Event::Announced(n.clone())))).await;
    let parent_name = stream_name(&stream, &parent);
    let ended_at = h.events.iter().position(|e| *e == Event::Ended(parent_name.clone())).expect("parent ended");
    for n in &names {
        let announced = h.events.iter().position(|e| *e == Event::Announced(n.clone())).unwrap();
        assert!(announced > ended_at, "{n} announced only after its parent ended");
    }
    let parent_got = payloads(&h.records(&parent_name));
    assert_eq!(parent_got, (0..30).map(|i| format!("msg-{i}")).collect::<Vec<_>>());
    h.kill();
}

/// MergeShards: the child waits for both parents, and its records come after all of theirs. (Moto copies the
/// parents' records into the merged shard, so the child holds copies of them.)
#[tokio::test]
async fn merge_waits_for_both_parents() {
    let k = aws_common::kinesis().await;
    let stream = aws_common::unique("src-merge");
    aws_common::create_stream(&k, &stream, 2).await;
    put(&k, &stream, 0, 40).await;
    let mut parents = shard_ids(&k, &stream).await;
    parents.sort();
    k.merge_shards()
        .stream_name(&stream)
        .shard_to_merge(&parents[0])
        .adjacent_shard_to_merge(&parents[1])
        .send()
        .await
        .unwrap();
    let held = per_shard(&k, &stream).await;
    let child = shard_ids(&k, &stream).await.into_iter().find(|s| !parents.contains(s)).unwrap();
    let total: usize = held.values().map(Vec::len).sum();
    assert_eq!(held[&child].len(), 40);
    let mut h = Harness::start(config(&stream, StartFrom::Earliest), HashMap::new());
    h.run_until(60, |h| h.total() >= total).await;
    let child_name = stream_name(&stream, &child);
    let announced = h.events.iter().position(|e| *e == Event::Announced(child_name.clone())).unwrap();
    let first_child_records =
        h.events.iter().position(|e| matches!(e, Event::Records(n, _) if *n == child_name)).unwrap();
    for p in &parents {
        let name = stream_name(&stream, p);
        let ended = h.events.iter().position(|e| *e == Event::Ended(name.clone())).expect("parent ended");
        assert!(ended < announced && announced < first_child_records, "{p} ended before the merged child started");
        assert_eq!(payloads(&h.records(&name)), texts(&held[p]));
    }
    assert_eq!(payloads(&h.records(&child_name)), texts(&held[&child]));
    h.kill();
}
