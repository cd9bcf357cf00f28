//! Sink integrations: one struct per kind, as written under `spec.sink.<kind>`.
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::format::{PayloadFormat, PayloadMapping};
use crate::secret::SecretValue;

/// Exactly one kind must be set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "[has(self.udp), has(self.file), has(self.postgres), has(self.s3), has(self.redisHash), has(self.kafka), has(self.kinesis)].filter(x, x).size() == 1", "message": "set exactly one sink kind"}]))]
pub struct SinkSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Sink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_hash: Option<RedisHashSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinesis: Option<KinesisSink>,
}

pub const SINK_KINDS: &[&str] = &["udp", "file", "postgres", "s3", "redisHash", "kafka", "kinesis"];

impl SinkSpec {
    pub fn kind_names(&self) -> Vec<&'static str> {
        let set = [
            self.udp.is_some(),
            self.file.is_some(),
            self.postgres.is_some(),
            self.s3.is_some(),
            self.redis_hash.is_some(),
            self.kafka.is_some(),
            self.kinesis.is_some(),
        ];
        SINK_KINDS.iter().zip(set).filter(|(_, s)| *s).map(|(k, _)| *k).collect()
    }

    pub(crate) fn secrets(&self) -> Vec<&Option<SecretValue>> {
        let mut v = Vec::new();
        if let Some(p) = &self.postgres {
            v.push(&p.url_from);
        }
        if let Some(s) = &self.s3 {
            v.push(&s.access_key_id_from);
            v.push(&s.secret_access_key_from);
        }
        if let Some(r) = &self.redis_hash {
            v.push(&r.url_from);
        }
        if let Some(k) = &self.kafka {
            v.push(&k.sasl_password_from);
        }
        if let Some(k) = &self.kinesis {
            v.push(&k.access_key_id_from);
            v.push(&k.secret_access_key_from);
        }
        v
    }
}

/// Sends each committed-or-not message as one datagram (best effort).
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UdpSink {
    pub host: String,
    pub port: u16,
}

/// Appends each worker's output to `<dir>/<worker>.out`, exactly once (the ALOC reference sink, in Rust).
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSink {
    /// Directory holding one output file and one transaction log per worker.
    pub dir: String,
}

macro_rules! payload_mapping {
    ($t:ty) => {
        impl $t {
            pub fn mapping(&self) -> PayloadMapping {
                PayloadMapping {
                    format: self.format,
                    key_field: self.key_field.clone(),
                    value_field: self.value_field.clone(),
                }
            }
        }
    };
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresSink {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    pub table: String,
    #[serde(default = "key_column")]
    pub key_column: String,
    #[serde(default = "value_column")]
    pub value_column: String,
    /// Format `json` with no `valueField`: every field of the object goes to the column of the same name.
    #[serde(default)]
    pub json_columns: bool,
    #[serde(default)]
    pub format: PayloadFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_field: Option<String>,
    /// Rows per INSERT/COPY batch (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// How Phase 1 holds a checkpoint's rows: `auto` (default) uses `PREPARE TRANSACTION` when the server
    /// allows it (`max_prepared_transactions > 0`) and staging tables otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub two_phase: Option<PostgresTwoPhase>,
    /// Connections held for workers at most (each worker writes on its own; one more, shared, is used for
    /// catalog look-ups and recovery). When all are taken, the least recently used idle one is closed
    /// (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// A worker's connection idle this long (no open round) is closed; the next call reconnects (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u32>,
}
payload_mapping!(PostgresSink);

/// Default of `spec.sink.postgres.maxConnections`.
pub const DEFAULT_POSTGRES_MAX_CONNECTIONS: u32 = 16;
/// Default of `spec.sink.postgres.idleTimeoutSeconds`.
pub const DEFAULT_POSTGRES_IDLE_TIMEOUT_SECONDS: u32 = 60;

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PostgresTwoPhase {
    /// `prepared` when `max_prepared_transactions > 0`, else `staging`.
    #[default]
    Auto,
    /// `PREPARE TRANSACTION` / `COMMIT PREPARED` (needs `max_prepared_transactions > 0`).
    Prepared,
    /// Rows staged in `wallaroo_sink_staging` and moved into the table at commit (works on any server).
    Staging,
}

fn key_column() -> String {
    "key".to_string()
}
fn value_column() -> String {
    "value".to_string()
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ObjectPer {
    /// One object per message, named by the message key (upstream behaviour).
    #[default]
    Message,
    /// One object per checkpoint, holding every message of that round.
    Checkpoint,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Sink {
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
    #[serde(default)]
    pub object_per: ObjectPer,
    #[serde(default)]
    pub format: PayloadFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_from: Option<SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_from: Option<SecretValue>,
}
payload_mapping!(S3Sink);

fn default_region() -> String {
    "us-east-1".to_string()
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisHashSink {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    /// The hash that receives `HSET <key> <message key> <message value>`.
    pub key: String,
    #[serde(default = "length_prefixed")]
    pub format: PayloadFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_field: Option<String>,
}
payload_mapping!(RedisHashSink);

fn length_prefixed() -> PayloadFormat {
    PayloadFormat::LengthPrefixed
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSink {
    pub brokers: Vec<String>,
    pub topic: String,
    #[serde(default)]
    pub format: PayloadFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_field: Option<String>,
    /// Use Kafka transactions for exactly-once (needs a broker with transaction support).
    #[serde(default)]
    pub transactional: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password_from: Option<SecretValue>,
}
payload_mapping!(KafkaSink);

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KinesisSink {
    pub stream: String,
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub format: PayloadFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_from: Option<SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_from: Option<SecretValue>,
}
payload_mapping!(KinesisSink);
