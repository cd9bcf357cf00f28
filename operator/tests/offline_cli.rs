//! The `inject` command end to end: the Celsius example gets both sidecars, and a second run changes nothing.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn connectors() -> PathBuf {
    let example = root().join("examples/celsius/connectors.yaml");
    if example.exists() {
        example
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/celsius-connectors.yaml")
    }
}

fn inject(input: &Path, extra: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wallaroo-connector-operator"))
        .arg("inject")
        .arg("-f")
        .arg(input)
        .arg("--connectors")
        .arg(connectors())
        .args(extra)
        .output()
        .expect("run operator");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "inject failed: {stderr}");
    (String::from_utf8(out.stdout).expect("utf8"), stderr)
}

fn containers(yaml: &str, field: &str) -> Vec<String> {
    let doc: serde_yaml::Value = serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .find(|d: &serde_yaml::Value| d["kind"] == "Deployment")
        .expect("deployment");
    doc["spec"]["template"]["spec"][field]
        .as_sequence()
        .map(|s| s.iter().filter_map(|c| c["name"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

#[test]
fn celsius_workload_gets_both_sidecars_once() {
    let workload = root().join("examples/celsius/workload.yaml");
    let (first, stderr) = inject(&workload, &["--sidecar-image", "wallaroo/connectors:test"]);
    assert!(stderr.contains("celsius-feed, celsius-out (injected)"), "{stderr}");
    assert_eq!(containers(&first, "initContainers"), ["celsius-feed", "celsius-out"]);
    assert_eq!(containers(&first, "containers"), ["worker"]);
    assert!(first.contains("wallaroo.dev/injected"));

    let dir = tempfile::tempdir().expect("tmp");
    let once = dir.path().join("once.yaml");
    std::fs::write(&once, &first).expect("write");
    let (second, stderr) = inject(&once, &["--sidecar-image", "wallaroo/connectors:test"]);
    assert_eq!(second, first, "second run must change nothing");
    assert!(stderr.contains("(unchanged)"), "{stderr}");
}

#[test]
fn regular_containers_for_old_clusters() {
    let workload = root().join("examples/celsius/workload.yaml");
    let (out, _) = inject(&workload, &["--kube-version", "1.28"]);
    assert_eq!(containers(&out, "containers"), ["worker", "celsius-feed", "celsius-out"]);
    assert!(containers(&out, "initContainers").is_empty());
    let (out, _) = inject(&workload, &["--kube-version", "1.28", "--sidecar-mode", "always"]);
    assert_eq!(containers(&out, "initContainers"), ["celsius-feed", "celsius-out"]);
}

#[test]
fn bad_connector_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: wallaroo.dev/v1alpha1\nkind: Connector\nmetadata: {name: x}\nspec: {connectorName: x}\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_wallaroo-connector-operator"))
        .args(["inject", "-f"])
        .arg(root().join("examples/celsius/workload.yaml"))
        .arg("--connectors")
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec"), "{}", String::from_utf8_lossy(&out.stderr));
}
