//! The admin server: `/metrics` (Prometheus text), `/livez`, `/readyz`.
//!
//! It listens on the pod network, so anyone who can reach the pod can connect. A peer that opens connections
//! and never finishes a request must not be able to use up the process's file descriptors (the worker
//! connection needs one too), so: at most `maxConnections` connections are served at once (further ones wait
//! in the kernel's accept queue, holding no descriptor of ours), a request's headers must arrive within
//! `headerReadTimeoutSeconds`, and no connection lives longer than `connectionTimeoutSeconds`.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wallaroo_crds::{
    AdminSettings, DEFAULT_ADMIN_CONNECTION_TIMEOUT_SECONDS, DEFAULT_ADMIN_HEADER_READ_TIMEOUT_SECONDS,
    DEFAULT_ADMIN_MAX_CONNECTIONS,
};

use super::{Health, Metrics};

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    health: Health,
}

/// The bounds of the admin server (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub connection_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self::from_settings(None)
    }
}

impl AdminLimits {
    pub fn from_settings(s: Option<&AdminSettings>) -> Self {
        let secs = |v: Option<u32>, default: u32| Duration::from_secs(u64::from(v.unwrap_or(default).max(1)));
        Self {
            max_connections: s.and_then(|s| s.max_connections).unwrap_or(DEFAULT_ADMIN_MAX_CONNECTIONS).max(1) as usize,
            header_read_timeout: secs(
                s.and_then(|s| s.header_read_timeout_seconds),
                DEFAULT_ADMIN_HEADER_READ_TIMEOUT_SECONDS,
            ),
            connection_timeout: secs(
                s.and_then(|s| s.connection_timeout_seconds),
                DEFAULT_ADMIN_CONNECTION_TIMEOUT_SECONDS,
            ),
        }
    }
}

/// A running admin server.
pub struct AdminServer {
    /// The bound address (port 0 picks one).
    pub addr: SocketAddr,
    /// Ends once `stop` fired and the open connections closed (or were given up on).
    pub task: tokio::task::JoinHandle<()>,
    active: Arc<AtomicUsize>,
}

impl AdminServer {
    /// Connections being served right now (never above `max_connections`).
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Binds the admin server and serves it until `stop` fires.
pub async fn serve(
    addr: SocketAddr,
    limits: AdminLimits,
    metrics: Metrics,
    health: Health,
    stop: CancellationToken,
) -> std::io::Result<AdminServer> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(AdminState { metrics, health });
    let active = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(accept_loop(listener, app, limits, active.clone(), stop));
    Ok(AdminServer { addr: bound, task, active })
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: AdminLimits,
    active: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        // Take a slot before accepting: at the cap, new connections wait in the kernel's queue, not in our table.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the slot is returned with the permit.
                    tracing::warn!(error = %e, "admin server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let app = app.clone();
        let stop = stop.clone();
        let active = active.clone();
        active.fetch_add(1, Ordering::Relaxed);
        tracker.spawn(async move {
            serve_connection(stream, app, limits, &stop).await;
            tracing::trace!(%peer, "admin connection closed");
            active.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    tracker.close();
    // Responses in flight get a moment; a peer that holds its connection open does not delay the exit.
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
}

async fn serve_connection(stream: tokio::net::TcpStream, app: Router, limits: AdminLimits, stop: &CancellationToken) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(conn);
    let deadline = tokio::time::sleep(limits.connection_timeout);
    tokio::pin!(deadline);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
            return;
        }
        _ = &mut deadline => {}
        _ = stop.cancelled() => {}
    }
    // Finish the response in flight (if any), then close; a peer that does not read it is dropped.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], s.metrics.render())
}

async fn ready_handler(State(s): State<AdminState>) -> impl IntoResponse {
    if s.health.ready() {
        (StatusCode::OK, "ready".to_string())
    } else {
        let why = format!("not ready: worker={} external={}", s.health.worker(), s.health.external());
        (StatusCode::SERVICE_UNAVAILABLE, why)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Accepted (not merely queued) TCP connections on `port` in this process: queued ones have no inode yet.
    /// Read from /proc so that it counts whatever the server implementation does.
    fn accepted_connections(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let local_port =
                    f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
                local_port == Some(port) && f.get(3) == Some(&"01") && f.get(9).is_some_and(|i| *i != "0")
            })
            .count()
    }

    async fn livez(addr: SocketAddr) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn idle_half_requests_neither_exhaust_the_process_nor_block_livez_for_good() {
        const CAP: usize = 8;
        let stop = CancellationToken::new();
        let limits = AdminLimits {
            max_connections: CAP,
            header_read_timeout: Duration::from_secs(1),
            connection_timeout: Duration::from_secs(60),
        };
        let metrics = Metrics::new("t", "udp", "source").unwrap();
        let server = serve("127.0.0.1:0".parse().unwrap(), limits, metrics, Health::new(), stop.clone()).await.unwrap();
        let addr = server.addr;
        // 60 peers that start a request and never finish it.
        let mut idle = Vec::new();
        for _ in 0..60 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            idle.push(s);
        }
        let probe = tokio::spawn(async move { livez(addr).await });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut most = 0;
        while !probe.is_finished() {
            assert!(Instant::now() < deadline, "/livez answered within a minute");
            most = most.max(accepted_connections(addr.port()));
            assert!(server.active_connections() <= CAP);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let answer = probe.await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer:?}");
        assert!(most <= CAP, "at most {CAP} connections held at once, saw {most}");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), server.task).await.unwrap().unwrap();
    }
}
