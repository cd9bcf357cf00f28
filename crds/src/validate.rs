//! Checks beyond the schema, each error naming the field and the fix.
use crate::secret::SecretValue;
use crate::sinks::SinkSpec;
use crate::sources::{RedisMode, SourceSpec};
use crate::spec::ConnectorSpec;
use crate::{PayloadFormat, SINK_KINDS, SOURCE_KINDS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl std::fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        f.write_str(&lines.join("; "))
    }
}

/// Longest string the protocol's `short_bytes` can carry (a u16 length, spec §1.2): cookie, program and
/// instance names, stream names (§1.4 HELLO, NOTIFY).
pub const MAX_SHORT_BYTES: usize = u16::MAX as usize;
/// Longest external name (topic, queue, channel, table, stream) that becomes part of a stream name; every such
/// system has a far lower limit of its own.
pub const MAX_EXTERNAL_NAME: usize = 1024;

struct Check(Vec<FieldError>);

impl Check {
    /// A string sent on the wire with a u16 length (or part of one): longer ones cannot be encoded.
    fn max_len(&mut self, field: &str, value: &str, max: usize) {
        if value.len() > max {
            self.fail(field, format!("is {} bytes long; at most {max} fit the protocol's length field", value.len()));
        }
    }
    fn fail(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), message: message.into() });
    }
    fn non_empty(&mut self, field: &str, value: &str, hint: &str) {
        if value.trim().is_empty() {
            self.fail(field, format!("must not be empty; {hint}"));
        }
    }
    fn port(&mut self, field: &str, port: u16) {
        if port == 0 {
            self.fail(field, "required: set a port between 1 and 65535");
        }
    }
    fn secret(&mut self, field: &str, s: &Option<SecretValue>) {
        if let Some(s) = s
            && s.check(field).is_err()
        {
            self.fail(field, "set exactly one of secretKeyRef {name, key} or env");
        }
    }
    /// Exactly one of an inline value and its `...From` secret.
    fn one_of_inline(&mut self, field: &str, inline: &Option<String>, secret: &Option<SecretValue>, example: &str) {
        match (inline, secret) {
            (Some(_), Some(_)) => self.fail(field, format!("set either {field} or {field}From, not both")),
            (None, None) => self.fail(field, format!("required: set {field} (e.g. {example}) or {field}From")),
            (Some(v), None) if v.trim().is_empty() => self.fail(field, format!("must not be empty (e.g. {example})")),
            _ => {}
        }
        self.secret(&format!("{field}From"), secret);
    }
    /// AWS static credentials: both secret references or neither (the default credential chain).
    fn aws_keys(&mut self, base: &str, id: &Option<SecretValue>, secret: &Option<SecretValue>) {
        self.secret(&format!("{base}.accessKeyIdFrom"), id);
        self.secret(&format!("{base}.secretAccessKeyFrom"), secret);
        if id.is_some() != secret.is_some() {
            self.fail(
                format!("{base}.{}", if id.is_some() { "secretAccessKeyFrom" } else { "accessKeyIdFrom" }),
                "set both accessKeyIdFrom and secretAccessKeyFrom, or neither to use the default AWS credential chain",
            );
        }
    }
    fn endpoint(&mut self, field: &str, e: &Option<String>) {
        if let Some(e) = e
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            self.fail(field, format!("{e:?} is not a URL; e.g. https://s3.example.com or http://127.0.0.1:5000"));
        }
    }
    fn identifier(&mut self, field: &str, v: &str) {
        let ok = !v.is_empty()
            && v.split('.').all(|part| {
                let mut c = part.chars();
                matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
                    && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            });
        if !ok {
            self.fail(
                field,
                format!("{v:?} is not a plain SQL identifier (letters, digits, _; optionally schema.table)"),
            );
        }
    }
    fn key_field(&mut self, base: &str, format: PayloadFormat, key_field: &Option<String>, needs_key: bool) {
        if format == PayloadFormat::Json && needs_key && key_field.is_none() {
            self.fail(format!("{base}.keyField"), "format json needs keyField: the JSON field holding the key");
        }
        if needs_key && format == PayloadFormat::Raw {
            self.fail(
                format!("{base}.format"),
                "this sink needs a key: use format lengthPrefixed (u32 key length, key, value) or json with keyField",
            );
        }
    }
}

