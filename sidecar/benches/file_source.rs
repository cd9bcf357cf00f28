//! File source -> simulated worker throughput and the sidecar's RSS (`cargo bench -p wallaroo-connector
//! --bench file_source`). The baseline, run in the same invocation, pushes the same pre-encoded MESSAGE frames
//! through a plain TCP socket into the same simulator, without any connector logic: the ratio is what the
//! connector (file reading, framing, credits, acks) costs on top of the transport and the worker's decoding.
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use wallaroo_connector::protocol::{Frame, Hello, encode_message, stream_id_for};
use wallaroo_connector::sim::{SourceSim, SourceSimConfig};

const RECORDS: u64 = 3_000_000;
const SIZE: usize = 64;

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

async fn sim(max: u32, refill: u32) -> SourceSim {
    SourceSim::start(SourceSimConfig {
        max_credits: max,
        refill_credits: refill,
        checkpoint_every: Some(Duration::from_millis(100)),
        keep_payloads: false,
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn baseline(max: u32, refill: u32) -> f64 {
    let sim = sim(max, refill).await;
    let mut sock = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    let mut hello = BytesMut::new();
    Frame::Hello(Hello {
        version: "0.0.1".into(),
        cookie: wallaroo_crds::DEFAULT_COOKIE.into(),
        program_name: "bench".into(),
        instance_name: "bench".into(),
    })
    .encode(&mut hello)
    .unwrap();
    let sid = stream_id_for(b"baseline");
    Frame::Notify { stream_id: sid, stream_name: "baseline".into(), point_of_ref: 0 }.encode(&mut hello).unwrap();
    sock.write_all(&hello).await.unwrap();
    let payload = vec![b'x'; SIZE];
    let mut buf = BytesMut::with_capacity(1 << 20);
    let start = Instant::now();
    for id in 1..=RECORDS {
        encode_message(&mut buf, sid, id, None, &payload).unwrap();
        if buf.len() >= 256 * 1024 {
            sock.write_all(&buf).await.unwrap();
            buf.clear();
        }
    }
    sock.write_all(&buf).await.unwrap();
    assert!(sim.wait_until(Duration::from_secs(120), |s| s.processed_total() >= RECORDS).await);
    RECORDS as f64 / start.elapsed().as_secs_f64()
}

async fn sidecar(path: &str, max: u32, refill: u32) -> (f64, u64) {
    let sim = sim(max, refill).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("c.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {{name: bench}}\nspec:\n  connectorName: bench\n  worker: {{port: {}}}\n  metricsPort: 9\n  source:\n    file: {{path: \"{path}\", format: framed}}\n",
            sim.addr().port()
        ),
    )
    .unwrap();
    let start = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wallaroo-connector"))
        .args(["run", "-f", manifest.to_str().unwrap(), "--admin-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    while sim.with(|s| s.processed_total()) < RECORDS {
        peak = peak.max(rss_kib(pid, "VmRSS:"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(start.elapsed() < Duration::from_secs(300), "sidecar too slow");
    }
    let rate = RECORDS as f64 / start.elapsed().as_secs_f64();
    peak = peak.max(rss_kib(pid, "VmHWM:"));
    let _ = child.kill();
    let _ = child.wait();
    (rate, peak)
}

async fn idle_rss() -> u64 {
    let sim = sim(500, 50).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("empty");
    std::fs::write(&data, b"").unwrap();
    let manifest = dir.path().join("c.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {{name: idle}}\nspec:\n  connectorName: idle\n  worker: {{port: {}}}\n  metricsPort: 9\n  source:\n    file: {{path: \"{}\", follow: true}}\n",
            sim.addr().port(),
            data.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wallaroo-connector"))
        .args(["run", "-f", manifest.to_str().unwrap(), "--admin-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(child.id(), "VmRSS:");
    let _ = child.kill();
    let _ = child.wait();
    rss
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("records.framed");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut rec = BytesMut::with_capacity(4 + SIZE);
        for i in 0..RECORDS {
            rec.clear();
            rec.put_u32(SIZE as u32);
            let body = format!("{i:0width$}", width = SIZE);
            rec.put_slice(body.as_bytes());
            f.write_all(&rec).unwrap();
        }
    }
    let path = path.to_str().unwrap().to_string();
    println!("records: {RECORDS} x {SIZE} bytes (framed file)");
    for (max, refill) in [(500u32, 50u32), (10_000, 1_000)] {
        let base = baseline(max, refill).await;
        let (rate, rss) = sidecar(&path, max, refill).await;
        println!(
            "credits {max}/{refill}: baseline (raw TCP frames) {:.0} msg/s | file source sidecar {:.0} msg/s, {:.1} MB/s payload | ratio {:.2} | peak RSS {:.1} MiB",
            base,
            rate,
            rate * SIZE as f64 / 1e6,
            rate / base,
            rss as f64 / 1024.0
        );
    }
    println!("idle RSS (connected, nothing to send): {:.1} MiB", idle_rss().await as f64 / 1024.0);
}
