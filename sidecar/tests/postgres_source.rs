//! The PostgreSQL source against a real server (127.0.0.1:5432; the server-restart test uses the throw-away
//! instance on 5433 from `tests/services/postgres-2pc.sh`) and the simulated worker.
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use tokio_postgres::{Client, NoTls};
use wallaroo_connector::sim::{SourceSim, SourceSimConfig};

const SHARED: &str = "postgres://postgres@127.0.0.1:5432/test";
const THROWAWAY: &str = "postgres://postgres@127.0.0.1:5433/test";

fn services_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/services")
}

fn service(script: &str, arg: &str) {
    let st = Command::new("bash").arg(services_dir().join(script)).arg(arg).status().expect("run service script");
    assert!(st.success(), "{script} {arg} failed");
}

async fn db(url: &str) -> Client {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("wallaroo_connector=info").try_init();
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is not reachable (run tests/services/postgres.sh): {e}"));
    tokio::spawn(conn);
    client
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", rand::random::<u32>())
}

fn manifest(port: u16, url: &str, table: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: pg-source-test}}
spec:
  connectorName: pg_source_test
  worker: {{port: {port}}}
  source:
    postgres: {{url: "{url}", table: "{table}", idColumn: id, installTrigger: true{extra}}}
"#
    )
}

async fn create_table(client: &Client, table: &str) {
    client
        .batch_execute(&format!("CREATE TABLE {table} (id bigserial PRIMARY KEY, payload text NOT NULL)"))
        .await
        .unwrap();
}

/// Inserts `from..to` as payloads `row-<n>` in one statement; returns them.
async fn insert(client: &Client, table: &str, from: usize, to: usize) -> Vec<String> {
    let rows: Vec<String> = (from..to).map(|i| format!("row-{i:06}")).collect();
    client.execute(&format!("INSERT INTO {table} (payload) SELECT unnest($1::text[])"), &[&rows]).await.unwrap();
    rows
}

fn payloads(v: &[(u64, bytes::Bytes)]) -> Vec<String> {
    v.iter().map(|(_, p)| String::from_utf8_lossy(p).into_owned()).collect()
}

async fn sim() -> SourceSim {
    SourceSim::start(SourceSimConfig { checkpoint_every: Some(Duration::from_millis(50)), ..Default::default() })
        .await
        .unwrap()
}

async fn wait_count(sim: &SourceSim, stream: &str, n: u64) -> bool {
    sim.wait_until(Duration::from_secs(60), |s| s.processed_count(stream) >= n).await
}

fn assert_clean(sim: &SourceSim) {
    let st = sim.stats();
    assert_eq!(st.credit_overruns, 0, "{st:?}");
    assert_eq!(st.protocol_errors, 0, "{st:?}");
    assert_eq!(st.second_hello, 0, "{st:?}");
}

#[tokio::test]
async fn rows_arrive_in_order_and_notify_wakes_the_reader() {
    let client = db(SHARED).await;
    let table = unique("src_order");
    create_table(&client, &table).await;
    let mut expected = insert(&client, &table, 0, 1000).await;
    let sim = sim().await;
    let stream = format!("postgres:{table}");
    // A one-minute poll interval: rows inserted later can only be picked up in time through NOTIFY.
    let running = spawn(connector(&manifest(
        sim.addr().port(),
        SHARED,
        &table,
        ", payloadColumn: payload, pollIntervalMs: 60000",
    )));
    assert!(wait_count(&sim, &stream, 1000).await);
    expected.extend(insert(&client, &table, 1000, 1500).await);
    assert!(wait_count(&sim, &stream, 1500).await, "NOTIFY woke the reader");
    let got = sim.processed(&stream);
    assert_eq!(payloads(&got), expected);
    assert_eq!(
        got.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        (1..=1500).collect::<Vec<u64>>(),
        "point of reference = id"
    );
    assert_clean(&sim);
    let triggers: i64 = client
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal", &[&table])
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 1);
    running.stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn rows_without_payload_column_are_sent_as_json() {
    let client = db(SHARED).await;
    let table = unique("src_json");
    client.batch_execute(&format!("CREATE TABLE {table} (id serial PRIMARY KEY, name text, n int)")).await.unwrap();
    client.batch_execute(&format!("INSERT INTO {table} (name, n) VALUES ('a', 1), ('b', NULL)")).await.unwrap();
    let sim = sim().await;
    let stream = format!("postgres:{table}");
    let running = spawn(connector(&manifest(sim.addr().port(), SHARED, &table, "")));
    assert!(wait_count(&sim, &stream, 2).await);
    let got: Vec<serde_json::Value> =
        sim.processed(&stream).iter().map(|(_, p)| serde_json::from_slice(p).unwrap()).collect();
    assert_eq!(
        got,
        vec![serde_json::json!({"id": 1, "name": "a", "n": 1}), serde_json::json!({"id": 2, "name": "b", "n": null})]
    );
    running.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}

