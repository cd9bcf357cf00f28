use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Readiness as `/readyz` reports it: connected to the worker (source) or listening for it (sink), connected
/// to the external system, and not shutting down. Cheap to clone and to update from any task.
#[derive(Clone, Debug, Default)]
pub struct Health(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    worker: AtomicBool,
    external: AtomicBool,
    stopping: AtomicBool,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set_worker(&self, up: bool) {
        self.0.worker.store(up, Ordering::Relaxed);
    }
    pub fn set_external(&self, up: bool) {
        self.0.external.store(up, Ordering::Relaxed);
    }
    pub fn set_stopping(&self) {
        self.0.stopping.store(true, Ordering::Relaxed);
    }
    pub fn worker(&self) -> bool {
        self.0.worker.load(Ordering::Relaxed)
    }
    pub fn external(&self) -> bool {
        self.0.external.load(Ordering::Relaxed)
    }
    pub fn ready(&self) -> bool {
        self.worker() && self.external() && !self.0.stopping.load(Ordering::Relaxed)
    }
}
