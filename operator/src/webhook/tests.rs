//! The webhook over HTTPS with AdmissionReview v1 bodies shaped like the API server's.
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::certs::{self, ReloadableCert};
use super::client::WebhookClient;
use super::*;
use crate::inject::tests::{test_config, test_connectors};

const SERVER_NAME: &str = "wallaroo-webhook.wallaroo-system.svc";

pub(crate) fn review(uid: &str, operation: &str, pod: Value, dry_run: bool) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "uid": "5b1c", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": dry_run,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

pub(crate) fn worker_pod(labels: Value) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "celsius-7d9f8b6c4-",
            "namespace": "apps",
            "creationTimestamp": null,
            "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "celsius-7d9f8b6c4", "uid": "0d4c", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420}}],
            "containers": [{"name": "worker", "image": "wallaroo/celsius:1.0", "resources": {}, "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent", "volumeMounts": [{"name": "kube-api-access-x", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {}
    })
}

pub(crate) struct Running {
    pub addr: SocketAddr,
    pub ca: String,
    pub metrics: Metrics,
    pub events: mpsc::Receiver<InjectionEvent>,
    pub stop: CancellationToken,
}

pub(crate) async fn start(connectors: Vec<Arc<Connector>>) -> Running {
    let ca = certs::generate_ca(30).expect("ca");
    let leaf = certs::issue(&ca.key, &[SERVER_NAME.to_string()], 1).expect("leaf");
    let store = Arc::new(ReloadableCert::default());
    store.set(certs::certified_key(leaf.cert.as_bytes(), leaf.key.as_bytes()).expect("key"));
    let metrics = Metrics::new().expect("metrics");
    let (tx, rx) = mpsc::channel(16);
    let hook = Arc::new(Webhook::new(Arc::new(connectors), Arc::new(test_config(true)), metrics.clone(), Some(tx)));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    tokio::spawn(server::serve(listener, certs::server_config(store).expect("tls"), hook, stop.clone()));
    Running { addr, ca: ca.cert, metrics, events: rx, stop }
}

async fn call(r: &Running, body: &Value) -> (http::StatusCode, Value) {
    let mut client = WebhookClient::connect(r.addr, r.ca.as_bytes(), SERVER_NAME).await.expect("connect");
    let (status, bytes) = client.post("/mutate", Bytes::from(body.to_string())).await.expect("post");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())))
}

fn connectors() -> Vec<Arc<Connector>> {
    test_connectors().into_iter().map(Arc::new).collect()
}

fn decode_patch(resp: &Value) -> json_patch::Patch {
    use base64::Engine as _;
    let b64 = resp.pointer("/response/patch").and_then(Value::as_str).unwrap_or_else(|| panic!("no patch in {resp}"));
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
    serde_json::from_slice(&raw).expect("json patch")
}

#[tokio::test]
async fn create_gets_a_json_patch_that_adds_both_sidecars() {
    let mut r = start(connectors()).await;
    let pod = worker_pod(json!({"app": "celsius", "wallaroo.dev/inject": "true"}));
    let (status, resp) = call(&r, &review("b7e1", "CREATE", pod.clone(), false)).await;
    assert_eq!(status, 200);
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(resp["response"]["uid"], "b7e1");
    assert_eq!(resp["response"]["allowed"], true);
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &decode_patch(&resp)).expect("patch applies to the original pod");
    let init: Vec<&str> =
        patched["spec"]["initContainers"].as_array().expect("init").iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(init, ["celsius-feed", "celsius-out"]);
    assert_eq!(patched["spec"]["containers"][0]["volumeMounts"], pod["spec"]["containers"][0]["volumeMounts"]);
    let ann: Value =
        serde_json::from_str(patched["metadata"]["annotations"]["wallaroo.dev/injected"].as_str().expect("ann"))
            .expect("json");
    assert_eq!(ann.as_object().map(|o| o.len()), Some(2));

    // Re-invocation (reinvocationPolicy: IfNeeded) on the already mutated pod changes nothing.
    let (_, again) = call(&r, &review("b7e2", "CREATE", patched, false)).await;
    assert!(again["response"].get("patch").is_none(), "{again}");

    let text = r.metrics.render();
    assert!(text.contains("wallaroo_operator_admission_requests_total{outcome=\"injected\"} 1"), "{text}");
    assert!(text.contains("wallaroo_operator_admission_requests_total{outcome=\"unchanged\"} 1"), "{text}");
    assert!(text.contains("wallaroo_operator_injected_sidecars_total 2"), "{text}");
    let ev = r.events.recv().await.expect("event");
    assert_eq!(ev.pod, "celsius-7d9f8b6c4-");
    assert_eq!(ev.connector.name.as_deref(), Some("celsius-feed"));
    r.stop.cancel();
}