#[tokio::test]
async fn rows_inserted_while_down_arrive_after_a_clean_restart_without_redelivery() {
    let client = db(SHARED).await;
    let table = unique("src_down");
    create_table(&client, &table).await;
    let mut expected = insert(&client, &table, 0, 300).await;
    let sim = sim().await;
    let stream = format!("postgres:{table}");
    let yaml = manifest(sim.addr().port(), SHARED, &table, ", payloadColumn: payload, pollIntervalMs: 100");
    let running = spawn(connector(&yaml));
    assert!(wait_count(&sim, &stream, 300).await);
    assert!(sim.wait_until(Duration::from_secs(30), |s| s.acked(&stream) == Some(300)).await, "everything acked");
    running.stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.task).await.unwrap().unwrap().unwrap();

    expected.extend(insert(&client, &table, 300, 700).await);
    let running = spawn(connector(&yaml));
    assert!(wait_count(&sim, &stream, 700).await);
    assert!(sim.wait_until(Duration::from_secs(30), |s| s.acked(&stream) == Some(700)).await);
    assert_eq!(payloads(&sim.processed(&stream)), expected, "exactly the rows, nothing acked sent again");
    assert_eq!(sim.stats().duplicates, 0);
    running.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}

#[tokio::test]
async fn kill9_mid_stream_then_restart_delivers_every_row() {
    let client = db(SHARED).await;
    let table = unique("src_kill");
    create_table(&client, &table).await;
    let sim = sim().await;
    let stream = format!("postgres:{table}");
    let yaml =
        manifest(sim.addr().port(), SHARED, &table, ", payloadColumn: payload, pollIntervalMs: 50, batchSize: 20");
    let writer = {
        let table = table.clone();
        tokio::spawn(async move {
            let client = db(SHARED).await;
            let mut all = Vec::new();
            for b in 0..40 {
                all.extend(insert(&client, &table, b * 50, (b + 1) * 50).await);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            all
        })
    };
    let mut sidecar = start_binary(&yaml);
    assert!(wait_count(&sim, &stream, 400).await);
    sidecar.child.kill().unwrap(); // SIGKILL mid-stream
    sidecar.child.wait().unwrap();
    let expected = writer.await.unwrap();
    let mut sidecar = start_binary(&yaml);
    assert!(
        sim.wait_until(Duration::from_secs(60), |s| {
            let got = s.processed(&stream);
            got.last().map(|(id, _)| *id) == Some(expected.len() as u64)
        })
        .await
    );
    // At least once: every row, each with its own payload; ids never go backwards within what was kept.
    let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
    for (id, p) in sim.processed(&stream) {
        by_id.insert(id, String::from_utf8_lossy(&p).into_owned());
    }
    assert_eq!(by_id.len(), expected.len());
    assert_eq!(by_id.values().cloned().collect::<Vec<_>>(), expected);
    assert_clean(&sim);
    let _ = sidecar.child.kill();
    let _ = sidecar.child.wait();
}

#[tokio::test]
async fn sim_restart_resumes_from_the_acked_point() {
    let client = db(SHARED).await;
    let table = unique("src_restart");
    create_table(&client, &table).await;
    let expected = insert(&client, &table, 0, 3000).await;
    let sim = SourceSim::start(SourceSimConfig {
        max_credits: 50,
        refill_credits: 10,
        checkpoint_every: Some(Duration::from_millis(20)),
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = format!("postgres:{table}");
    let running =
        spawn(connector(&manifest(sim.addr().port(), SHARED, &table, ", payloadColumn: payload, batchSize: 50")));
    assert!(wait_count(&sim, &stream, 500).await);
    sim.restart_connections();
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.stats().restarts >= 1).await);
    assert!(wait_count(&sim, &stream, 3000).await);
    assert!(sim.wait_until(Duration::from_secs(30), |s| s.acked(&stream) == Some(3000)).await);
    assert_eq!(payloads(&sim.processed(&stream)), expected, "the rollback is replayed from the acked id, in order");
    assert_clean(&sim);
    running.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}

#[tokio::test]
async fn a_row_committed_late_with_a_lower_id_is_not_skipped() {
    let client = db(SHARED).await;
    let late = db(SHARED).await;
    let table = unique("src_fence");
    create_table(&client, &table).await;
    // Transaction A takes id 1 and stays open; B takes id 2 and commits first.
    late.batch_execute(&format!("BEGIN; INSERT INTO {table} (payload) VALUES ('first')")).await.unwrap();
    insert(&client, &table, 0, 1).await;
    let sim = sim().await;
    let stream = format!("postgres:{table}");
    let running =
        spawn(connector(&manifest(sim.addr().port(), SHARED, &table, ", payloadColumn: payload, pollIntervalMs: 50")));
    // The reader must hold id 2 back while id 1's transaction is open (several polls go by).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sim.with(|s| s.processed_count(&stream)), 0, "nothing passes the fence while an older writer runs");
    late.batch_execute("COMMIT").await.unwrap();
    assert!(wait_count(&sim, &stream, 2).await);
    assert_eq!(payloads(&sim.processed(&stream)), vec!["first".to_string(), "row-000000".to_string()]);
    running.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}

#[tokio::test]
async fn server_restart_reconnects() {
    service("postgres-2pc.sh", "start");
    let client = db(THROWAWAY).await;
    let table = unique("src_server");
    create_table(&client, &table).await;
    let mut expected = insert(&client, &table, 0, 200).await;
    let sim = sim().await;
    let stream = format!("postgres:{table}");
    let running = spawn(connector(&manifest(
        sim.addr().port(),
        THROWAWAY,
        &table,
        ", payloadColumn: payload, pollIntervalMs: 100",
    )));
    assert!(wait_count(&sim, &stream, 200).await);
    drop(client);
    service("postgres-2pc.sh", "restart");
    let client = db(THROWAWAY).await;
    expected.extend(insert(&client, &table, 200, 400).await);
    assert!(wait_count(&sim, &stream, 400).await, "reconnected and read on");
    assert_eq!(payloads(&sim.processed(&stream)), expected);
    assert!(!running.task.is_finished());
    running.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}
