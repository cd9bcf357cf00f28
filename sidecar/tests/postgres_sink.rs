//! The PostgreSQL sink against real servers, in both two-phase modes: staging tables on the shared server
//! (127.0.0.1:5432, `max_prepared_transactions = 0`) and PREPARE TRANSACTION on the throw-away instance
//! (127.0.0.1:5433) that `tests/services/postgres-2pc.sh` starts. The worker is the simulator; crash tests run
//! the sidecar binary and kill it with SIGKILL between Phase 1 and Phase 2.
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use tokio_postgres::{Client, NoTls};
use wallaroo_connector::sim::{RoundOutcome, SinkSim, SinkSimConfig};

const SHARED: &str = "postgres://postgres@127.0.0.1:5432/test";
const TWO_PC: &str = "postgres://postgres@127.0.0.1:5433/test";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Staging,
    Prepared,
}

impl Mode {
    fn url(self) -> &'static str {
        match self {
            Mode::Staging => SHARED,
            Mode::Prepared => TWO_PC,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Staging => "staging",
            Mode::Prepared => "prepared",
        }
    }
}

fn services_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/services")
}

/// The throw-away 2PC instance belongs to these tests: start it (idempotent).
fn start_2pc_server() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let st =
            Command::new("bash").arg(services_dir().join("postgres-2pc.sh")).status().expect("run postgres-2pc.sh");
        assert!(st.success(), "tests/services/postgres-2pc.sh failed");
    });
}

async fn db(mode: Mode) -> Client {
    if mode == Mode::Prepared {
        start_2pc_server();
    }
    let (client, conn) = tokio_postgres::connect(mode.url(), NoTls).await.unwrap_or_else(|e| {
        panic!("PostgreSQL at {} is not reachable (run tests/services/postgres.sh): {e}", mode.url())
    });
    tokio::spawn(conn);
    client
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", rand::random::<u32>())
}

fn manifest(port: u16, mode: Mode, table: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: pg-sink-test}}
spec:
  connectorName: pg_sink_test
  worker: {{port: {port}}}
  sink:
    postgres: {{url: "{url}", table: "{table}", twoPhase: {mode}, batchSize: 200{extra}}}
"#,
        url = mode.url(),
        mode = mode.name()
    )
}

