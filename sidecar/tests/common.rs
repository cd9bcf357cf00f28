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