#[tokio::test]
async fn unmatched_pod_is_admitted_unchanged_with_a_warning() {
    let r = start(connectors()).await;
    let pod = worker_pod(json!({"app": "nobody", "wallaroo.dev/inject": "true"}));
    let (status, resp) = call(&r, &review("c1", "CREATE", pod, false)).await;
    assert_eq!(status, 200);
    assert_eq!(resp["response"]["allowed"], true);
    assert!(resp["response"].get("patch").is_none());
    let warning = resp["response"]["warnings"][0].as_str().expect("warning");
    assert!(warning.contains("no Connector in namespace apps selects this pod"), "{warning}");
    assert!(r.metrics.render().contains("outcome=\"no_match\"} 1"));
}

#[tokio::test]
async fn pods_not_opted_in_updates_and_dry_runs_behave() {
    let mut r = start(connectors()).await;
    let plain = worker_pod(json!({"app": "celsius"}));
    let (_, resp) = call(&r, &review("d1", "CREATE", plain, false)).await;
    assert_eq!(resp["response"]["allowed"], true);
    assert!(resp["response"].get("patch").is_none());

    let opted = worker_pod(json!({"app": "celsius", "wallaroo.dev/inject": "true"}));
    let (_, resp) = call(&r, &review("d2", "UPDATE", opted.clone(), false)).await;
    assert!(resp["response"].get("patch").is_none(), "only CREATE is mutated");

    let (_, resp) = call(&r, &review("d3", "CREATE", opted, true)).await;
    assert!(resp["response"].get("patch").is_some(), "dry-run still shows the mutation");
    assert!(r.events.try_recv().is_err(), "but records no event");
    assert!(r.metrics.render().contains("wallaroo_operator_injected_sidecars_total 0"));
}

#[tokio::test]
async fn malformed_requests() {
    let r = start(connectors()).await;
    let (status, _) = call(&r, &json!({"hello": "world"})).await;
    assert_eq!(status, 400);
    let broken = review("e1", "CREATE", json!({"metadata": {"labels": "not-a-map"}, "spec": {}}), false);
    let (status, resp) = call(&r, &broken).await;
    assert_eq!(status, 200);
    assert_eq!(resp["response"]["uid"], "e1");
    assert_eq!(resp["response"]["allowed"], false);
    let mut client = WebhookClient::connect(r.addr, r.ca.as_bytes(), SERVER_NAME).await.expect("connect");
    let (status, _) = client.post("/nope", Bytes::from_static(b"{}")).await.expect("post");
    assert_eq!(status, 404);
}

#[tokio::test]
async fn untrusted_clients_and_wrong_names_fail_the_handshake() {
    let r = start(connectors()).await;
    let other = certs::generate_ca(1).expect("ca");
    assert!(WebhookClient::connect(r.addr, other.cert.as_bytes(), SERVER_NAME).await.is_err());
    assert!(WebhookClient::connect(r.addr, r.ca.as_bytes(), "evil.example.com").await.is_err());
}
