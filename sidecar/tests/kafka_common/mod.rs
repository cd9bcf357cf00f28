//! Helpers for the Kafka integration tests: a real broker (Apache Kafka, KRaft, single node) on 127.0.0.1:9092
//! started by `tests/services/kafka.sh`, private brokers for outage tests, topics with random names, producing,
//! reading committed group offsets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

pub const BROKER: &str = "127.0.0.1:9092";

/// Logs of the in-process connector, filtered by RUST_LOG (shown for failing tests).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Fails loudly when the broker is not there: the CI starts it with `tests/services/kafka.sh`.
pub fn require_broker(addr: &str) {
    init_tracing();
    let ok = std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)).is_ok();
    assert!(ok, "no Kafka broker at {addr}: run tests/services/kafka.sh first");
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), rand::random::<u32>())
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let res = admin.create_topics(&[t], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))).await;
    let res = res.expect("create_topics");
    for r in res {
        r.expect("topic created");
    }
    // Let metadata settle so producers and consumers see every partition.
    for _ in 0..50 {
        let md = admin.inner().fetch_metadata(Some(topic), Duration::from_secs(2)).expect("metadata");
        if md.topics().first().is_some_and(|t| t.partitions().len() == partitions as usize && t.error().is_none()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("topic {topic} did not show {partitions} partitions");
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

pub fn payload(partition: i32, i: usize) -> String {
    format!("p{partition}-m{i}")
}

/// Produces `count` records to each of `partitions` (explicit partitions), payloads from [`payload`] numbered
/// from `first`, keys `k<i>`. Waits for every delivery.
pub async fn produce(p: &FutureProducer, topic: &str, partitions: i32, first: usize, count: usize) {
    let mut futs = Vec::new();
    for i in first..first + count {
        for part in 0..partitions {
            let value = payload(part, i);
            let key = format!("k{i}");
            let f = p
                .send_result(FutureRecord::to(topic).partition(part).payload(value.as_bytes()).key(key.as_bytes()))
                .map_err(|(e, _)| e)
                .expect("enqueue");
            futs.push(f);
        }
        if futs.len() >= 5000 {
            for f in futs.drain(..) {
                f.await.expect("delivery future").expect("delivered");
            }
        }
    }
    for f in futs {
        f.await.expect("delivery future").expect("delivered");
    }
}

/// The group's committed offsets (next offset to read) per partition; `None` where nothing is committed.
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    // Right after a broker (re)start the group coordinator may still be loading the offsets topic: ask again.
    let mut attempt = 0;
    let got = loop {
        match c.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(got) => break got,
            Err(e) if attempt < 30 => {
                eprintln!("committed offsets: {e}; asking again");
                attempt += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("committed offsets: {e}"),
        }
    };
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect()
}

/// A source Connector manifest for the Kafka source.
pub fn source_manifest(worker: SocketAddr, brokers: &str, topic: &str, group: &str) -> String {
    format!(
        r#"apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata:
  name: kafka-test
spec:
  connectorName: kafka_in
  drainTimeoutSeconds: 10
  worker:
    host: "{host}"
    port: {port}
    cookie: Dragons-Love-Tacos
    instanceName: kafka-test
  source:
    kafka:
      brokers: ["{brokers}"]
      topics: ["{topic}"]
      groupId: "{group}"
      startFrom: earliest
      revokeTimeoutSeconds: 5
      properties:
        session.timeout.ms: "6000"
        heartbeat.interval.ms: "500"
"#,
        host = worker.ip(),
        port = worker.port()
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on the admin server; the status code, or None when nothing answers.
/// Polls `/readyz` for up to 30 s until it answers `want`.
pub async fn wait_readyz(admin: SocketAddr, want: u16) -> bool {
    for _ in 0..300 {
        if http_status(admin, "/readyz").await == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).await.map(|(status, _)| status)
}

/// `GET path` on the admin server: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

pub async fn wait_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing listens on {port}");
}

/// A TCP proxy standing in for the network between clients and a broker: stopping it drops every client
/// connection and refuses new ones (a network cut), while the broker itself keeps running.
pub struct Proxy {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(listen: u16, target: u16) -> Proxy {
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", listen)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    _ = token.cancelled() => return,
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy { stop, task }
    }

    /// Closes the listener and every proxied connection.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A private Apache Kafka broker (its own JVM, ports and data directory, started and stopped through
/// `tests/services/kafka.sh`) that clients reach only through a [`Proxy`] on its advertised port. A test can cut
/// the network ([`cut`](Self::cut)/[`restore`](Self::restore)) or restart the broker itself
/// ([`restart`](Self::restart)); its topics and committed offsets survive both.
pub struct PrivateBroker {
    /// `host:port` for clients (the proxy).
    pub brokers: String,
    port: u16,
    public: u16,
    proxy: Option<Proxy>,
    env: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
}

fn kafka_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/services/kafka.sh")
}

impl PrivateBroker {
    pub async fn start() -> PrivateBroker {
        let (port, public, controller, internal) = (free_port(), free_port(), free_port(), free_port());
        let dir = tempfile::Builder::new()
            .prefix("wallaroo-kafka-")
            .disable_cleanup(std::env::var_os("KEEP_LOGS").is_some())
            .tempdir()
            .unwrap();
        eprintln!("private Kafka broker in {}", dir.path().display());
        let env = vec![
            ("KAFKA_PORT", port.to_string()),
            ("KAFKA_ADVERTISED_PORT", public.to_string()),
            ("KAFKA_CONTROLLER_PORT", controller.to_string()),
            ("KAFKA_INTERNAL_PORT", internal.to_string()),
            ("KAFKA_DIR", dir.path().display().to_string()),
            ("KAFKA_HEAP", "256m".to_string()),
        ];
        let mut broker = PrivateBroker { brokers: format!("127.0.0.1:{public}"), port, public, proxy: None, env, dir };
        broker.script("start").await;
        broker.proxy = Some(Proxy::start(public, port).await);
        broker
    }

    /// Runs `tests/services/kafka.sh VERB` for this broker; panics with the script's output when it fails.
    async fn script(&self, verb: &'static str) {
        let mut cmd = Command::new("bash");
        cmd.arg(kafka_script()).arg(verb).envs(self.env.iter().map(|(k, v)| (k, v)));
        let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("run kafka.sh");
        assert!(
            out.status.success(),
            "kafka.sh {verb} failed: {}\n{}\n(broker log in {})",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.dir.path().display()
        );
    }

    /// A network outage as clients see it: connections dropped, new ones refused; the broker keeps running.
    pub async fn cut(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop().await;
        }
    }

    pub async fn restore(&mut self) {
        if self.proxy.is_none() {
            self.proxy = Some(Proxy::start(self.public, self.port).await);
        }
    }

    /// Stops the broker process (controlled shutdown) and starts it again on the same data directory.
    pub async fn restart(&mut self) {
        self.script("stop").await;
        self.script("start").await;
    }

    pub async fn stop(mut self) {
        self.cut().await;
        self.script("stop").await;
    }
}

impl Drop for PrivateBroker {
    /// A failing test must not leave a JVM behind ([`stop`](Self::stop) ran the same, so this is then a no-op).
    fn drop(&mut self) {
        let _ =
            Command::new("bash").arg(kafka_script()).arg("stop").envs(self.env.iter().map(|(k, v)| (k, v))).output();
    }
}
