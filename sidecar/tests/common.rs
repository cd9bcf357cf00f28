//! Helpers shared by the end-to-end suites of the sidecar.
#![allow(dead_code)]
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wallaroo_connector::runtime::run::{RunOverrides, run};
use wallaroo_crds::Connector;

/// Parses a Connector manifest (validated like `wallaroo-connector validate`).
pub fn connector(yaml: &str) -> Connector {
    wallaroo_crds::parse_connectors(yaml, "test").expect("valid manifest").remove(0)
}

pub struct Running {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), String>>,
}

/// Runs a connector in this process (admin server on an ephemeral port).
pub fn spawn(c: Connector) -> Running {
    let stop = CancellationToken::new();
    let overrides =
        RunOverrides { admin_addr: Some("127.0.0.1:0".parse().unwrap()), drain_timeout: Some(Duration::from_secs(5)) };
    let s = stop.clone();
    let task = tokio::spawn(async move { run(c, overrides, s).await.map_err(|e| e.to_string()) });
    Running { stop, task }
}

pub fn write_lines(path: &Path, n: usize) -> Vec<String> {
    let lines: Vec<String> = (0..n).map(|i| format!("record-{i:06}")).collect();
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    lines
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn payloads(v: &[(u64, bytes::Bytes)]) -> Vec<String> {
    v.iter().map(|(_, p)| String::from_utf8_lossy(p).into_owned()).collect()
}

/// Compares payload lists and reports a readable difference (lists are long).
#[track_caller]
pub fn assert_same(got: &[String], want: &[String]) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    let lo = first.saturating_sub(3);
    panic!(
        "got {} payloads, want {}; first difference at {first}: got {:?} want {:?}",
        got.len(),
        want.len(),
        &got[lo..(first + 5).min(got.len())],
        &want[lo..(first + 5).min(want.len())]
    );
}

/// The connector broke no protocol rule the simulated worker checks.
#[track_caller]
pub fn clean(s: &wallaroo_connector::sim::SourceSimState) {
    let st = s.stats();
    assert_eq!((st.credit_overruns, st.second_hello, st.protocol_errors, st.id_regressions), (0, 0, 0, 0), "{st:?}");
}

pub struct Sidecar {
    pub child: std::process::Child,
    _dir: tempfile::TempDir,
}

/// A failing test must not leave a sidecar running.
impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sidecar binary, so it can be killed with SIGKILL.
pub fn start_binary(yaml: &str) -> Sidecar {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("connector.yaml");
    std::fs::write(&path, yaml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_wallaroo-connector"))
        .args(["run", "-f", path.to_str().unwrap(), "--admin-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    Sidecar { child, _dir: dir }
}
