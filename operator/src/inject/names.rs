//! Stable, length-safe names derived from Connector names.
//!
//! Connector names are DNS subdomains (up to 253 characters, dots allowed) while container names and annotation
//! name parts are DNS labels (63 characters, no dots). The mapping must be stable across operator versions because
//! it is how re-invocation finds the sidecar it injected earlier.
use sha2::{Digest, Sha256};

/// Pod annotation: JSON object `{connector name: spec hash}` of the sidecars injected into the pod.
pub const INJECTED_ANNOTATION: &str = "wallaroo.dev/injected";
/// Pod annotation: JSON object `{connector name: {"specHash": ..., "reason": ...}}` of matching Connectors the pod
/// could not take, so the controller can report why and knows not to roll the pod again for the same spec.
pub const SKIPPED_ANNOTATION: &str = "wallaroo.dev/skipped";
/// Pod label that opts a pod into injection; the webhook's object selector matches on it.
pub const INJECT_LABEL: &str = "wallaroo.dev/inject";
/// Prefix of the pod-template annotation that carries a Connector's spec hash and so drives rollouts.
pub const TEMPLATE_ANNOTATION_PREFIX: &str = "connector.wallaroo.dev/";
/// The env var that carries the whole Connector as JSON into the sidecar.
pub const CONNECTOR_ENV: &str = "WALLAROO_CONNECTOR";

/// Prefix of every sidecar's metrics port name; the chart's PodMonitor keeps exactly these ports.
pub const METRICS_PORT_PREFIX: &str = "wcm-";

const MAX_LABEL: usize = 63;

/// The sidecar's metrics port name: unique per Connector within a pod and within the 15 characters a port name
/// may have, with a fixed prefix that scrape configurations select on.
pub fn metrics_port_name(connector: &str) -> String {
    format!("{METRICS_PORT_PREFIX}{}", &hex::encode(Sha256::digest(connector.as_bytes()))[..10])
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The container name for a Connector: the name itself when it is a DNS label, otherwise a sanitized prefix plus
/// 8 hex digits of its SHA-256, so that `a.b` and `a-b` never collide and long names stay unique.
pub fn container_name(connector: &str) -> String {
    if is_dns_label(connector) {
        return connector.to_string();
    }
    let digest = hex::encode(&Sha256::digest(connector.as_bytes())[..4]);
    let mut prefix: String = connector
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(MAX_LABEL - 1 - digest.len())
        .collect();
    while prefix.ends_with('-') {
        prefix.pop();
    }
    while prefix.starts_with('-') {
        prefix.remove(0);
    }
    if prefix.is_empty() { format!("c-{digest}") } else { format!("{prefix}-{digest}") }
}

/// Pod-template annotation key whose value is the Connector's spec hash (changing it rolls the workload).
pub fn template_annotation_key(connector: &str) -> String {
    format!("{TEMPLATE_ANNOTATION_PREFIX}{}", container_name(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_kept() {
        assert_eq!(container_name("celsius-feed"), "celsius-feed");
    }

    #[test]
    fn dotted_and_long_names_are_hashed_and_distinct() {
        let a = container_name("a.b");
        let b = container_name("a-b");
        assert_ne!(a, b);
        assert!(a.starts_with("a-b-") && a.len() == 12, "{a}");
        let long = "x".repeat(200);
        let n = container_name(&long);
        assert_eq!(n.len(), 63);
        assert!(is_dns_label(&n));
        assert_eq!(n, container_name(&long), "stable");
        assert_ne!(n, container_name(&"x".repeat(201)));
    }

    #[test]
    fn metrics_port_names_are_valid_port_names_and_distinct() {
        for c in ["celsius-feed", "orders.kafka", &"z".repeat(253)] {
            let n = metrics_port_name(c);
            // IANA_SVC_NAME: at most 15 characters, lowercase alphanumerics and single hyphens, a letter somewhere.
            assert!(n.len() <= 15 && n.starts_with(METRICS_PORT_PREFIX), "{n}");
            assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !n.contains("--"));
        }
        assert_ne!(metrics_port_name("a.b"), metrics_port_name("a-b"));
    }

    #[test]
    fn template_key_is_a_valid_annotation_name() {
        let k = template_annotation_key(&"y".repeat(253));
        let (_, name) = k.split_once('/').unwrap_or_default();
        assert!(name.len() <= 63);
    }
}
