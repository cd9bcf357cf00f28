//! Connections, SQL quoting and error classification for the PostgreSQL sink.
use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use crate::runtime::sink_api::SinkError;
use crate::runtime::{Health, Metrics};

/// Opens a connection and drives it on its own task. `lock_timeout` keeps a worker's session from waiting
/// forever on a row lock (e.g. its own offsets row held by a prepared transaction), turning it into an error.
/// The server sees `application_name = wallaroo-connector` unless the URL names one (`?application_name=...`),
/// which tells the backends of several sinks apart in `pg_stat_activity`.
pub async fn connect(url: &str, health: &Health, metrics: &Metrics) -> Result<Client, SinkError> {
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|e| SinkError::Permanent(format!("spec.sink.postgres.url: not a PostgreSQL URL: {e}")))?;
    if config.get_application_name().is_none() {
        config.application_name("wallaroo-connector");
    }
    match config.connect(NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "postgres connection ended");
                }
            });
            client.batch_execute("SET lock_timeout = '10s'").await.map_err(|e| classify(e, "session setup"))?;
            health.set_external(true);
            metrics.external_connected.set(1);
            Ok(client)
        }
        Err(e) => {
            health.set_external(false);
            metrics.external_connected.set(0);
            metrics.reconnects_total.with_label_values(&["postgres"]).inc();
            Err(SinkError::Transient(format!("postgres: cannot connect: {e}")))
        }
    }
}

/// One shared autocommit connection for catalog look-ups, recovery and `COMMIT PREPARED`; reconnected on demand.
/// tokio-postgres pipelines concurrent queries on one client, so workers share it without a pool.
pub struct Control {
    url: String,
    client: Mutex<Option<Arc<Client>>>,
    health: Health,
    metrics: Metrics,
}

impl Control {
    pub fn new(url: String, health: Health, metrics: Metrics) -> Self {
        Self { url, client: Mutex::new(None), health, metrics }
    }

    pub async fn get(&self) -> Result<Arc<Client>, SinkError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let c = Arc::new(connect(&self.url, &self.health, &self.metrics).await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Retrying cannot fix a missing table, a bad column, bad data or a constraint violation; it can fix a lost
/// connection, a serialization failure, a lock timeout or a server that is starting or shutting down.
pub fn classify(e: tokio_postgres::Error, what: &str) -> SinkError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let class = code.get(..2).unwrap_or("");
        let msg = format!("postgres {what}: {} ({code})", db.message());
        return match class {
            "08" | "40" | "53" | "55" | "57" | "58" => SinkError::Transient(msg),
            _ => SinkError::Permanent(msg),
        };
    }
    SinkError::Transient(format!("postgres {what}: {e}"))
}

/// `a.b` -> `"a"."b"`: identifiers are validated as plain names, quoting keeps their exact case.
pub fn quote_ident(name: &str) -> String {
    name.split('.').map(|p| format!("\"{}\"", p.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

/// A SQL string literal (for statements that take no parameters, like `PREPARE TRANSACTION`).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("public.Events"), "\"public\".\"Events\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
