//! The real binary under process faults: kill -9 mid-stream, SIGTERM, restarts.
mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use wallaroo_connector::sim::{RoundOutcome, SinkSim, SinkSimConfig, SourceSim, SourceSimConfig};
use wallaroo_connector::sinks::file::committed_output;

fn start(manifest: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wallaroo-connector"))
        .args(["run", "-f", manifest.to_str().unwrap(), "--admin-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

fn source_manifest(dir: &std::path::Path, port: u16, data: &std::path::Path) -> std::path::PathBuf {
    let m = dir.join("source.yaml");
    std::fs::write(
        &m,
        format!(
            "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {{name: f}}\nspec:\n  connectorName: f\n  worker: {{port: {port}}}\n  source:\n    file: {{path: \"{}\", streamName: s}}\n",
            data.display()
        ),
    )
    .unwrap();
    m
}

#[tokio::test]
async fn kill_9_mid_stream_then_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("in.txt");
    let lines = write_lines(&data, 300_000);
    let sim =
        SourceSim::start(SourceSimConfig { checkpoint_every: Some(Duration::from_millis(20)), ..Default::default() })
            .await
            .unwrap();
    let manifest = source_manifest(dir.path(), sim.addr().port(), &data);
    let mut child = start(&manifest);
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 50_000).await);
    child.kill().unwrap(); // SIGKILL: no drain, no goodbye
    child.wait().unwrap();
    let acked_at_kill = sim.acked("s").unwrap_or(0);
    let mut child = start(&manifest);
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "the restarted connector finishes cleanly");
    let got = sim.processed("s");
    let mut ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
    let mut seen = std::collections::HashSet::new();
    for id in &ids {
        if !seen.insert(*id) {
            assert!(*id > acked_at_kill, "record {id} was acknowledged before the kill but delivered again");
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let mut uniq: Vec<(u64, bytes::Bytes)> = got.clone();
    uniq.sort_by_key(|(id, _)| *id);
    uniq.dedup_by_key(|(id, _)| *id);
    let payloads: Vec<String> = uniq.iter().map(|(_, p)| String::from_utf8_lossy(p).into_owned()).collect();
    assert_eq!(payloads, lines, "every record at least once");
    let st = sim.stats();
    assert_eq!((st.credit_overruns, st.second_hello, st.protocol_errors), (0, 0, 0), "{st:?}");
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("in.txt");
    write_lines(&data, 2_000_000);
    let sim =
        SourceSim::start(SourceSimConfig { checkpoint_every: Some(Duration::from_millis(50)), ..Default::default() })
            .await
            .unwrap();
    let manifest = source_manifest(dir.path(), sim.addr().port(), &data);
    let child = start(&manifest);
    assert!(sim.wait_until(Duration::from_secs(60), |s| s.processed_total() >= 20_000).await);
    let pid = child.id() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc_kill(pid, 15) }, 0);
    let mut child = child;
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit 0 after SIGTERM, got {status:?}");
    let last = sim.processed("s").last().map(|(id, _)| *id);
    assert_eq!(sim.acked("s"), last, "everything sent was acknowledged before exit");
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[tokio::test]
async fn sink_killed_between_phases_resolves_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let port = free_port();
    let manifest = dir.path().join("sink.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {{name: s}}\nspec:\n  connectorName: s\n  worker: {{port: {port}}}\n  metricsPort: 9\n  sink:\n    file: {{dir: \"{}\"}}\n",
            out.display()
        ),
    )
    .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for completed in [true, false] {
        let mut child = start(&manifest);
        let mut w = loop {
            if let Ok(w) = SinkSim::connect(SinkSimConfig::new(addr, if completed { "a" } else { "b" })).await {
                break w;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        w.send(b"first round\n").await.unwrap();
        assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
        w.send(b"second round\n").await.unwrap();
        assert!(w.phase1().await.unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
        if completed {
            w.complete_without_phase2()
        } else {
            w.rollback_round()
        }
        let mut child = start(&manifest);
        loop {
            if w.reconnect().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(w.resolved.last().map(|r| r.1), Some(completed));
        if !completed {
            w.send(b"second round again\n").await.unwrap();
        }
        assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
        // Phase 2 has no reply: one more round trip proves it was applied.
        assert_eq!(w.checkpoint().await.unwrap(), RoundOutcome::Committed);
        let name = if completed { "a" } else { "b" };
        let want: &[u8] = if completed { b"first round\nsecond round\n" } else { b"first round\nsecond round again\n" };
        assert_eq!(committed_output(&out, name).unwrap(), want);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[tokio::test]
async fn sigterm_ends_the_process_even_when_the_worker_stops_reading() {
    // A worker that grants a million credits and then never reads: the source's writes block once the socket
    // buffers fill. SIGTERM must still end the process within the drain timeout (2 s here), not hang.
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wallaroo_connector::protocol::{Frame, U64_MAX, stream_id_for};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("in.txt");
    write_lines(&data, 2_000_000);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let m = dir.path().join("source.yaml");
    std::fs::write(
        &m,
        format!(
            "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {{name: f}}\nspec:\n  connectorName: f\n  drainTimeoutSeconds: 2\n  worker: {{port: {port}}}\n  source:\n    file: {{path: \"{}\", streamName: s}}\n",
            data.display()
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(Some(start(&m)));
    let (mut sock, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await.unwrap().unwrap();
    // Play the worker up to the grant: HELLO -> OK(1,000,000), NOTIFY -> NOTIFY_ACK.
    let codec = wallaroo_connector::protocol::FrameCodec::default();
    let mut buf = BytesMut::new();
    let next = async |sock: &mut tokio::net::TcpStream, buf: &mut BytesMut| loop {
        if let Some(body) = codec.split_frame(buf).unwrap() {
            return Frame::decode(body).unwrap();
        }
        assert!(sock.read_buf(buf).await.unwrap() > 0, "the connector hung up");
    };
    assert!(matches!(next(&mut sock, &mut buf).await, Frame::Hello(_)));
    let mut out = BytesMut::new();
    Frame::Ok { initial_credits: 1_000_000 }.encode(&mut out).unwrap();
    sock.write_all(&out).await.unwrap();
    let sid = loop {
        if let Frame::Notify { stream_id, .. } = next(&mut sock, &mut buf).await {
            break stream_id;
        }
    };
    assert_eq!(sid, stream_id_for(b"s"));
    out.clear();
    Frame::NotifyAck { success: true, stream_id: sid, point_of_ref: U64_MAX }.encode(&mut out).unwrap();
    sock.write_all(&out).await.unwrap();
    // Records are flowing (1 MiB read proves it); then never read again, so the connector fills the socket
    // buffers and blocks in its write.
    let mut flowing = vec![0u8; 1 << 20];
    tokio::time::timeout(Duration::from_secs(30), sock.read_exact(&mut flowing)).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut child = child.0.take().unwrap();
    let pid = child.id() as i32;
    assert_eq!(unsafe { libc_kill(pid, 15) }, 0);
    let waited = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert!(waited.is_some(), "still running 15 s after SIGTERM with drainTimeoutSeconds: 2");
    drop(sock);
}

/// A child that a failing test must not leave running.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
