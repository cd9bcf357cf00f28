//! Golden tests over real-world pod shapes plus the properties the webhook relies on.
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use wallaroo_crds::Connector;

use super::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inject")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub(crate) fn test_connectors() -> Vec<Connector> {
    wallaroo_crds::parse_connectors(&read("connectors.yaml"), "connectors.yaml").expect("fixture connectors")
}

pub(crate) fn test_config(native: bool) -> InjectConfig {
    InjectConfig {
        image: "wallaroo/connectors:test".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        default_resources: ResourceRequirements {
            requests: Some([("cpu".into(), Quantity("10m".into())), ("memory".into(), Quantity("16Mi".into()))].into()),
            limits: Some([("memory".into(), Quantity("64Mi".into()))].into()),
            claims: None,
        },
        native_sidecars: native,
    }
}

fn run(pod: &mut Pod, connectors: &[Connector], native: bool) -> InjectOutcome {
    let refs: Vec<&Connector> = connectors.iter().collect();
    let spec = pod.spec.get_or_insert_default();
    inject_pod(&mut pod.metadata, spec, "apps", &refs, &test_config(native)).expect("inject")
}

/// Compares with `<case>.<mode>.golden.yaml`; `UPDATE_GOLDEN=1 cargo test` rewrites the files after a deliberate
/// change, and the diff is then reviewed like code.
fn golden(case: &str, native: bool) -> (Pod, InjectOutcome) {
    let mut pod: Pod = serde_yaml::from_str(&read(&format!("{case}.yaml"))).expect("fixture pod");
    let outcome = run(&mut pod, &test_connectors(), native);
    let rendered = serde_yaml::to_string(&pod).expect("yaml");
    let mode = if native { "native" } else { "regular" };
    let path = fixtures().join(format!("{case}.{mode}.golden.yaml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).expect("write golden");
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(rendered, expected, "{case} ({mode}) differs from its golden file");
    (pod, outcome)
}

fn names(cs: Option<&Vec<k8s_openapi::api::core::v1::Container>>) -> Vec<String> {
    cs.into_iter().flatten().map(|c| c.name.clone()).collect()
}

#[test]
fn plain_pod_gets_both_celsius_sidecars() {
    for native in [true, false] {
        let (pod, out) = golden("plain-pod", native);
        assert_eq!(out.injected.keys().collect::<Vec<_>>(), ["celsius-feed", "celsius-out"]);
        let spec = pod.spec.as_ref().expect("spec");
        let sidecars = if native { names(spec.init_containers.as_ref()) } else { names(Some(&spec.containers)) };
        assert!(sidecars.ends_with(&["celsius-feed".into(), "celsius-out".into()]), "{sidecars:?}");
        assert_eq!(spec.termination_grace_period_seconds, Some(45), "drain 40s + margin");
    }
}

#[test]
fn existing_init_containers_and_sidecars_are_kept_in_order() {
    let (pod, out) = golden("init-and-sidecar-pod", true);
    let spec = pod.spec.as_ref().expect("spec");
    let kafka = container_name("orders.kafka");
    assert_eq!(
        names(spec.init_containers.as_ref()),
        ["wait-for-db", "proxy", "celsius-feed", "celsius-out", kafka.as_str()]
    );
    assert_eq!(names(Some(&spec.containers)), ["worker", "log-shipper"]);
    assert_eq!(out.injected.len(), 3);
    assert_eq!(pod.metadata.annotations.as_ref().and_then(|a| a.get("team")).map(String::as_str), Some("streaming"));
    golden("init-and-sidecar-pod", false);
}

#[test]
fn pod_without_match_is_unchanged() {
    let before: Pod = serde_yaml::from_str(&read("no-match-pod.yaml")).expect("pod");
    let mut pod = before.clone();
    let out = run(&mut pod, &test_connectors(), true);
    assert!(!out.changed);
    assert!(out.injected.is_empty());
    assert_eq!(pod, before);
}

#[test]
fn name_clash_skips_that_connector_with_a_warning() {
    let (pod, out) = golden("name-clash-pod", false);
    assert_eq!(out.injected.keys().collect::<Vec<_>>(), ["celsius-out"]);
    assert_eq!(out.skipped.len(), 1);
    assert!(out.warnings()[0].contains("already has a container named celsius-feed"), "{:?}", out.warnings());
    let legacy = pod.spec.as_ref().and_then(|s| s.containers.iter().find(|c| c.name == "celsius-feed"));
    assert_eq!(legacy.and_then(|c| c.image.as_deref()), Some("example/legacy-feeder:0.1"));
}

#[test]
fn file_connectors_mount_pod_volumes_or_are_skipped_with_the_reason() {
    for native in [true, false] {
        let (pod, out) = golden("volumes-pod", native);
        assert_eq!(out.injected.keys().collect::<Vec<_>>(), ["ledger-in", "ledger-out"]);
        let warnings = out.warnings().join("\n");
        assert!(warnings.contains("ledger-missing-volume not injected: spec.volumeMounts[0] names volume \"audit\""));
        assert!(warnings.contains("ledger-unmounted not injected: spec.sink.file.dir \"/outside/copy\" is not under"));
        let spec = pod.spec.as_ref().expect("spec");
        let all: Vec<&k8s_openapi::api::core::v1::Container> =
            spec.init_containers.iter().flatten().chain(spec.containers.iter()).collect();
        let mounts = |name: &str| {
            let c = all.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("{name} missing"));
            c.volume_mounts.clone().unwrap_or_default()
        };
        let input = mounts("ledger-in");
        assert_eq!(
            (input[0].name.as_str(), input[0].mount_path.as_str(), input[0].sub_path.as_deref(), input[0].read_only),
            ("ledger-data", "/data/in", Some("incoming"), Some(true))
        );
        let output = mounts("ledger-out");
        assert_eq!(
            (output[0].name.as_str(), output[0].mount_path.as_str(), output[0].read_only),
            ("results", "/out", None)
        );
        assert!(mounts("worker").iter().all(|m| m.mount_path != "/out"), "the worker's mounts are its own");
    }
}

#[test]
fn reinvocation_is_idempotent() {
    for case in ["plain-pod", "init-and-sidecar-pod", "name-clash-pod", "volumes-pod"] {
        for native in [true, false] {
            let mut pod: Pod = serde_yaml::from_str(&read(&format!("{case}.yaml"))).expect("pod");
            run(&mut pod, &test_connectors(), native);
            let once = pod.clone();
            let again = run(&mut pod, &test_connectors(), native);
            assert!(!again.changed, "{case} native={native}");
            assert_eq!(pod, once);
        }
    }
}

#[test]
fn spec_change_updates_sidecar_in_place_and_switching_mode_moves_it() {
    let mut pod: Pod = serde_yaml::from_str(&read("plain-pod.yaml")).expect("pod");
    let mut connectors = test_connectors();
    run(&mut pod, &connectors, false);
    let old_hash = injected_annotation(&pod.metadata)["celsius-feed"].clone();
    connectors[0].spec.source.as_mut().and_then(|s| s.udp.as_mut()).expect("udp").port = 6800;
    let out = run(&mut pod, &connectors, false);
    assert!(out.changed);
    assert_ne!(out.injected["celsius-feed"], old_hash);
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(names(Some(&spec.containers)), ["worker", "celsius-feed", "celsius-out"]);
    let env = spec.containers[1].env.as_ref().expect("env");
    assert!(env[0].value.as_deref().is_some_and(|v| v.contains("6800")));

    run(&mut pod, &connectors, true);
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(names(Some(&spec.containers)), ["worker"]);
    assert_eq!(names(spec.init_containers.as_ref()), ["celsius-feed", "celsius-out"]);
}

#[test]
fn connectors_that_stop_matching_are_removed_on_reinvocation() {
    let mut pod: Pod = serde_yaml::from_str(&read("plain-pod.yaml")).expect("pod");
    let connectors = test_connectors();
    run(&mut pod, &connectors, true);
    let only_out: Vec<Connector> =
        connectors.into_iter().filter(|c| c.metadata.name.as_deref() == Some("celsius-out")).collect();
    let out = run(&mut pod, &only_out, true);
    assert_eq!(out.removed, ["celsius-feed"]);
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(names(spec.init_containers.as_ref()), ["celsius-out"]);
    assert_eq!(injected_annotation(&pod.metadata).keys().collect::<Vec<_>>(), ["celsius-out"]);
}

#[test]
fn secrets_are_references_never_values() {
    let (pod, _) = golden("init-and-sidecar-pod", true);
    let spec = pod.spec.as_ref().expect("spec");
    let kafka =
        spec.init_containers.iter().flatten().find(|c| c.name.starts_with("orders-kafka")).expect("kafka sidecar");
    let env = kafka.env.as_ref().expect("env");
    let secret = env.iter().find(|e| e.name == "WALLAROO_SECRET_KAFKA_CREDS__PASSWORD").expect("secret env");
    assert!(secret.value.is_none());
    let r = secret.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("secretKeyRef");
    assert_eq!((r.name.as_str(), r.key.as_str()), ("kafka-creds", "password"));
    let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(&names[..3], ["WALLAROO_CONNECTOR", "POD_NAME", "POD_NAMESPACE"]);
}

#[test]
fn connector_json_round_trips_for_the_sidecar() {
    let c = &test_connectors()[1];
    let json = connector_json(c, "apps").expect("json");
    let back: Connector = serde_json::from_str(&json).expect("parse");
    assert_eq!(back.spec, c.spec);
    assert_eq!(back.metadata.namespace.as_deref(), Some("apps"));
    assert!(back.status.is_none());
    assert!(json.contains("\"apiVersion\":\"wallaroo.dev/v1alpha1\""));
}

#[test]
fn invalid_connector_is_skipped() {
    let mut connectors = test_connectors();
    connectors[0].spec.worker.port = 0;
    let mut pod: Pod = serde_yaml::from_str(&read("plain-pod.yaml")).expect("pod");
    let out = run(&mut pod, &connectors, true);
    assert_eq!(out.injected.keys().collect::<Vec<_>>(), ["celsius-out"]);
    assert!(out.skipped[0].1.contains("spec.worker.port"), "{:?}", out.skipped);
}

#[test]
fn sidecar_mode_resolution() {
    assert!(SidecarMode::Auto.native_for("1", "29"));
    assert!(SidecarMode::Auto.native_for("1", "31+"));
    assert!(!SidecarMode::Auto.native_for("1", "28"));
    assert!(!SidecarMode::Auto.native_for("1", "x"));
    assert!(SidecarMode::Always.native_for("1", "20"));
    assert!(!SidecarMode::Never.native_for("1", "33"));
}

#[test]
fn offline_documents_are_injected_once() {
    let workload = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: celsius, namespace: apps, labels: {app: celsius}}
spec:
  selector: {matchLabels: {app: celsius}}
  template:
    metadata: {labels: {app: celsius, wallaroo.dev/inject: "true"}}
    spec:
      containers: [{name: worker, image: wallaroo/celsius:1.0}]
---
apiVersion: v1
kind: Service
metadata: {name: celsius, namespace: apps}
spec: {ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: not-opted-in, namespace: apps}
spec:
  template:
    metadata: {labels: {app: celsius}}
    spec:
      containers: [{name: worker, image: wallaroo/celsius:1.0}]
"#;
    let cfg = test_config(true);
    let (docs, reports) = offline::inject_documents(workload, &test_connectors(), "default", &cfg).expect("inject");
    assert_eq!(docs.len(), 3);
    let init = docs[0].pointer("/spec/template/spec/initContainers").and_then(|v| v.as_array()).expect("sidecars");
    assert_eq!(init.len(), 2);
    assert!(reports[0].outcome.as_ref().is_some_and(|o| o.changed));
    assert!(reports[2].outcome.is_none(), "not opted in");
    let once = offline::to_yaml(&docs).expect("yaml");
    let (docs2, reports2) = offline::inject_documents(&once, &test_connectors(), "default", &cfg).expect("again");
    assert_eq!(offline::to_yaml(&docs2).expect("yaml"), once);
    assert!(reports2.iter().all(|r| r.outcome.as_ref().is_none_or(|o| !o.changed)));
}
