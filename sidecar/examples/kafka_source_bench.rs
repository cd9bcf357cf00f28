//! Kafka source throughput against a plain librdkafka consumer, in one run on one broker.
//!
//! 1. Produces `--records` small records to a fresh topic.
//! 2. (a) Reads them all with a plain `BaseConsumer` (assign from the beginning, no group work): the ceiling.
//! 3. (b) Runs the Kafka source connector in-process against the simulated worker (payloads counted, not
//!    kept) and times until the worker has processed every record.
//! 4. Prints both rates and the ratio (b)/(a).
//!
//! Run with `bench/kafka_source.sh` (starts the broker, builds in release mode).
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use wallaroo_connector::runtime::run::{RunOverrides, run};
use wallaroo_connector::sim::{SourceSim, SourceSimConfig};

struct Args {
    brokers: String,
    records: usize,
    partitions: i32,
    size: usize,
    credits: u32,
    refill: u32,
}

fn args() -> Args {
    let mut a = Args {
        brokers: "127.0.0.1:9092".into(),
        records: 1_000_000,
        partitions: 4,
        size: 100,
        credits: 5000,
        refill: 1000,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < v.len() {
        let val = v[i + 1].clone();
        match v[i].as_str() {
            "--brokers" => a.brokers = val,
            "--records" => a.records = val.parse().expect("--records N"),
            "--partitions" => a.partitions = val.parse().expect("--partitions N"),
            "--size" => a.size = val.parse().expect("--size BYTES"),
            "--credits" => a.credits = val.parse().expect("--credits N"),
            "--refill" => a.refill = val.parse().expect("--refill N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

#[tokio::main]
async fn main() {
    let a = args();
    let topic = format!("bench-{}-{}", std::process::id(), rand::random::<u32>());
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &a.brokers).create().expect("admin");
    admin
        .create_topics(&[NewTopic::new(&topic, a.partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .expect("create topic")
        .into_iter()
        .for_each(|r| {
            r.expect("topic");
        });
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Produce.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let started = Instant::now();
    let body = vec![b'x'; a.size];
    let mut futs = Vec::with_capacity(100_000);
    for i in 0..a.records {
        let part = (i % a.partitions as usize) as i32;
        let f = loop {
            match producer.send_result(FutureRecord::<(), [u8]>::to(&topic).partition(part).payload(&body[..])) {
                Ok(f) => break f,
                Err((_, _)) => {
                    for f in futs.drain(..) {
                        let _: Result<_, _> = f.await;
                    }
                }
            }
        };
        futs.push(f);
        if futs.len() >= 100_000 {
            for f in futs.drain(..) {
                f.await.expect("delivery").expect("delivered");
            }
        }
    }
    for f in futs.drain(..) {
        f.await.expect("delivery").expect("delivered");
    }
    println!("produced {} records of {} bytes in {:.2?}", a.records, a.size, started.elapsed());

    // (a) Plain consumer.
    let plain = {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &a.brokers)
            .set("group.id", format!("{topic}-plain"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..a.partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning).expect("tpl");
        }
        c.assign(&tpl).expect("assign");
        let started = Instant::now();
        let mut n = 0usize;
        let mut bytes = 0usize;
        while n < a.records {
            match c.poll(Duration::from_secs(10)) {
                Some(Ok(m)) => {
                    // Touch the payload like the source does (it copies it into the record).
                    bytes += rdkafka::message::Message::payload(&m).map_or(0, <[u8]>::len);
                    n += 1;
                }
                Some(Err(e)) => panic!("consume: {e}"),
                None => panic!("plain consumer stalled at {n}"),
            }
        }
        let dt = started.elapsed();
        println!(
            "(a) plain rdkafka consumer: {n} records ({bytes} bytes) in {dt:.2?} = {:.0} records/s",
            n as f64 / dt.as_secs_f64()
        );
        n as f64 / dt.as_secs_f64()
    };

    // (b) Source sidecar -> simulated worker.
    let sim = SourceSim::start(SourceSimConfig {
        max_credits: a.credits,
        refill_credits: a.refill,
        keep_payloads: false,
        ..SourceSimConfig::default()
    })
    .await
    .expect("sim");
    let yaml = format!(
        r#"apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{ name: bench }}
spec:
  connectorName: bench_in
  worker: {{ host: "127.0.0.1", port: {port}, cookie: Dragons-Love-Tacos, instanceName: bench }}
  source:
    kafka:
      brokers: ["{brokers}"]
      topics: ["{topic}"]
      groupId: "{topic}-sidecar"
      startFrom: earliest
"#,
        port = sim.addr().port(),
        brokers = a.brokers,
    );
    let connector = wallaroo_crds::parse_connectors(&yaml, "bench").expect("manifest").remove(0);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let overrides = RunOverrides {
        admin_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        drain_timeout: Some(Duration::from_secs(5)),
    };
    let task = tokio::spawn(run(connector, overrides, stop.clone()));
    let total = a.records as u64;
    let done = sim.wait_until(Duration::from_secs(600), |s| s.processed_total() >= total).await;
    let dt = started.elapsed();
    assert!(done, "the source delivered only {} of {total}", sim.processed_total());
    let sidecar = a.records as f64 / dt.as_secs_f64();
    println!(
        "(b) kafka source -> simulated worker: {} records in {dt:.2?} = {sidecar:.0} records/s (includes group join and partition start)",
        a.records
    );
    println!("ratio (b)/(a) = {:.1}%", 100.0 * sidecar / plain);
    stop.cancel();
    let _ = task.await;
}
