//! The reconciler against scripted API servers (tower-test): each scenario lists the exact calls it expects, in
//! order, and fails on any other call or on a call left unmade.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};
use wallaroo_crds::Connector;

use super::leader::{Elector, LeaseConfig};
use super::*;
use crate::inject::names::{INJECTED_ANNOTATION, SKIPPED_ANNOTATION};
use crate::inject::tests::test_connectors;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected call: method, exact path (query ignored), a check on the body, and the reply.
struct Step {
    method: Method,
    path: String,
    check: Box<dyn Fn(&Value) + Send>,
    status: u16,
    reply: Value,
}

fn step(method: Method, path: &str, status: u16, reply: Value) -> Step {
    Step { method, path: path.to_string(), check: Box::new(|_| {}), status, reply }
}

fn checked(mut s: Step, check: impl Fn(&Value) + Send + 'static) -> Step {
    s.check = Box::new(check);
    s
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": format!("{what} not found"), "reason": "NotFound", "code": 404})
}

async fn serve(mut handle: Handle, steps: Vec<Step>) -> Vec<Value> {
    let mut bodies = Vec::new();
    for (i, s) in steps.into_iter().enumerate() {
        let (req, send) =
            handle.next_request().await.unwrap_or_else(|| panic!("step {i}: no request for {} {}", s.method, s.path));
        assert_eq!((req.method(), req.uri().path()), (&s.method, s.path.as_str()), "step {i}");
        let bytes = req.into_body().collect_bytes().await.expect("body");
        let body: Value =
            if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("json body") };
        (s.check)(&body);
        bodies.push(body);
        let resp = Response::builder()
            .status(s.status)
            .body(Body::from(serde_json::to_vec(&s.reply).expect("reply")))
            .expect("response");
        send.send_response(resp);
    }
    bodies
}

fn event_reply() -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": "apps"}, "eventTime": "2026-01-01T00:00:00.000000Z"})
}

struct Fixture {
    ctx: Arc<Context>,
    handle: Handle,
    pods: PodIndex,
}

fn fixture() -> Fixture {
    fixture_with(true)
}

fn fixture_with(validate_secrets: bool) -> Fixture {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let pods = PodIndex::default();
    // An empty, completed pod list: reconciles wait for one.
    pods.apply(&watcher::Event::Init);
    pods.apply(&watcher::Event::InitDone);
    let reporter = Reporter { controller: "wallaroo-connector-operator".into(), instance: Some("test".into()) };
    let ctx = Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        pods: pods.clone(),
        metrics: crate::metrics::Metrics::new().expect("metrics"),
        namespaces: None,
        validate_secrets,
    };
    Fixture { ctx: Arc::new(ctx), handle, pods }
}

fn connector(name: &str) -> Connector {
    let mut c = test_connectors().into_iter().find(|c| c.metadata.name.as_deref() == Some(name)).expect("fixture");
    c.metadata.uid = Some(format!("uid-{name}"));
    c.metadata.generation = Some(2);
    c.metadata.resource_version = Some("10".into());
    c.metadata.finalizers = Some(vec![FINALIZER.into()]);
    c
}

fn pod(name: &str, injected: &[(&str, &str)], owner_rs: Option<&str>) -> PartialObjectMeta<Pod> {
    let ann: BTreeMap<&str, &str> = injected.iter().copied().collect();
    let mut meta = json!({
        "name": name, "namespace": "apps",
        "labels": {"app": "celsius", "wallaroo.dev/inject": "true"},
        "annotations": {INJECTED_ANNOTATION: serde_json::to_string(&ann).expect("json")}
    });
    if let Some(rs) = owner_rs {
        meta["ownerReferences"] =
            json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": "rs-uid", "controller": true}]);
    }
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta})).expect("pod meta")
}

fn add_pods(index: &mut PodIndex, pods: Vec<PartialObjectMeta<Pod>>) {
    for p in pods {
        index.apply(&watcher::Event::Apply(p));
    }
}

fn connector_json(c: &Connector) -> Value {
    serde_json::to_value(c).expect("connector")
}

const CONNECTORS: &str = "/apis/wallaroo.dev/v1alpha1/namespaces/apps/connectors";

fn deployment(annotations: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "celsius", "namespace": "apps"},
           "spec": {"selector": {"matchLabels": {"app": "celsius"}}, "template": {"metadata": {"annotations": annotations}, "spec": {"containers": []}}}})
}

