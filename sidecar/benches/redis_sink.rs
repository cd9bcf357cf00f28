//! Throughput of the Redis hash sink against a plain client, same data, same run, same Redis.
//!
//! - sink: a simulated worker sends length-prefixed (field, value) messages to the sink connector (in this
//!   process, over loopback TCP) and checkpoints every `ROUND` messages; the time runs until the last round's
//!   Phase 2 is visible in Redis (its last field is readable).
//! - plain: one client sends `HSET <hash> <field> <value>` per message, pipelined `ROUND` commands at a time.
//!
//! Prints both rates and the ratio. Run with `bench/redis_sink.sh` (needs Redis on 127.0.0.1:6379).
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;
use wallaroo_connector::runtime::run::{RunOverrides, run};
use wallaroo_connector::sim::{RoundOutcome, SinkSim, SinkSimConfig};

const URL: &str = "redis://127.0.0.1:6379";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pairs(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("field-{:07}", i % 200_000), format!("value-{i:010}-{}", "x".repeat(16)).into_bytes()))
        .collect()
}

fn lp(k: &str, v: &[u8]) -> Vec<u8> {
    let mut b = (k.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(k.as_bytes());
    b.extend_from_slice(v);
    b
}

async fn conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379 (tests/services/redis.sh)")
}

async fn plain(key: &str, data: &[(String, Vec<u8>)], round: usize) -> Duration {
    let mut c = conn().await;
    let _: () = c.del(key).await.unwrap();
    let t = Instant::now();
    for chunk in data.chunks(round) {
        let mut pipe = redis::pipe();
        for (f, v) in chunk {
            pipe.hset(key, f, v).ignore();
        }
        pipe.query_async::<()>(&mut c).await.unwrap();
    }
    t.elapsed()
}

async fn sink(key: &str, data: &[(String, Vec<u8>)], round: usize) -> Duration {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let yaml = format!(
        "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {{name: bench}}\nspec:\n  connectorName: bench\n  \
         worker: {{host: 127.0.0.1, port: {port}}}\n  sink:\n    redisHash: {{url: \"{URL}\", key: {key}}}\n"
    );
    let connector = wallaroo_crds::parse_connectors(&yaml, "bench").unwrap().remove(0);
    let stop = CancellationToken::new();
    let overrides =
        RunOverrides { admin_addr: Some("127.0.0.1:0".parse().unwrap()), drain_timeout: Some(Duration::from_secs(5)) };
    let task = tokio::spawn(run(connector, overrides, stop.clone()));
    let worker = format!("bench-{}", std::process::id());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut w = loop {
        if let Ok(w) = SinkSim::connect(SinkSimConfig::new(addr, &worker)).await {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut c = conn().await;
    let _: () = c.del(key).await.unwrap();
    let payloads: Vec<Vec<u8>> = data.iter().map(|(f, v)| lp(f, v)).collect();
    let t = Instant::now();
    for chunk in payloads.chunks(round) {
        for p in chunk {
            w.send(p).await.unwrap();
        }
        assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    }
    // Phase 2 is not answered: the run ends when the last round is visible.
    let (last_f, last_v) = data.last().unwrap();
    loop {
        let v: Option<Vec<u8>> = c.hget(key, last_f).await.unwrap();
        if v.as_deref() == Some(last_v.as_slice()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = t.elapsed();
    stop.cancel();
    let _ = task.await;
    for k in [
        format!("wallaroo:offset:{key}:{worker}"),
        format!("wallaroo:stage:{key}:{worker}"),
        format!("wallaroo:txn:{key}:{worker}"),
    ] {
        let _: () = c.del(k).await.unwrap();
    }
    elapsed
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let n = env_or("BENCH_MESSAGES", 200_000);
    let round = env_or("BENCH_ROUND", 10_000);
    let reps = env_or("BENCH_REPS", 5).max(1);
    let data = pairs(n);
    let key = format!("bench-redis-sink-{}", std::process::id());
    // Plain and sink run back to back in each repetition, so both see the same machine load; the headline is
    // the median of the per-repetition ratios (the machine this was written on is shared and noisy).
    let mut ratios = Vec::new();
    let (mut total_plain, mut total_sink) = (Duration::ZERO, Duration::ZERO);
    for rep in 0..reps {
        let p = plain(&key, &data, round).await;
        let s = sink(&key, &data, round).await;
        let ratio = p.as_secs_f64() / s.as_secs_f64();
        println!(
            "rep {rep}: plain {:>10.0} msg/s   sink {:>10.0} msg/s   ratio {ratio:.2}",
            n as f64 / p.as_secs_f64(),
            n as f64 / s.as_secs_f64()
        );
        ratios.push(ratio);
        total_plain += p;
        total_sink += s;
    }
    let _: () = conn().await.del(&key).await.unwrap();
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let total = (n * reps) as f64;
    println!("messages {n} per repetition, round {round} messages, {reps} repetitions");
    println!("plain pipelined HSET : {:>10.0} msg/s", total / total_plain.as_secs_f64());
    println!("redisHash sink (2PC) : {:>10.0} msg/s", total / total_sink.as_secs_f64());
    println!(
        "ratio sink/plain     : {median:.2} (median of repetitions; overall {:.2})",
        total_plain.as_secs_f64() / total_sink.as_secs_f64()
    );
}
