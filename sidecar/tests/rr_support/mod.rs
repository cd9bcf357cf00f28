//! Helpers for the Redis and RabbitMQ suites: the sidecar binary as a child process (for kill -9), a TCP
//! proxy that can cut and refuse connections (a server going down and coming back without stopping the
//! shared server), and unique names.
#![allow(dead_code)]
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// A connection to the test Redis.
pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379 (tests/services/redis.sh)")
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

/// The sidecar binary running one manifest; killed on drop.
pub struct Sidecar {
    child: Child,
    dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Sidecar {
    pub fn start(manifest: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), manifest)
    }

    fn start_in(dir: tempfile::TempDir, manifest: &str) -> Self {
        let file = dir.path().join("connector.yaml");
        std::fs::write(&file, manifest).unwrap();
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        let log = dir.path().join(format!("sidecar-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_wallaroo-connector"))
            .args(["run", "-f"])
            .arg(&file)
            .args(["--admin-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info,wallaroo_connector=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn the sidecar binary");
        Self { child, dir, log }
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        for _ in 0..300 {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sidecar did not exit after SIGTERM; log:\n{}", self.log_text());
    }

    /// The same manifest again (a restarted pod).
    pub fn restart(mut self) -> Self {
        self.kill9();
        let manifest = std::fs::read_to_string(self.dir.path().join("connector.yaml")).unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Self::start_in(dir, &manifest)
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log_text(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder to a real server. `down()` cuts every connection and refuses new ones until `up()`.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let target = target.to_string();
        let (u, c, s) = (up.clone(), cut.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if !u.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = c.lock().await.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, up, cut, stop }
    }

    pub async fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut cut = self.cut.lock().await;
        cut.cancel();
        *cut = CancellationToken::new();
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A worker that takes exactly `n` records and then grants nothing more (refills held back, no checkpoints): the
/// setup for checking what a source commits upstream when the worker misbehaves after those `n`.
pub async fn worker_taking(n: u32) -> wallaroo_connector::sim::SourceSim {
    let sim = wallaroo_connector::sim::SourceSim::start(wallaroo_connector::sim::SourceSimConfig {
        // One credit goes to the NOTIFY.
        max_credits: n + 1,
        refill_credits: 1,
        checkpoint_every: None,
        ..Default::default()
    })
    .await
    .unwrap();
    sim.stall_credits(true);
    sim
}
