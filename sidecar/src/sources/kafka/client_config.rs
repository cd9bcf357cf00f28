//! librdkafka client properties from a manifest: the parts the Kafka source and the Kafka sink share
//! (brokers, SASL, pass-through properties). The sink imports this module.
use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use wallaroo_crds::SecretValue;

/// The connection-related fields of `spec.source.kafka` / `spec.sink.kafka`.
pub struct Connection<'a> {
    /// `spec.source.kafka` or `spec.sink.kafka`: prefixes error messages.
    pub field: &'static str,
    pub brokers: &'a [String],
    pub properties: &'a BTreeMap<String, String>,
    pub sasl_mechanism: Option<&'a str>,
    pub sasl_username: Option<&'a str>,
    pub sasl_password_from: Option<&'a SecretValue>,
}

/// Properties the integration sets itself; a manifest that overrides them would break the guarantee.
pub fn check_reserved(field: &str, properties: &BTreeMap<String, String>, reserved: &[&str]) -> Result<(), String> {
    for key in properties.keys() {
        if reserved.contains(&key.as_str()) {
            return Err(format!("{field}.properties: {key:?} is managed by the connector and cannot be overridden"));
        }
    }
    Ok(())
}

/// Builds the base client config. Pass-through properties go in last so people can tune anything that is not
/// reserved; the SASL fields are conveniences over the same librdkafka properties.
pub fn base_config(c: &Connection<'_>) -> Result<ClientConfig, String> {
    if c.brokers.is_empty() {
        return Err(format!("{}.brokers: list at least one broker", c.field));
    }
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", c.brokers.join(","));
    if let Some(m) = c.sasl_mechanism {
        cfg.set("sasl.mechanism", m);
        // SASL without an explicit protocol means SASL over plaintext; `properties` may say SASL_SSL.
        cfg.set("security.protocol", "SASL_PLAINTEXT");
    }
    if let Some(u) = c.sasl_username {
        cfg.set("sasl.username", u);
    }
    if let Some(p) = c.sasl_password_from {
        let field = format!("{}.saslPasswordFrom", c.field);
        let password = p.resolve(&field).map_err(|e| e.to_string())?;
        cfg.set("sasl.password", password);
    }
    for (k, v) in c.properties {
        cfg.set(k, v);
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_override_and_sasl_fields_map() {
        let brokers = vec!["a:9092".to_string(), "b:9092".to_string()];
        let mut props = BTreeMap::new();
        props.insert("security.protocol".to_string(), "SASL_SSL".to_string());
        props.insert("fetch.min.bytes".to_string(), "1".to_string());
        let cfg = base_config(&Connection {
            field: "spec.source.kafka",
            brokers: &brokers,
            properties: &props,
            sasl_mechanism: Some("SCRAM-SHA-512"),
            sasl_username: Some("alice"),
            sasl_password_from: None,
        })
        .unwrap();
        assert_eq!(cfg.get("bootstrap.servers"), Some("a:9092,b:9092"));
        assert_eq!(cfg.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(cfg.get("sasl.username"), Some("alice"));
        assert_eq!(cfg.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cfg.get("fetch.min.bytes"), Some("1"));
    }

    #[test]
    fn missing_password_env_is_a_clear_error() {
        let brokers = vec!["a:9092".to_string()];
        let props = BTreeMap::new();
        let secret = SecretValue::from_env("WALLAROO_TEST_KAFKA_PASSWORD_THAT_IS_NOT_SET");
        let err = base_config(&Connection {
            field: "spec.sink.kafka",
            brokers: &brokers,
            properties: &props,
            sasl_mechanism: Some("PLAIN"),
            sasl_username: Some("bob"),
            sasl_password_from: Some(&secret),
        })
        .unwrap_err();
        assert!(err.contains("spec.sink.kafka.saslPasswordFrom"), "{err}");
        assert!(err.contains("WALLAROO_TEST_KAFKA_PASSWORD_THAT_IS_NOT_SET"), "{err}");
    }

    #[test]
    fn reserved_properties_are_refused() {
        let mut props = BTreeMap::new();
        props.insert("enable.auto.commit".to_string(), "true".to_string());
        let err = check_reserved("spec.source.kafka", &props, &["enable.auto.commit"]).unwrap_err();
        assert!(err.contains("enable.auto.commit"));
        assert!(check_reserved("x", &BTreeMap::new(), &["enable.auto.commit"]).is_ok());
    }
}