impl ConnectorSpec {
    /// Validates the whole spec; every problem found is reported, not just the first.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Check(Vec::new());
        c.non_empty(
            "spec.connectorName",
            &self.connector_name,
            "use the name given to source_connector()/sink_connector()",
        );
        c.max_len("spec.connectorName", &self.connector_name, MAX_SHORT_BYTES);
        c.non_empty("spec.worker.host", &self.worker.host, "e.g. 127.0.0.1");
        c.max_len("spec.worker.host", &self.worker.host, 253);
        if let Some(v) = &self.worker.cookie {
            c.max_len("spec.worker.cookie", v, MAX_SHORT_BYTES);
        }
        if let Some(v) = &self.worker.program_name {
            c.max_len("spec.worker.programName", v, MAX_SHORT_BYTES);
        }
        if let Some(v) = &self.worker.instance_name {
            c.max_len("spec.worker.instanceName", v, MAX_SHORT_BYTES);
        }
        c.port("spec.worker.port", self.worker.port);
        c.port("spec.metricsPort", self.metrics_port);
        if self.worker.cookie.is_some() && self.worker.cookie_from.is_some() {
            c.fail("spec.worker.cookie", "set either cookie or cookieFrom, not both");
        }
        c.secret("spec.worker.cookieFrom", &self.worker.cookie_from);
        if let (Some(max), Some(refill)) = (self.worker.max_credits, self.worker.refill_credits)
            && refill >= max
        {
            c.fail("spec.worker.refillCredits", format!("must be below maxCredits ({max})"));
        }
        check_worker_limits(&mut c, &self.worker);
        if let Some(a) = &self.admin {
            if let Some(h) = &a.host
                && h.parse::<std::net::IpAddr>().is_err()
            {
                c.fail("spec.admin.host", format!("{h:?} is not an IP address; e.g. 0.0.0.0 or 127.0.0.1"));
            }
            for (field, v) in [
                ("spec.admin.maxConnections", a.max_connections),
                ("spec.admin.headerReadTimeoutSeconds", a.header_read_timeout_seconds),
                ("spec.admin.connectionTimeoutSeconds", a.connection_timeout_seconds),
            ] {
                if v == Some(0) {
                    c.fail(field, "must be at least 1");
                }
            }
        }
        check_volume_mounts(&mut c, &self.volume_mounts);
        match (&self.source, &self.sink) {
            (Some(_), Some(_)) => c.fail("spec", "set exactly one of source or sink, not both"),
            (None, None) => c.fail("spec", "set one of source or sink (e.g. source: {udp: {port: 6789}})"),
            (Some(s), None) => check_source(&mut c, s),
            (None, Some(s)) => {
                check_sink(&mut c, s);
                if self.metrics_port == self.worker.port {
                    c.fail("spec.metricsPort", "must differ from spec.worker.port (the sink listens there)");
                }
            }
        }
        if c.0.is_empty() { Ok(()) } else { Err(ValidationErrors(c.0)) }
    }
}

fn check_volume_mounts(c: &mut Check, mounts: &[crate::SidecarVolumeMount]) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, m) in mounts.iter().enumerate() {
        let base = format!("spec.volumeMounts[{i}]");
        c.non_empty(&format!("{base}.name"), &m.name, "name a volume from the pod's spec.volumes");
        if !m.mount_path.starts_with('/') {
            c.fail(format!("{base}.mountPath"), format!("{:?} must be an absolute path, e.g. /data", m.mount_path));
        } else if !seen.insert(m.mount_path.trim_end_matches('/')) {
            c.fail(
                format!("{base}.mountPath"),
                format!("{} is mounted twice; give each mount its own path", m.mount_path),
            );
        }
        if let Some(sub) = &m.sub_path
            && (sub.starts_with('/') || sub.split('/').any(|part| part == ".."))
        {
            c.fail(format!("{base}.subPath"), "must be a relative path inside the volume, without '..'");
        }
    }
}

fn check_kinds(c: &mut Check, base: &str, set: Vec<&'static str>, all: &[&str]) -> bool {
    match set.len() {
        1 => true,
        0 => {
            c.fail(base, format!("set exactly one kind: {}", all.join(", ")));
            false
        }
        _ => {
            c.fail(base, format!("set exactly one kind, found {}", set.join(" and ")));
            false
        }
    }
}

