//! The PostgreSQL sink holds a bounded number of server connections however many distinct workers come and go
//! (against the shared server of `tests/services/postgres.sh`, 127.0.0.1:5432, staging mode).
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::{Client, NoTls};
use wallaroo_connector::runtime::sink_api::{SinkIntegration, SinkRecord, Txn};
use wallaroo_connector::runtime::{Health, Metrics};
use wallaroo_connector::sinks::postgres::PostgresSink;

const SHARED: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn db() -> Client {
    let (client, conn) = tokio_postgres::connect(SHARED, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {SHARED} is not reachable (run tests/services/postgres.sh): {e}"));
    tokio::spawn(conn);
    client
}

async fn backends(db: &Client, app: &str) -> i64 {
    db.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", &[&app]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_distinct_workers_hold_a_bounded_number_of_backends() {
    const CAP: i64 = 3;
    let db = db().await;
    let tag = rand::random::<u32>();
    let (table, app) = (format!("bounds_{tag}"), format!("wallaroo-bounds-{tag}"));
    db.batch_execute(&format!("CREATE TABLE {table} (seq bigserial PRIMARY KEY, value text NOT NULL)")).await.unwrap();
    let cfg: wallaroo_crds::PostgresSink = serde_json::from_value(serde_json::json!({
        "url": format!("{SHARED}?application_name={app}"),
        "table": table,
        "valueColumn": "value",
        "twoPhase": "staging",
        "maxConnections": CAP,
        "idleTimeoutSeconds": 1,
    }))
    .unwrap();
    let sink = PostgresSink::connect(cfg, Health::new(), Metrics::new("t", "postgres", "sink").unwrap()).await.unwrap();
    let mut most = 0;
    for i in 0..30 {
        let worker = format!("worker-{i}");
        let r = sink.recover(&worker).await.unwrap();
        let start = r.committed.unwrap_or(0);
        let payload = Bytes::from(format!("row of {worker}"));
        let txn = Txn { id: Bytes::from(format!("t{i}")), start, end: start + payload.len() as u64 };
        sink.stage(&worker, vec![SinkRecord { offset: start, payload }]).await.unwrap();
        sink.prepare(&worker, &txn).await.unwrap();
        sink.commit(&worker, &txn).await.unwrap();
        most = most.max(backends(&db, &app).await);
    }
    let rows: i64 = db.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0);
    assert_eq!(rows, 30, "every worker's row arrived");
    // The worker connections plus the shared control connection.
    assert!(most <= CAP + 1, "at most {} backends at once, saw {most}", CAP + 1);
    // Idle connections are closed: only the control connection stays.
    let deadline = Instant::now() + Duration::from_secs(60);
    while backends(&db, &app).await > 1 {
        assert!(Instant::now() < deadline, "idle worker connections were closed within a minute");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A forgotten worker's state is gone and a worker that comes back works again.
    sink.forget("worker-0").await.unwrap();
    let r = sink.recover("worker-1").await.unwrap();
    assert!(r.committed.is_some_and(|c| c > 0));
    db.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
}
