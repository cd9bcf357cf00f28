//! `source.redis`: Redis pub/sub channels (at-most-once across sidecar crashes) or a Redis Streams consumer
//! group (at-least-once). See the README section "Redis source".
//!
//! - [`pubsub`]: one stream per channel or pattern, point of reference = a counter, a bounded in-memory buffer
//!   of unacknowledged messages for replay after a worker reconnect.
//! - [`stream`]: XREADGROUP with XACK on durable, redelivery of this consumer's pending entries after a crash,
//!   XAUTOCLAIM of entries left pending by dead consumers; point of reference = the entry id ([`por`]).
use std::time::Duration;

use redis::AsyncConnectionConfig;
use wallaroo_crds::{RedisMode, RedisSource as RedisSourceConfig, SecretValue};

use crate::runtime::source_api::{SourceContext, SourceError, SourceIntegration};

pub mod por;
pub mod pubsub;
pub mod stream;

pub struct RedisSource {
    cfg: RedisSourceConfig,
}

impl RedisSource {
    pub fn new(cfg: RedisSourceConfig) -> Self {
        Self { cfg }
    }
}

#[async_trait::async_trait]
impl SourceIntegration for RedisSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let url =
            resolve_url(&self.cfg.url, &self.cfg.url_from, "spec.source.redis.url").map_err(SourceError::Config)?;
        let client = redis::Client::open(url.as_str())
            .map_err(|e| SourceError::Config(format!("spec.source.redis.url: {e}")))?;
        let result = match self.cfg.mode {
            RedisMode::Pubsub => pubsub::run(self.cfg, client, ctx).await,
            RedisMode::Stream => stream::run(self.cfg, client, ctx).await,
        };
        // Logged here as well: the runtime reports an integration's error only once the session ends.
        if let Err(e) = &result {
            tracing::error!(error = %e, "redis source stopped");
        }
        result
    }
}

/// The URL from the inline field or the secret it names (validation guarantees exactly one is set).
pub fn resolve_url(inline: &Option<String>, from: &Option<SecretValue>, field: &str) -> Result<String, String> {
    match (inline, from) {
        (_, Some(s)) => s.resolve(&format!("{field}From")).map_err(|e| e.to_string()),
        (Some(u), None) => Ok(u.clone()),
        (None, None) => Err(format!("{field}: set url or urlFrom")),
    }
}

/// Connection settings for command connections: blocking reads need a response timeout above their BLOCK time.
pub(crate) fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)))
}

/// Exponential backoff for reconnects: 100 ms doubling up to 5 s.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Self { next: Duration::from_millis(100) }
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        d
    }
}