fn check_source(c: &mut Check, s: &SourceSpec) {
    if !check_kinds(c, "spec.source", s.kind_names(), SOURCE_KINDS) {
        return;
    }
    if let Some(u) = &s.udp {
        c.port("spec.source.udp.port", u.port);
        if let Some(n) = &u.stream_name {
            c.max_len("spec.source.udp.streamName", n, MAX_SHORT_BYTES);
        }
        if u.buffer == Some(0) {
            c.fail("spec.source.udp.buffer", "must be at least 1 datagram");
        }
        // One maximal datagram must fit, or every datagram would be dropped on arrival.
        if u.buffer_bytes.is_some_and(|b| b < 65536) {
            c.fail("spec.source.udp.bufferBytes", "must be at least 65536 (one maximal datagram)");
        }
    }
    if let Some(f) = &s.file {
        c.non_empty("spec.source.file.path", &f.path, "the file to read");
        match &f.stream_name {
            Some(n) => c.max_len("spec.source.file.streamName", n, MAX_SHORT_BYTES),
            // The path is the stream name then.
            None => c.max_len("spec.source.file.path", &f.path, MAX_SHORT_BYTES),
        }
        if let Some(max) = f.max_record_bytes
            && !(1..=crate::MAX_RECORD_BYTES).contains(&max)
        {
            c.fail(
                "spec.source.file.maxRecordBytes",
                format!("must be between 1 and {} (one MESSAGE frame)", crate::MAX_RECORD_BYTES),
            );
        }
    }
    if let Some(k) = &s.kafka {
        if k.brokers.is_empty() {
            c.fail("spec.source.kafka.brokers", "list at least one broker, e.g. [kafka:9092]");
        }
        if k.topics.is_empty() {
            c.fail("spec.source.kafka.topics", "list at least one topic");
        }
        for (i, t) in k.topics.iter().enumerate() {
            c.max_len(&format!("spec.source.kafka.topics[{i}]"), t, MAX_EXTERNAL_NAME);
        }
        c.non_empty("spec.source.kafka.groupId", &k.group_id, "the consumer group shared by all worker pods");
        c.secret("spec.source.kafka.saslPasswordFrom", &k.sasl_password_from);
    }
    if let Some(k) = &s.kinesis {
        c.non_empty("spec.source.kinesis.stream", &k.stream, "the Kinesis stream name");
        c.max_len("spec.source.kinesis.stream", &k.stream, MAX_EXTERNAL_NAME);
        c.non_empty("spec.source.kinesis.region", &k.region, "e.g. us-east-1");
        c.aws_keys("spec.source.kinesis", &k.access_key_id_from, &k.secret_access_key_from);
        c.endpoint("spec.source.kinesis.endpoint", &k.endpoint);
        if k.poll_interval_ms == Some(0) {
            c.fail("spec.source.kinesis.pollIntervalMs", "must be at least 1");
        }
    }
    if let Some(r) = &s.rabbitmq {
        c.one_of_inline("spec.source.rabbitmq.url", &r.url, &r.url_from, "amqp://guest:guest@127.0.0.1:5672/%2f");
        c.non_empty("spec.source.rabbitmq.queue", &r.queue, "the queue to consume");
        c.max_len("spec.source.rabbitmq.queue", &r.queue, MAX_EXTERNAL_NAME);
        if r.prefetch == Some(0) {
            c.fail("spec.source.rabbitmq.prefetch", "must be at least 1 (0 would mean unlimited)");
        }
        if let Some(t) = &r.exchange_type
            && !["direct", "fanout", "topic", "headers"].contains(&t.as_str())
        {
            c.fail("spec.source.rabbitmq.exchangeType", "must be one of direct, fanout, topic, headers");
        }
        if r.exchange.is_none() && (r.exchange_type.is_some() || r.routing_key.is_some()) {
            c.fail(
                "spec.source.rabbitmq.exchange",
                "exchangeType and routingKey need the exchange to bind the queue to",
            );
        }
    }
    if let Some(r) = &s.redis {
        c.one_of_inline("spec.source.redis.url", &r.url, &r.url_from, "redis://127.0.0.1:6379");
        for (i, ch) in r.channels.iter().enumerate() {
            c.max_len(&format!("spec.source.redis.channels[{i}]"), ch, MAX_EXTERNAL_NAME);
        }
        if let Some(st) = &r.stream {
            c.max_len("spec.source.redis.stream", st, MAX_EXTERNAL_NAME);
        }
        match r.mode {
            RedisMode::Pubsub if r.channels.is_empty() => {
                c.fail("spec.source.redis.channels", "mode pubsub needs at least one channel or pattern")
            }
            RedisMode::Stream => {
                if r.stream.as_deref().unwrap_or("").is_empty() {
                    c.fail("spec.source.redis.stream", "mode stream needs the stream key");
                }
                if r.group.as_deref().unwrap_or("").is_empty() {
                    c.fail("spec.source.redis.group", "mode stream needs a consumer group name");
                }
            }
            _ => {}
        }
        if r.buffer == Some(0) {
            c.fail("spec.source.redis.buffer", "must be at least 1");
        }
    }
    if let Some(p) = &s.postgres {
        c.one_of_inline("spec.source.postgres.url", &p.url, &p.url_from, "postgres://user@host/db");
        c.identifier("spec.source.postgres.table", &p.table);
        c.max_len("spec.source.postgres.table", &p.table, MAX_EXTERNAL_NAME);
        c.identifier("spec.source.postgres.idColumn", &p.id_column);
        if let Some(col) = &p.payload_column {
            c.identifier("spec.source.postgres.payloadColumn", col);
        }
        if let Some(ch) = &p.channel {
            c.identifier("spec.source.postgres.channel", ch);
        }
    }
}

