//! The AWS example manifests validate, and the AWS-specific checks catch what they should.
use wallaroo_crds::{load_connectors, parse_connectors};

fn example(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/connectors").join(name)
}

#[test]
fn examples_validate() {
    for f in ["s3-sink.yaml", "kinesis-source.yaml", "kinesis-sink.yaml"] {
        let cs = load_connectors(&example(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(cs.len(), 1, "{f}");
        cs[0].spec.validate().unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}

const HALF_KEYS: &str = r#"
apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {name: x}
spec:
  connectorName: out
  worker: {host: 127.0.0.1, port: 7200}
  sink:
    s3:
      bucket: b
      objectPer: checkpoint
      endpoint: localhost:9000
      accessKeyIdFrom: {env: KEY}
"#;

#[test]
fn half_a_key_pair_and_bad_endpoints_are_refused() {
    // Parsing validates: the errors name the fields.
    let e = format!("{:?}", parse_connectors(HALF_KEYS, "test").unwrap_err());
    assert!(e.contains("spec.sink.s3.secretAccessKeyFrom"), "{e}");
    assert!(e.contains("spec.sink.s3.endpoint"), "{e}");
}