fn replicaset() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "celsius-abc", "namespace": "apps",
           "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "celsius", "uid": "d-uid", "controller": true}]},
           "spec": {"selector": {"matchLabels": {"app": "celsius"}}}})
}

/// Rolling Deployment celsius (found through ReplicaSet celsius-abc, template without the annotation) to
/// `key: value`, and the RolloutTriggered event.
fn rollout_steps(key: &'static str, value: String) -> Vec<Step> {
    let patched = deployment(json!({key: value}));
    vec![
        step(Method::GET, "/apis/apps/v1/namespaces/apps/replicasets/celsius-abc", 200, replicaset()),
        step(Method::GET, "/apis/apps/v1/namespaces/apps/deployments/celsius", 200, deployment(json!({}))),
        checked(step(Method::PATCH, "/apis/apps/v1/namespaces/apps/deployments/celsius", 200, patched), move |b| {
            assert_eq!(b["spec"]["template"]["metadata"]["annotations"][key], value.as_str());
        }),
        checked(step(Method::POST, "/apis/events.k8s.io/v1/namespaces/apps/events", 201, event_reply()), |b| {
            assert_eq!(b["reason"], "RolloutTriggered");
        }),
    ]
}

async fn run_scenario(f: Fixture, c: Connector, steps: Vec<Step>) -> (Result<Action, Error>, Vec<Value>) {
    let server = tokio::spawn(serve(f.handle, steps));
    let result = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(c), f.ctx.clone()))
        .await
        .expect("reconcile timed out");
    let bodies =
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("steps left unserved").expect("server task");
    (result, bodies)
}

#[tokio::test]
async fn new_connector_gets_the_finalizer_first() {
    let f = fixture();
    let mut c = connector("celsius-feed");
    c.metadata.finalizers = None;
    let steps =
        vec![checked(step(Method::PATCH, &format!("{CONNECTORS}/celsius-feed"), 200, connector_json(&c)), |body| {
            let text = body.to_string();
            assert!(text.contains("/metadata/finalizers") && text.contains(FINALIZER), "{text}");
        })];
    let (result, _) = run_scenario(f, c, steps).await;
    result.expect("ok");
}

#[tokio::test]
async fn spec_change_rolls_the_owning_deployment_and_writes_status() {
    let mut f = fixture();
    let c = connector("celsius-out");
    let hash = c.spec.spec_hash();
    add_pods(
        &mut f.pods,
        vec![
            pod("celsius-abc-1", &[("celsius-out", &hash)], Some("celsius-abc")),
            pod("celsius-abc-2", &[("celsius-out", "0000000000000000")], Some("celsius-abc")),
            pod("celsius-abc-3", &[("celsius-out", "0000000000000000")], Some("celsius-abc")),
        ],
    );
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "wallaroo-cookie", "namespace": "apps"}, "data": {"cookie": "c2VjcmV0"}});
    let key = "connector.wallaroo.dev/celsius-out";
    let expect_hash = hash.clone();
    let steps = vec![
        step(Method::GET, "/api/v1/namespaces/apps/secrets/wallaroo-cookie", 200, secret),
        step(Method::GET, "/apis/apps/v1/namespaces/apps/replicasets/celsius-abc", 200, replicaset()),
        step(Method::GET, "/apis/apps/v1/namespaces/apps/replicasets/celsius-abc", 200, replicaset()),
        step(Method::GET, "/apis/apps/v1/namespaces/apps/deployments/celsius", 200, deployment(json!({key: "old"}))),
        checked(
            step(
                Method::PATCH,
                "/apis/apps/v1/namespaces/apps/deployments/celsius",
                200,
                deployment(json!({key: hash})),
            ),
            move |b| {
                assert_eq!(b["spec"]["template"]["metadata"]["annotations"][key], expect_hash);
            },
        ),
        checked(step(Method::POST, "/apis/events.k8s.io/v1/namespaces/apps/events", 201, event_reply()), |b| {
            assert_eq!(b["reason"], "RolloutTriggered");
            assert_eq!(b["regarding"]["name"], "celsius-out");
        }),
        checked(step(Method::PATCH, &format!("{CONNECTORS}/celsius-out/status"), 200, connector_json(&c)), |b| {
            let s = &b["status"];
            assert_eq!(s["observedGeneration"], 2);
            assert_eq!((s["matchedPods"].as_i64(), s["injectedPods"].as_i64()), (Some(3), Some(1)));
            assert_eq!(s["conditions"][0]["type"], "Ready");
            assert_eq!(s["conditions"][2]["reason"], "RolloutInProgress");
            assert_eq!(s["direction"], "sink");
        }),
    ];
    let (result, _) = run_scenario(f, c, steps).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn already_rolled_deployment_is_not_patched_again() {
    let mut f = fixture();
    let c = connector("celsius-feed");
    let hash = c.spec.spec_hash();
    add_pods(&mut f.pods, vec![pod("celsius-abc-2", &[("celsius-feed", "0000000000000000")], Some("celsius-abc"))]);
    let key = "connector.wallaroo.dev/celsius-feed";
    let steps = vec![
        step(Method::GET, "/apis/apps/v1/namespaces/apps/replicasets/celsius-abc", 200, replicaset()),
        step(Method::GET, "/apis/apps/v1/namespaces/apps/deployments/celsius", 200, deployment(json!({key: hash}))),
        step(Method::PATCH, &format!("{CONNECTORS}/celsius-feed/status"), 200, connector_json(&c)),
    ];
    let ctx = f.ctx.clone();
    let (result, _) = run_scenario(f, c, steps).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(ctx.metrics.rollouts_total.get(), 0);
}