async fn connect_sim(port: u16, worker: &str) -> SinkSim {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..300 {
        if let Ok(s) = SinkSim::connect(SinkSimConfig::new(addr, worker)).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("sink on port {port} never accepted worker {worker}");
}

async fn values(client: &Client, table: &str) -> Vec<String> {
    client
        .query(&format!("SELECT value FROM {table} ORDER BY seq"), &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// Phase 2 is fire-and-forget for the worker: poll until the table holds `n` rows (or give up), then return them.
async fn wait_values(client: &Client, table: &str, n: usize) -> Vec<String> {
    for _ in 0..300 {
        let v = values(client, table).await;
        if v.len() >= n {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    values(client, table).await
}

async fn create_table(client: &Client, table: &str) {
    client
        .batch_execute(&format!("CREATE TABLE {table} (seq bigserial PRIMARY KEY, key text, value text NOT NULL)"))
        .await
        .unwrap();
}

async fn send_all(w: &mut SinkSim, items: &[String]) {
    for i in items {
        w.send(i.as_bytes()).await.unwrap();
    }
}

fn batch(tag: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{tag}-{i:05}")).collect()
}

async fn committed_and_aborted(mode: Mode) {
    let client = db(mode).await;
    let table = unique("sink_ca");
    create_table(&client, &table).await;
    let port = free_port();
    let running = spawn(connector(&manifest(port, mode, &table, "")));
    let mut w = connect_sim(port, "worker1").await;

    let a = batch("a", 0..500);
    send_all(&mut w, &a).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    assert_eq!(wait_values(&client, &table, a.len()).await, a);

    // Voted commit, then the checkpoint is aborted cluster-wide: the worker reconnects and aborts it.
    send_all(&mut w, &batch("aborted", 0..300)).await;
    assert!(w.phase1().await.unwrap(), "sink votes commit");
    w.rollback_round();
    w.reconnect().await.unwrap();
    assert_eq!(w.resolved.last().map(|(_, c)| *c), Some(false), "pending txn resolved as abort");

    let b = batch("b", 0..250);
    send_all(&mut w, &b).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    // A further empty round orders Phase 2 of the last one before we look.
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    let expected: Vec<String> = a.iter().chain(&b).cloned().collect();
    assert_eq!(wait_values(&client, &table, expected.len()).await, expected, "committed exactly once, aborted never");

    running.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
    let leftovers: i64 = client
        .query_one("SELECT count(*) FROM wallaroo_sink_staging WHERE target = $1", &[&table])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0, "no staged rows left behind");
}

#[tokio::test]
async fn staging_committed_once_aborted_never() {
    committed_and_aborted(Mode::Staging).await;
}

#[tokio::test]
async fn prepared_committed_once_aborted_never() {
    committed_and_aborted(Mode::Prepared).await;
}

async fn crash_between_phases(mode: Mode, checkpoint_completed: bool) {
    let client = db(mode).await;
    let table = unique("sink_crash");
    create_table(&client, &table).await;
    let port = free_port();
    let yaml = manifest(port, mode, &table, "");
    let mut sidecar = start_binary(&yaml);
    // A worker name of its own: the crash tests run in parallel and look at pg_prepared_xacts.
    let worker = format!("w-{table}");
    let gids = format!("wallaroo:{worker}:%");
    let mut w = connect_sim(port, &worker).await;

    let a = batch("a", 0..400);
    send_all(&mut w, &a).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);

    let b = batch("b", 0..300);
    send_all(&mut w, &b).await;
    assert!(w.phase1().await.unwrap(), "sink votes commit");
    sidecar.child.kill().unwrap(); // SIGKILL between Phase 1 and Phase 2
    sidecar.child.wait().unwrap();
    if checkpoint_completed {
        w.complete_without_phase2();
    } else {
        w.rollback_round();
    }
    if mode == Mode::Prepared {
        let pending: i64 = client
            .query_one("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE $1", &[&gids])
            .await
            .unwrap()
            .get(0);
        assert!(pending >= 1, "the prepared transaction survives the crash");
    }
    // Nothing of round b is visible while its outcome is unknown.
    assert_eq!(values(&client, &table).await, a);

    let mut sidecar2 = start_binary(&yaml);
    let mut reconnected = false;
    for _ in 0..300 {
        if w.reconnect().await.is_ok() {
            reconnected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reconnected, "reconnect to the restarted sidecar");
    let mut w2 = w;
    assert_eq!(w2.resolved.last().map(|(_, c)| *c), Some(checkpoint_completed), "pending txn resolved correctly");
    let c = batch("c", 0..100);
    send_all(&mut w2, &c).await;
    assert_eq!(w2.checkpoint().await.unwrap(), RoundOutcome::Committed);
    assert_eq!(w2.checkpoint().await.unwrap(), RoundOutcome::Committed);
    let mut expected = a.clone();
    if checkpoint_completed {
        expected.extend(b.iter().cloned());
    }
    expected.extend(c.iter().cloned());
    assert_eq!(wait_values(&client, &table, expected.len()).await, expected);
    // The last round's Phase 2 is fire-and-forget for the worker: give it a moment to land.
    let mut prepared_left: i64 = -1;
    for _ in 0..100 {
        prepared_left = client
            .query_one("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE $1", &[&gids])
            .await
            .unwrap()
            .get(0);
        if prepared_left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(prepared_left, 0, "no prepared transaction left behind");
    let _ = sidecar2.child.kill();
    let _ = sidecar2.child.wait();
}

#[tokio::test]
async fn staging_kill9_between_phases_then_commit() {
    crash_between_phases(Mode::Staging, true).await;
}

#[tokio::test]
async fn staging_kill9_between_phases_then_abort() {
    crash_between_phases(Mode::Staging, false).await;
}

#[tokio::test]
async fn prepared_kill9_between_phases_then_commit() {
    crash_between_phases(Mode::Prepared, true).await;
}

#[tokio::test]
async fn prepared_kill9_between_phases_then_abort() {
    crash_between_phases(Mode::Prepared, false).await;
}

async fn two_workers(mode: Mode) {
    let client = db(mode).await;
    let table = unique("sink_two");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (seq bigserial PRIMARY KEY, worker text NOT NULL, n int NOT NULL, payload jsonb)"
        ))
        .await
        .unwrap();
    let port = free_port();
    let running = spawn(connector(&manifest(port, mode, &table, ", format: json, jsonColumns: true")));
    let run_worker = |name: &'static str| async move {
        let mut w = connect_sim(port, name).await;
        for round in 0..5 {
            for i in 0..200 {
                let n = round * 200 + i;
                let p = serde_json::json!({"worker": name, "n": n, "payload": {"round": round}});
                w.send(p.to_string().as_bytes()).await.unwrap();
            }
            assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
        }
        assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    };
    tokio::join!(run_worker("w1"), run_worker("w2"));
    let mut got: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for _ in 0..300 {
        let rows = client.query(&format!("SELECT worker, n FROM {table} ORDER BY seq"), &[]).await.unwrap();
        if rows.len() >= 2000 {
            got.clear();
            for r in rows {
                got.entry(r.get(0)).or_default().push(r.get(1));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want: Vec<i32> = (0..1000).collect();
    assert_eq!(got.get("w1"), Some(&want), "worker 1 rows exactly once, in order");
    assert_eq!(got.get("w2"), Some(&want), "worker 2 rows exactly once, in order");
    let round: i32 = client
        .query_one(&format!("SELECT (payload->>'round')::int FROM {table} WHERE worker = 'w2' AND n = 999"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(round, 4);
    running.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}

#[tokio::test]
async fn staging_two_workers_at_once() {
    two_workers(Mode::Staging).await;
}

#[tokio::test]
async fn prepared_two_workers_at_once() {
    two_workers(Mode::Prepared).await;
}

async fn permanent_error_votes_abort(mode: Mode) {
    let client = db(mode).await;
    let table = unique("sink_perm");
    let port = free_port();
    // The table does not exist yet, and later it lacks the key column: both are permanent errors.
    let running = spawn(connector(&manifest(port, mode, &table, ", format: lengthPrefixed")));
    let mut w = connect_sim(port, "worker1").await;
    let kv = |k: &str, v: &str| {
        let mut p = (k.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(k.as_bytes());
        p.extend_from_slice(v.as_bytes());
        p
    };
    w.send(&kv("k1", "v1")).await.unwrap();
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted, "missing table votes abort");

    client
        .batch_execute(&format!("CREATE TABLE {table} (seq bigserial PRIMARY KEY, value text NOT NULL)"))
        .await
        .unwrap();
    w.reconnect().await.unwrap();
    w.send(&kv("k1", "v1")).await.unwrap();
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted, "missing column votes abort");

    client.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN key text")).await.unwrap();
    w.reconnect().await.unwrap();
    w.send(&kv("k1", "v1")).await.unwrap();
    w.send(&kv("k2", "v2")).await.unwrap();
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed, "the fixed table takes the rows");
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    let rows: Vec<(String, String)> = client
        .query(&format!("SELECT key, value FROM {table} ORDER BY seq"), &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![("k1".into(), "v1".into()), ("k2".into(), "v2".into())]);
    assert!(!running.task.is_finished(), "the sidecar is still running");
    running.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}

#[tokio::test]
async fn staging_permanent_error_votes_abort() {
    permanent_error_votes_abort(Mode::Staging).await;
}

#[tokio::test]
async fn prepared_permanent_error_votes_abort() {
    permanent_error_votes_abort(Mode::Prepared).await;
}

async fn gap_votes_abort(mode: Mode) {
    let client = db(mode).await;
    let table = unique("sink_gap");
    create_table(&client, &table).await;
    let port = free_port();
    let running = spawn(connector(&manifest(port, mode, &table, "")));
    let mut w = connect_sim(port, &format!("w-{table}")).await;
    let a = batch("a", 0..100);
    send_all(&mut w, &a).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    // Rows staged before and after a gap: the round votes abort and none of them may appear.
    send_all(&mut w, &batch("lost", 0..50)).await;
    w.lose(7);
    send_all(&mut w, &batch("lost", 50..100)).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Aborted);
    w.reconnect().await.unwrap();
    assert!(w.resolved.is_empty(), "an abort vote leaves nothing pending");
    let b = batch("b", 0..100);
    send_all(&mut w, &b).await;
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
    let expected: Vec<String> = a.iter().chain(&b).cloned().collect();
    assert_eq!(wait_values(&client, &table, expected.len()).await, expected);
    running.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}

#[tokio::test]
async fn staging_gap_votes_abort_and_the_replay_commits() {
    gap_votes_abort(Mode::Staging).await;
}

#[tokio::test]
async fn prepared_gap_votes_abort_and_the_replay_commits() {
    gap_votes_abort(Mode::Prepared).await;
}
