//! Simulated worker -> PostgreSQL sink throughput next to a plain client's bulk insert of the same rows into a
//! table of the same shape, in the same run (`bench/postgres_sink.sh`, or `cargo bench -p wallaroo-connector
//! --bench postgres_sink` with the 5433 instance of `tests/services/postgres-2pc.sh` running).
//!
//! Baseline: one tokio-postgres client, `COPY ... FROM STDIN` (text) of the rows, one transaction per checkpoint's
//! worth of rows. Sidecar: the release binary as a sink, the simulator sending the same rows as a worker with
//! a 2PC checkpoint after each such round; the clock stops when the table holds every row.
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::SinkExt;
use tokio_postgres::{Client, NoTls};
use wallaroo_connector::sim::{RoundOutcome, SinkSim, SinkSimConfig};

const URL: &str = "postgres://postgres@127.0.0.1:5433/test";
const ROWS: usize = 1_000_000;
const ROUND: usize = 100_000;
const SIZE: usize = 64;

fn row(i: usize) -> String {
    format!("{i:0width$}", width = SIZE)
}

async fn db() -> Client {
    let (client, conn) = tokio_postgres::connect(URL, NoTls)
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e} (start it with tests/services/postgres-2pc.sh)"));
    tokio::spawn(conn);
    client
}

async fn fresh_table(client: &Client, name: &str) {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (seq bigserial PRIMARY KEY, value text NOT NULL); CHECKPOINT"
        ))
        .await
        .unwrap();
}

async fn count(client: &Client, name: &str) -> i64 {
    client.query_one(&format!("SELECT count(*) FROM {name}"), &[]).await.unwrap().get(0)
}

async fn baseline(client: &Client) -> f64 {
    fresh_table(client, "bench_pg_baseline").await;
    let start = Instant::now();
    for r in 0..ROWS / ROUND {
        client.batch_execute("BEGIN").await.unwrap();
        let sink = client.copy_in::<_, Bytes>("COPY bench_pg_baseline (value) FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        let mut buf = Vec::with_capacity(1 << 20);
        for i in r * ROUND..(r + 1) * ROUND {
            buf.extend_from_slice(row(i).as_bytes());
            buf.push(b'\n');
            if buf.len() >= 1 << 20 {
                sink.send(Bytes::from(std::mem::take(&mut buf))).await.unwrap();
            }
        }
        sink.send(Bytes::from(buf)).await.unwrap();
        sink.finish().await.unwrap();
        client.batch_execute("COMMIT").await.unwrap();
    }
    let rate = ROWS as f64 / start.elapsed().as_secs_f64();
    assert_eq!(count(client, "bench_pg_baseline").await, ROWS as i64);
    rate
}

async fn sidecar(client: &Client, mode: &str) -> f64 {
    let table = format!("bench_pg_{mode}");
    fresh_table(client, &table).await;
    client.batch_execute(&format!("DELETE FROM wallaroo_sink_offsets WHERE target = '{table}'")).await.ok();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("c.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {{name: bench}}\nspec:\n  connectorName: bench\n  worker: {{port: {port}}}\n  sink:\n    postgres: {{url: \"{URL}\", table: {table}, twoPhase: {mode}}}\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wallaroo-connector"))
        .args(["run", "-f", manifest.to_str().unwrap(), "--admin-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut w = None;
    for _ in 0..300 {
        if let Ok(s) = SinkSim::connect(SinkSimConfig::new(addr, "bench-worker")).await {
            w = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut w = w.expect("sink accepts the worker");
    let start = Instant::now();
    for r in 0..ROWS / ROUND {
        for i in r * ROUND..(r + 1) * ROUND {
            w.send(row(i).as_bytes()).await.unwrap();
        }
        assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    }
    // Phase 2 is not acknowledged to the worker: stop the clock when the table holds every row.
    while count(client, &table).await < ROWS as i64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(start.elapsed() < Duration::from_secs(600), "sink too slow");
    }
    let rate = ROWS as f64 / start.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    rate
}

#[tokio::main]
async fn main() {
    let client = db().await;
    println!(
        "rows: {ROWS} x {SIZE} bytes of text, {} checkpoints of {ROUND} rows, table (seq bigserial, value text)",
        ROWS / ROUND
    );
    for mode in ["prepared", "staging"] {
        let base = baseline(&client).await;
        let rate = sidecar(&client, mode).await;
        println!(
            "{mode:>8}: plain client COPY {:.0} rows/s | sidecar sink {:.0} rows/s ({:.1} MB/s payload) | ratio {:.2}",
            base,
            rate,
            rate * SIZE as f64 / 1e6,
            rate / base
        );
    }
}