#[tokio::test]
async fn new_connector_rolls_the_pods_created_before_it() {
    let mut f = fixture();
    let c = connector("celsius-feed");
    let hash = c.spec.spec_hash();
    // Runs another Connector's sidecar, but not this one: it was created before celsius-feed existed.
    add_pods(&mut f.pods, vec![pod("celsius-abc-1", &[("celsius-out", "1111111111111111")], Some("celsius-abc"))]);
    let mut steps = rollout_steps("connector.wallaroo.dev/celsius-feed", hash);
    steps.push(checked(
        step(Method::PATCH, &format!("{CONNECTORS}/celsius-feed/status"), 200, connector_json(&c)),
        |b| {
            let s = &b["status"];
            assert_eq!((s["matchedPods"].as_i64(), s["injectedPods"].as_i64()), (Some(1), Some(0)));
            assert_eq!(s["conditions"][2]["reason"], "RolloutInProgress");
        },
    ));
    let ctx = f.ctx.clone();
    let (result, _) = run_scenario(f, c, steps).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(ctx.metrics.rollouts_total.get(), 1);
}

#[tokio::test]
async fn pods_that_refused_this_spec_are_reported_not_rolled() {
    let mut f = fixture();
    let c = connector("celsius-feed");
    let mut refused = pod("celsius-abc-1", &[], Some("celsius-abc"));
    let skip = json!({"celsius-feed": {"specHash": c.spec.spec_hash(), "reason": "spec.volumeMounts[0] names volume \"data\", which the pod does not have"}});
    refused.metadata.annotations.get_or_insert_default().insert(SKIPPED_ANNOTATION.into(), skip.to_string());
    // Refused an older spec: the new one may fit, so this pod is rolled.
    let mut refused_old = pod("celsius-abc-2", &[], Some("celsius-abc"));
    let old = json!({"celsius-feed": {"specHash": "0000000000000000", "reason": "old"}});
    refused_old.metadata.annotations.get_or_insert_default().insert(SKIPPED_ANNOTATION.into(), old.to_string());
    add_pods(&mut f.pods, vec![refused, refused_old]);
    let mut steps = rollout_steps("connector.wallaroo.dev/celsius-feed", c.spec.spec_hash());
    steps.push(checked(
        step(Method::PATCH, &format!("{CONNECTORS}/celsius-feed/status"), 200, connector_json(&c)),
        |b| {
            let injected = &b["status"]["conditions"][2];
            assert_eq!(injected["reason"], "InjectionSkipped");
            let m = injected["message"].as_str().unwrap_or_default();
            assert!(
                m.contains("0 of 2 matching pods run the current spec; 1 could not take it: spec.volumeMounts[0]"),
                "{m}"
            );
        },
    ));
    let (result, _) = run_scenario(f, c, steps).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn missing_secret_makes_it_invalid_and_blocks_rollouts() {
    let mut f = fixture();
    let c = connector("celsius-out");
    add_pods(&mut f.pods, vec![pod("celsius-abc-2", &[("celsius-out", "0000000000000000")], Some("celsius-abc"))]);
    let steps = vec![
        step(
            Method::GET,
            "/api/v1/namespaces/apps/secrets/wallaroo-cookie",
            404,
            not_found("secrets \"wallaroo-cookie\""),
        ),
        checked(step(Method::PATCH, &format!("{CONNECTORS}/celsius-out/status"), 200, connector_json(&c)), |b| {
            let ready = &b["status"]["conditions"][0];
            assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("MissingSecret")));
            assert!(ready["message"].as_str().is_some_and(|m| m.contains("Secret wallaroo-cookie not found")));
        }),
        checked(step(Method::POST, "/apis/events.k8s.io/v1/namespaces/apps/events", 201, event_reply()), |b| {
            assert_eq!(b["reason"], "InvalidConnector");
            assert_eq!(b["type"], "Warning");
        }),
    ];
    let (result, _) = run_scenario(f, c, steps).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn secret_checks_can_be_disabled() {
    let f = fixture_with(false);
    let c = connector("celsius-out");
    let steps =
        vec![checked(step(Method::PATCH, &format!("{CONNECTORS}/celsius-out/status"), 200, connector_json(&c)), |b| {
            assert_eq!(b["status"]["conditions"][1]["reason"], "SpecValid");
        })];
    let (result, _) = run_scenario(f, c, steps).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn unchanged_status_is_not_written() {
    let f = fixture();
    let mut c = connector("celsius-feed");
    let obs = status::Observed { has_selector: true, ..status::Observed::default() };
    c.status = Some(status::build(&c, &obs, "2026-01-01T00:00:00Z"));
    let (result, _) = run_scenario(f, c, vec![]).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn opt_out_skips_rollouts() {
    let mut f = fixture();
    let mut c = connector("celsius-feed");
    c.spec.restart_on_change = Some(false);
    add_pods(&mut f.pods, vec![pod("celsius-abc-2", &[("celsius-feed", "0000000000000000")], Some("celsius-abc"))]);
    let steps = vec![checked(
        step(Method::PATCH, &format!("{CONNECTORS}/celsius-feed/status"), 200, connector_json(&c)),
        |b| {
            assert_eq!(b["status"]["conditions"][2]["reason"], "PodsOutdated");
        },
    )];
    let (result, _) = run_scenario(f, c, steps).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn deletion_rolls_pods_running_the_connector_then_drops_the_finalizer() {
    let mut f = fixture();
    let mut c = connector("celsius-feed");
    c.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
    add_pods(
        &mut f.pods,
        vec![
            pod("celsius-0", &[("celsius-feed", "1111111111111111")], None),
            pod("other", &[("celsius-out", "1111111111111111")], Some("celsius-abc")),
        ],
    );
    let mut ss_pod = pod("celsius-ss-0", &[("celsius-feed", "1111111111111111")], None);
    ss_pod.metadata.owner_references = Some(vec![serde_json::from_value(json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "celsius-ss", "uid": "ss", "controller": true})).expect("owner")]);
    add_pods(&mut f.pods, vec![ss_pod]);
    let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "celsius-ss", "namespace": "apps"}, "spec": {"selector": {}, "serviceName": "x", "template": {"spec": {"containers": []}}}});
    let steps = vec![
        step(Method::GET, "/apis/apps/v1/namespaces/apps/statefulsets/celsius-ss", 200, sts.clone()),
        checked(step(Method::PATCH, "/apis/apps/v1/namespaces/apps/statefulsets/celsius-ss", 200, sts), |b| {
            assert_eq!(
                b["spec"]["template"]["metadata"]["annotations"]["connector.wallaroo.dev/celsius-feed"],
                REMOVED
            );
        }),
        step(Method::POST, "/apis/events.k8s.io/v1/namespaces/apps/events", 201, event_reply()),
        checked(step(Method::POST, "/apis/events.k8s.io/v1/namespaces/apps/events", 201, event_reply()), |b| {
            assert_eq!(b["reason"], "PodsNotRolled");
            assert!(b["note"].as_str().is_some_and(|n| n.contains("celsius-0")));
        }),
        checked(step(Method::PATCH, &format!("{CONNECTORS}/celsius-feed"), 200, connector_json(&c)), |b| {
            assert!(b.to_string().contains("remove"), "{b}");
        }),
    ];
    let (result, _) = run_scenario(f, c, steps).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn api_errors_are_classified_for_metrics() {
    let f = fixture();
    let ctx = f.ctx.clone();
    let c = connector("celsius-out");
    let steps = vec![step(
        Method::GET,
        "/api/v1/namespaces/apps/secrets/wallaroo-cookie",
        403,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "forbidden", "reason": "Forbidden", "code": 403}),
    )];
    let (result, _) = run_scenario(f, c.clone(), steps).await;
    let err = result.expect_err("forbidden");
    assert_eq!(err.reason(), "forbidden");
    let action = error_policy(Arc::new(c), &err, ctx.clone());
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert!(ctx.metrics.render().contains("wallaroo_operator_reconcile_errors_total{reason=\"forbidden\"} 1"));
    assert!(ctx.metrics.render().contains("wallaroo_operator_reconcile_total 1"));
}