fn check_sink(c: &mut Check, s: &SinkSpec) {
    if !check_kinds(c, "spec.sink", s.kind_names(), SINK_KINDS) {
        return;
    }
    if let Some(u) = &s.udp {
        c.non_empty("spec.sink.udp.host", &u.host, "where datagrams go");
        c.port("spec.sink.udp.port", u.port);
    }
    if let Some(f) = &s.file {
        c.non_empty("spec.sink.file.dir", &f.dir, "a directory for output and transaction logs");
    }
    if let Some(p) = &s.postgres {
        c.one_of_inline("spec.sink.postgres.url", &p.url, &p.url_from, "postgres://user@host/db");
        c.identifier("spec.sink.postgres.table", &p.table);
        if !(p.format == PayloadFormat::Json && p.json_columns) {
            c.identifier("spec.sink.postgres.keyColumn", &p.key_column);
            c.identifier("spec.sink.postgres.valueColumn", &p.value_column);
        }
        if p.json_columns && p.format != PayloadFormat::Json {
            c.fail("spec.sink.postgres.jsonColumns", "needs format: json");
        }
        if p.batch_size == Some(0) {
            c.fail("spec.sink.postgres.batchSize", "must be at least 1");
        }
        if p.max_connections == Some(0) {
            c.fail("spec.sink.postgres.maxConnections", "must be at least 1");
        }
        if p.idle_timeout_seconds == Some(0) {
            c.fail("spec.sink.postgres.idleTimeoutSeconds", "must be at least 1");
        }
    }
    if let Some(s3) = &s.s3 {
        c.non_empty("spec.sink.s3.bucket", &s3.bucket, "the target bucket");
        c.non_empty("spec.sink.s3.region", &s3.region, "e.g. us-east-1");
        c.key_field("spec.sink.s3", s3.format, &s3.key_field, s3.object_per == crate::ObjectPer::Message);
        c.aws_keys("spec.sink.s3", &s3.access_key_id_from, &s3.secret_access_key_from);
        c.endpoint("spec.sink.s3.endpoint", &s3.endpoint);
    }
    if let Some(r) = &s.redis_hash {
        c.one_of_inline("spec.sink.redisHash.url", &r.url, &r.url_from, "redis://127.0.0.1:6379");
        c.non_empty("spec.sink.redisHash.key", &r.key, "the hash to write fields into");
        c.key_field("spec.sink.redisHash", r.format, &r.key_field, true);
    }
    if let Some(k) = &s.kafka {
        if k.brokers.is_empty() {
            c.fail("spec.sink.kafka.brokers", "list at least one broker, e.g. [kafka:9092]");
        }
        c.non_empty("spec.sink.kafka.topic", &k.topic, "the topic to produce to");
        c.secret("spec.sink.kafka.saslPasswordFrom", &k.sasl_password_from);
    }
    if let Some(k) = &s.kinesis {
        c.non_empty("spec.sink.kinesis.stream", &k.stream, "the Kinesis stream name");
        c.non_empty("spec.sink.kinesis.region", &k.region, "e.g. us-east-1");
        c.aws_keys("spec.sink.kinesis", &k.access_key_id_from, &k.secret_access_key_from);
        c.endpoint("spec.sink.kinesis.endpoint", &k.endpoint);
    }
}

fn check_worker_limits(c: &mut Check, w: &crate::spec::WorkerEndpoint) {
    use crate::spec::MIN_MAX_FRAME_BYTES;
    if let Some(max) = w.max_frame_bytes
        && max < MIN_MAX_FRAME_BYTES
    {
        c.fail(
            "spec.worker.maxFrameBytes",
            format!(
                "{max} is too small: at least {MIN_MAX_FRAME_BYTES} (the largest HELLO) is needed; default 16777216"
            ),
        );
    }
    if w.handshake_timeout_seconds == Some(0) {
        c.fail("spec.worker.handshakeTimeoutSeconds", "must be at least 1 (default 10)");
    }
    if w.idle_timeout_seconds == Some(0) {
        c.fail("spec.worker.idleTimeoutSeconds", "must be at least 1; leave it out to never time out idle workers");
    }
    if w.max_connections == Some(0) {
        c.fail("spec.worker.maxConnections", "must be at least 1 (default 64; one connection per worker)");
    }
}
