//! Source integrations: one struct per kind, as written under `spec.source.<kind>`.
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::secret::SecretValue;

/// Exactly one kind must be set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "[has(self.udp), has(self.file), has(self.kafka), has(self.kinesis), has(self.rabbitmq), has(self.redis), has(self.postgres)].filter(x, x).size() == 1", "message": "set exactly one source kind"}]))]
pub struct SourceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinesis: Option<KinesisSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitmqSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSource>,
}

pub const SOURCE_KINDS: &[&str] = &["udp", "file", "kafka", "kinesis", "rabbitmq", "redis", "postgres"];

impl SourceSpec {
    /// The kinds that are set (valid specs have exactly one).
    pub fn kind_names(&self) -> Vec<&'static str> {
        let set = [
            self.udp.is_some(),
            self.file.is_some(),
            self.kafka.is_some(),
            self.kinesis.is_some(),
            self.rabbitmq.is_some(),
            self.redis.is_some(),
            self.postgres.is_some(),
        ];
        SOURCE_KINDS.iter().zip(set).filter(|(_, s)| *s).map(|(k, _)| *k).collect()
    }

    pub(crate) fn secrets(&self) -> Vec<&Option<SecretValue>> {
        let mut v = Vec::new();
        if let Some(k) = &self.kafka {
            v.push(&k.sasl_password_from);
        }
        if let Some(k) = &self.kinesis {
            v.push(&k.access_key_id_from);
            v.push(&k.secret_access_key_from);
        }
        if let Some(r) = &self.rabbitmq {
            v.push(&r.url_from);
        }
        if let Some(r) = &self.redis {
            v.push(&r.url_from);
        }
        if let Some(p) = &self.postgres {
            v.push(&p.url_from);
        }
        v
    }
}

/// Each datagram becomes one message, byte for byte.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UdpSource {
    #[serde(default = "any_host")]
    pub host: String,
    pub port: u16,
    /// Stream name announced to the worker (default `udp:<port>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_name: Option<String>,
    /// Datagrams buffered while the worker has no credits; the oldest are dropped beyond this (default 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<u32>,
    /// Payload bytes of that buffer; the oldest datagrams are dropped beyond this as well (default 67108864,
    /// 64 MiB). Without it 65536 datagrams of 64 KiB could hold 4 GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_bytes: Option<u64>,
}

/// Default of `spec.source.udp.bufferBytes`.
pub const DEFAULT_UDP_BUFFER_BYTES: u64 = 64 * 1024 * 1024;

fn any_host() -> String {
    "0.0.0.0".to_string()
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum FileFormat {
    /// Newline-delimited records (the newline is not part of the payload).
    #[default]
    Lines,
    /// u32 big-endian length, then that many bytes (upstream FramedFileReader).
    Framed,
}

/// Reads a file as a stream; point of reference = byte offset after each record.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSource {
    pub path: String,
    #[serde(default)]
    pub format: FileFormat,
    /// Keep reading as the file grows instead of ending the stream at end of file.
    #[serde(default)]
    pub follow: bool,
    /// Stream name announced to the worker (default: the path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_name: Option<String>,
    /// Largest record in bytes (a line without its newline, or a framed payload). A longer record stops the
    /// source with an error naming the file and offset instead of buffering it (default and maximum
    /// 16777189: the 16 MiB frame limit minus the MESSAGE header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_record_bytes: Option<u32>,
}

/// The largest payload one MESSAGE frame can carry: the 16 MiB frame limit minus tag (1), stream id (8),
/// message id (8), event time (8) and the key length (2) of a keyless message.
pub const MAX_RECORD_BYTES: u32 = 16 * 1024 * 1024 - 27;

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSource {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    pub topics: Vec<String>,
    pub group_id: String,
    /// Where a partition with no committed offset and no worker point of reference starts.
    #[serde(default)]
    pub start_from: StartFrom,
    /// librdkafka client properties, passed through (e.g. `security.protocol: SASL_SSL`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password_from: Option<SecretValue>,
    /// Seconds to wait for the worker's ack of a revoked partition before giving it up (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_timeout_seconds: Option<u32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KinesisSource {
    pub stream: String,
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub start_from: StartFrom,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_from: Option<SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_from: Option<SecretValue>,
    /// Milliseconds between GetRecords calls on an idle shard (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RabbitmqSource {
    /// `amqp://user:pass@host:5672/vhost`; prefer `urlFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    pub queue: String,
    /// Declare the queue (durable) if it does not exist.
    #[serde(default)]
    pub declare_queue: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// Unacknowledged deliveries the broker may hand out (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u16>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RedisMode {
    #[default]
    Pubsub,
    Stream,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    #[serde(default)]
    pub mode: RedisMode,
    /// Pub/sub channels; entries with `*`, `?` or `[` are patterns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Consumer name within the group (default: the pod name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Mode stream: the entry field sent as the payload. Default: the value of an entry's only field, or a
    /// JSON object of all fields when an entry has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_field: Option<String>,
    /// Mode stream: entries pending this long (ms) at another consumer are claimed with XAUTOCLAIM (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_min_idle_ms: Option<u64>,
    /// Mode pubsub: messages kept per channel until the worker acknowledges them, for replay after a worker
    /// reconnect; the oldest are dropped beyond this (default 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<u32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    pub table: String,
    /// A monotonically increasing integer column (e.g. a `bigserial` primary key).
    pub id_column: String,
    /// Column sent as the payload; when absent, each row is sent as JSON (`row_to_json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_column: Option<String>,
    /// LISTEN channel used as a wake-up (default `wallaroo_<table>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Install an AFTER INSERT trigger that NOTIFYs the channel.
    #[serde(default)]
    pub install_trigger: bool,
    /// Milliseconds between polls when no notification arrives (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    /// Rows fetched per query (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
}