#[test]
fn pod_events_map_to_matching_and_previously_injected_connectors() {
    let (reader, mut writer) = reflector::store::<Connector>();
    for c in test_connectors() {
        writer.apply_watcher_event(&watcher::Event::Apply(c));
    }
    let p = pod("x", &[("gone", "1")], None);
    let refs = connectors_for_pod(&reader, &p);
    let names: Vec<String> = refs.iter().map(|r| r.name.clone()).collect();
    assert_eq!(names, ["celsius-feed", "celsius-out", "gone"]);
    assert_eq!(refs[0], ObjectRef::<Connector>::new("celsius-feed").within("apps"));
    assert_eq!(refs[0].namespace.as_deref(), Some("apps"));
    let _ = Connector::kind(&());
}

#[tokio::test]
async fn reconciles_wait_for_the_pod_list() {
    let f = fixture();
    let pods = PodIndex::default();
    let ctx = Arc::new(Context { pods, ..clone_context(&f.ctx) });
    // No API call at all: a reconcile before the first pod list completes is postponed.
    let server = tokio::spawn(serve(f.handle, vec![]));
    let action = reconcile(Arc::new(connector("celsius-feed")), ctx).await.expect("postponed");
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    server.await.expect("server");
}

fn clone_context(c: &Context) -> Context {
    Context {
        client: c.client.clone(),
        pods: c.pods.clone(),
        recorder: c.recorder.clone(),
        metrics: c.metrics.clone(),
        namespaces: c.namespaces.clone(),
        validate_secrets: c.validate_secrets,
    }
}

