//! Admission latency over HTTPS: 10,000 AdmissionReviews, one at a time on a keep-alive connection, as the API
//! server sends them, against the production webhook (TLS, reflector-backed Connector lookup, JSON patch).
//!
//! Run: cargo bench -p wallaroo-connector-operator --bench admission
//! The Connector cache holds 1,000 Connectors in 100 namespaces; each pod matches 2 of them.
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::runtime::reflector;
use kube::runtime::watcher;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wallaroo_crds::Connector;
use wallaroo_operator::inject::InjectConfig;
use wallaroo_operator::metrics::Metrics;
use wallaroo_operator::webhook::certs::{self, ReloadableCert};
use wallaroo_operator::webhook::client::WebhookClient;
use wallaroo_operator::webhook::{ConnectorLookup, Webhook, server};

const REQUESTS: usize = 10_000;
const WARMUP: usize = 500;
const NAMESPACES: usize = 100;
const PER_NAMESPACE: usize = 10;
const SERVER_NAME: &str = "wallaroo-connectors-webhook.wallaroo-system.svc";

fn connector(ns: usize, i: usize) -> Result<Connector, serde_json::Error> {
    // Two Connectors per namespace select app=worker; the rest select other apps and must be filtered out.
    let app = if i < 2 { "worker".to_string() } else { format!("other-{i}") };
    let spec = if i.is_multiple_of(2) {
        json!({"connectorName": format!("in{i}"), "selector": {"matchLabels": {"app": app}},
               "worker": {"port": 7100 + i}, "source": {"udp": {"port": 6000 + i}}})
    } else {
        json!({"connectorName": format!("out{i}"), "selector": {"matchLabels": {"app": app}},
               "worker": {"port": 7100 + i, "cookieFrom": {"secretKeyRef": {"name": "cookie", "key": "c"}}},
               "sink": {"udp": {"host": "collector", "port": 9000}}, "metricsPort": 9500 + i})
    };
    serde_json::from_value(json!({
        "apiVersion": "wallaroo.dev/v1alpha1", "kind": "Connector",
        "metadata": {"name": format!("conn-{i}"), "namespace": format!("ns-{ns}"), "uid": format!("u-{ns}-{i}")},
        "spec": spec
    }))
}

fn review(n: usize) -> Bytes {
    let body = json!({
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": format!("req-{n}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": format!("ns-{}", n % NAMESPACES), "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "worker-5f7c9-", "labels": {"app": "worker", "wallaroo.dev/inject": "true"},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "worker-5f7c9", "uid": "rs", "controller": true}]},
                "spec": {"containers": [{"name": "worker", "image": "wallaroo/app:1", "resources": {},
                         "volumeMounts": [{"name": "token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]}],
                         "volumes": [{"name": "token", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}],
                         "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst"}
            },
            "dryRun": false
        }
    });
    Bytes::from(body.to_string())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (store, mut writer) = reflector::store::<Connector>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for ns in 0..NAMESPACES {
        for i in 0..PER_NAMESPACE {
            writer.apply_watcher_event(&watcher::Event::InitApply(connector(ns, i)?));
        }
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    assert_eq!(store.in_namespace("ns-3").len(), PER_NAMESPACE);

    let ca = certs::generate_ca(30)?;
    let leaf = certs::issue(&ca.key, &[SERVER_NAME.to_string()], 30)?;
    let resolver = Arc::new(ReloadableCert::default());
    resolver.set(certs::certified_key(leaf.cert.as_bytes(), leaf.key.as_bytes())?);
    let cfg = InjectConfig {
        image: "wallaroo/connectors:bench".into(),
        image_pull_policy: None,
        default_resources: ResourceRequirements::default(),
        native_sidecars: true,
    };
    let metrics = Metrics::new()?;
    let hook = Arc::new(Webhook::new(Arc::new(store), Arc::new(cfg), metrics.clone(), None));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let srv = tokio::spawn(server::serve(listener, certs::server_config(resolver)?, hook, stop.clone()));

    let bodies: Vec<Bytes> = (0..REQUESTS + WARMUP).map(review).collect();
    let mut client = WebhookClient::connect(addr, ca.cert.as_bytes(), SERVER_NAME).await?;
    for body in &bodies[..WARMUP] {
        client.post("/mutate", body.clone()).await?;
    }
    let mut samples = Vec::with_capacity(REQUESTS);
    let started = Instant::now();
    for body in &bodies[WARMUP..] {
        let t = Instant::now();
        let (status, resp) = client.post("/mutate", body.clone()).await?;
        samples.push(t.elapsed());
        if status != 200 || !resp.windows(9).any(|w| w == b"JSONPatch") {
            return Err(format!("unexpected response {status}: {}", String::from_utf8_lossy(&resp)).into());
        }
    }
    let total = started.elapsed();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "admission over HTTPS: {REQUESTS} AdmissionReviews, 1 keep-alive connection, {} Connectors cached",
        NAMESPACES * PER_NAMESPACE
    );
    println!("  p50  {:.3} ms", ms(percentile(&samples, 0.50)));
    println!("  p90  {:.3} ms", ms(percentile(&samples, 0.90)));
    println!("  p99  {:.3} ms", ms(percentile(&samples, 0.99)));
    println!("  max  {:.3} ms", ms(samples[samples.len() - 1]));
    println!("  throughput {:.0} reviews/s", REQUESTS as f64 / total.as_secs_f64());
    // The server-side share (decode, lookup, inject, diff, encode), from the operator's own histogram: separates
    // the webhook's work from TLS, HTTP and scheduling on a shared machine.
    let h = &metrics.admission_duration_seconds;
    let count = h.get_sample_count() as f64;
    println!("  server-side handling: mean {:.3} ms over {} reviews", h.get_sample_sum() * 1000.0 / count, count);
    let text = metrics.render();
    for le in ["0.00025", "0.0005", "0.001", "0.002"] {
        let needle = format!("wallaroo_operator_admission_duration_seconds_bucket{{le=\"{le}\"}} ");
        if let Some(n) =
            text.lines().find_map(|l| l.strip_prefix(needle.as_str())).and_then(|v| v.trim().parse::<f64>().ok())
        {
            println!("    <= {:>5} ms: {:.2}%", le.parse::<f64>().unwrap_or(0.0) * 1000.0, 100.0 * n / count);
        }
    }
    let injected = metrics.injected_sidecars_total.get();
    println!("  sidecars injected: {injected} (2 per review expected)");
    stop.cancel();
    let _ = srv.await;
    if injected != 2 * (REQUESTS + WARMUP) as u64 {
        return Err("every review should inject exactly 2 sidecars".into());
    }
    Ok(())
}