fn lease(holder: &str, rv: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "op", "namespace": "sys", "resourceVersion": rv},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1, "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 3}})
}

#[tokio::test]
async fn leader_election_acquires_respects_and_takes_over() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let cfg = LeaseConfig {
        namespace: "sys".into(),
        name: "op".into(),
        identity: "me".into(),
        lease_duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(500),
        retry_period: Duration::from_millis(100),
    };
    let path = "/apis/coordination.k8s.io/v1/namespaces/sys/leases";
    let steps = vec![
        step(Method::GET, &format!("{path}/op"), 404, not_found("leases \"op\"")),
        checked(step(Method::POST, path, 201, lease("me", "1")), |b| assert_eq!(b["spec"]["holderIdentity"], "me")),
        // Another holder, freshly observed: we must wait.
        step(Method::GET, &format!("{path}/op"), 200, lease("other", "5")),
        // Same record 1.2s later by our clock: expired, take over with the read resourceVersion.
        step(Method::GET, &format!("{path}/op"), 200, lease("other", "5")),
        checked(step(Method::PUT, &format!("{path}/op"), 200, lease("me", "6")), |b| {
            assert_eq!(b["spec"]["holderIdentity"], "me");
            assert_eq!(b["metadata"]["resourceVersion"], "5");
            assert_eq!(b["spec"]["leaseTransitions"], 4);
        }),
        // A renewal that loses a race is a Conflict: not leader, no error.
        step(Method::GET, &format!("{path}/op"), 200, lease("me", "6")),
        step(
            Method::PUT,
            &format!("{path}/op"),
            409,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409}),
        ),
    ];
    let server = tokio::spawn(serve(handle, steps));
    let mut e = Elector::new(client, cfg);
    assert!(e.try_acquire_or_renew().await.expect("create"));
    assert!(!e.try_acquire_or_renew().await.expect("held by other"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(e.try_acquire_or_renew().await.expect("take over"));
    assert!(!e.try_acquire_or_renew().await.expect("conflict"));
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("all steps").expect("server");
}
