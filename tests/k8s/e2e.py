#!/usr/bin/env python3
"""The operator binary end to end against the in-memory API emulator (test tooling; see emulator.py).

Covers: self-managed webhook TLS (Secret, caBundle, rotation without restart), injection over HTTPS exactly as the
API server calls it, status and conditions, rollouts on spec change and for Connectors created after their pods,
pods that cannot take a Connector (reason on the pod and in the status), finalizer-driven rollout on deletion,
Events, metrics, leader election with hand-over on SIGTERM, and graceful shutdown.
"""
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jsonpatch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from k8slib import (ROOT, Emulator, Operator, Results, WebhookClient, admission_review, build_operator,  # noqa: E402
                    decode_patch, wait_for)

SERVICE_NAME = "wallaroo-connectors-webhook.wallaroo-system.svc"
NS = "/apis/wallaroo.dev/v1alpha1/namespaces/apps/connectors"
TLS = "/api/v1/namespaces/wallaroo-system/secrets/wallaroo-connectors-webhook-tls"
MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/wallaroo-connectors"
DEPLOY = "/apis/apps/v1/namespaces/apps/deployments/celsius"
LEASE = "/apis/coordination.k8s.io/v1/namespaces/wallaroo-system/leases/wallaroo-connector-operator"


def connectors():
    path = os.path.join(ROOT, "examples", "celsius", "connectors.yaml")
    if not os.path.exists(path):
        path = os.path.join(ROOT, "operator", "tests", "fixtures", "celsius-connectors.yaml")
    docs = [d for d in yaml.safe_load_all(open(path)) if d and d.get("kind") == "Connector"]
    for d in docs:
        d["metadata"].pop("namespace", None)
        d["spec"]["selector"] = {"matchLabels": {"app": "celsius"}}
    return {d["metadata"]["name"]: d for d in docs}


def condition(conn, type_):
    for c in (conn or {}).get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return None


def worker_pod():
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "celsius-7d9f8b6c4-", "namespace": "apps",
            "labels": {"app": "celsius", "wallaroo.dev/inject": "true", "pod-template-hash": "7d9f8b6c4"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "celsius-7d9f8b6c4",
                                 "uid": "seeded-rs", "controller": True}],
        },
        "spec": {"containers": [{"name": "worker", "image": "wallaroo/celsius:1.0"}]},
    }


def admit_and_create(r, emu, client, uid):
    """What the API server does for a ReplicaSet's pod: call the webhook, apply the patch, store the pod."""
    pod = worker_pod()
    code, body = client.post("/mutate", admission_review(uid, pod))
    review = json.loads(body)
    patch = decode_patch(review)
    r.check(f"admission {uid} allowed with a JSON patch", code == 200 and review["response"]["allowed"] and patch,
            f"{code} {body[:300]!r}")
    mutated = jsonpatch.apply_patch(pod, patch or [])
    return emu.create("/api/v1/namespaces/apps/pods", mutated)


def ca_from_secret(emu):
    s = emu.get(TLS)
    return base64.b64decode(s["data"]["ca.crt"]).decode() if s else None


def main():
    r = Results("e2e")
    binary = build_operator(release=os.environ.get("WALLAROO_E2E_RELEASE") == "1")
    emu = Emulator(seeds=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures-e2e.yaml")])
    ops = []
    try:
        scenario(r, binary, emu, ops)
    except Exception:
        import traceback
        r.check("scenario ran to the end", False, traceback.format_exc())
        for o in ops:
            print(f"--- {o.log_path}\n{o.tail(40)}")
    finally:
        for o in ops:
            o.terminate(5)
        emu.stop()
    namespaces_scenario(r, binary)
    return r.report()


def namespaces_scenario(r, binary):
    """watchNamespaces with two namespaces: one watch per namespace, nothing cluster-wide, nothing elsewhere."""
    emu = Emulator(seeds=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures-e2e.yaml")])
    op = None
    try:
        watched, other = ["apps", "etl"], "elsewhere"
        for ns in watched + [other]:
            emu.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            conn = {"apiVersion": "wallaroo.dev/v1alpha1", "kind": "Connector", "metadata": {"name": f"feed-{ns}"},
                    "spec": {"connectorName": "feed", "selector": {"matchLabels": {"app": "celsius"}},
                             "worker": {"port": 7100}, "source": {"udp": {"port": 6789}}}}
            emu.create(f"/apis/wallaroo.dev/v1alpha1/namespaces/{ns}/connectors", conn)
        op = Operator(binary, emu, "ns-op", extra_env={"WATCH_NAMESPACES": ",".join(watched)})
        r.check("namespaces: operator becomes ready", wait_for(op.ready, 30), op.tail())
        status = lambda ns: (emu.get(f"/apis/wallaroo.dev/v1alpha1/namespaces/{ns}/connectors/feed-{ns}") or {}).get("status")
        r.check("namespaces: Connectors in both watched namespaces reconciled",
                wait_for(lambda: all(status(ns) for ns in watched), 20), op.tail())
        time.sleep(1)
        r.check("namespaces: the Connector of an unwatched namespace is left alone", not status(other), status(other))
        ca = ca_from_secret(emu)
        client = WebhookClient(op.webhook_port, ca, SERVICE_NAME)
        pod = worker_pod()
        pod["metadata"]["namespace"] = "etl"
        review = json.loads(client.post("/mutate", admission_review("etl-pod", pod, namespace="etl"))[1])
        injected = json.dumps(decode_patch(review) or [])
        r.check("namespaces: a pod in a watched namespace gets that namespace's Connector",
                "feed-etl" in injected and "feed-apps" not in injected, review)
        pod["metadata"]["namespace"] = other
        review = json.loads(client.post("/mutate", admission_review("other-pod", pod, namespace=other))[1])
        r.check("namespaces: a pod elsewhere gets nothing", not decode_patch(review), review)
        client.close()
        calls = emu.get("/_emulator/requests")
        wide = sorted({f"{m} {p}" for m, p, _ in calls
                       if p in ("/apis/wallaroo.dev/v1alpha1/connectors", "/api/v1/pods")})
        per_ns = {p for m, p, w in calls if w}
        r.check("namespaces: no cluster-wide list or watch of Connectors or pods", not wide, wide)
        r.check("namespaces: one Connector watch and one pod watch per watched namespace",
                all(f"/apis/wallaroo.dev/v1alpha1/namespaces/{ns}/connectors" in per_ns
                    and f"/api/v1/namespaces/{ns}/pods" in per_ns for ns in watched), sorted(per_ns))
        r.check("namespaces: SIGTERM exits 0", op.terminate() == 0, op.tail())
    except Exception:
        import traceback
        r.check("namespaces scenario ran to the end", False, traceback.format_exc() + (op.tail(40) if op else ""))
    finally:
        if op:
            op.terminate(5)
        emu.stop()


def kubectl_checks(r, emu, feed):
    """What a user sees with kubectl: the CRD's printer columns over the status the operator wrote, and apply."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        print("  skip  kubectl checks: kubectl is not installed")
        return
    crd = yaml.safe_load(open(os.path.join(ROOT, "crds", "connector.yaml")))
    emu.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    with tempfile.TemporaryDirectory() as d:
        config = os.path.join(d, "kubeconfig")
        with open(config, "w") as f:
            yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "emu",
                            "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
                            "users": [{"name": "u", "user": {}}],
                            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u", "namespace": "apps"}}]}, f)
        env = dict(os.environ, KUBECONFIG=config, HOME=d)

        def run(*args, stdin=None):
            p = subprocess.run([kubectl, *args], env=env, input=stdin, capture_output=True, text=True, timeout=30)
            return p.returncode, p.stdout + p.stderr

        code, out = run("get", "wconn")
        rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
        r.check("kubectl get wconn: printer columns NAME DIRECTION KIND READY INJECTED AGE",
                code == 0 and out.split("\n")[0].split() == ["NAME", "DIRECTION", "KIND", "READY", "INJECTED", "AGE"], out)
        r.check("kubectl get wconn: the feed is a Ready udp source with 2 pods injected",
                rows.get(feed, [])[1:5] == ["source", "udp", "True", "2"], out)
        # The emulator serves no OpenAPI documents, so kubectl's client-side schema check is off; the CRD schema
        # itself is validated by chart_test.py.
        manifest = yaml.safe_dump({"apiVersion": "wallaroo.dev/v1alpha1", "kind": "Connector",
                                   "metadata": {"name": "from-kubectl"},
                                   "spec": {"connectorName": "k", "selector": {"matchLabels": {"app": "none"}},
                                            "worker": {"port": 7990}, "source": {"udp": {"port": 6990}}}})
        code, out = run("apply", "--validate=false", "-f", "-", stdin=manifest)
        r.check("kubectl apply creates a Connector", code == 0 and "created" in out, out)
        reason = wait_for(lambda: (condition(emu.get(f"{NS}/from-kubectl"), "Injected") or {}).get("reason"), 20)
        code, out = run("get", "connector", "from-kubectl", "-o", "jsonpath={.status.conditions[?(@.type==\"Injected\")].reason}")
        r.check("kubectl reads the status the operator wrote", code == 0 and out == reason == "NoMatchingPods", (out, reason))
        code, out = run("delete", "connectors.wallaroo.dev", "from-kubectl")
        gone = wait_for(lambda: emu.call("GET", f"{NS}/from-kubectl")[0] == 404, 20)
        r.check("kubectl delete: the finalizer is released and the Connector goes away", code == 0 and gone, out)


def scenario(r, binary, emu, ops):
    if True:
        op1 = Operator(binary, emu, "op-1", extra_env={"CERT_CHECK_SECONDS": "1"})
        ops.append(op1)
        r.check("operator becomes ready (Connector cache synced, certificate loaded)", wait_for(op1.ready, 30),
                op1.tail())
        secret = emu.get(TLS)
        r.check("TLS Secret created with CA and serving certificate",
                secret and {"ca.crt", "ca.key", "tls.crt", "tls.key"} <= set(secret.get("data", {})))
        ca = ca_from_secret(emu)
        bundle = wait_for(lambda: emu.get(MWC)["webhooks"][0]["clientConfig"].get("caBundle"), 10)
        r.check("webhook caBundle patched with the CA", bundle and base64.b64decode(bundle).decode() == ca)
        lease = wait_for(lambda: emu.get(LEASE), 10)
        r.check("Lease acquired by the first replica", lease and lease["spec"]["holderIdentity"] == "op-1", lease)

        # Admission before any Connector: admitted unchanged, with a warning.
        client = WebhookClient(op1.webhook_port, ca, SERVICE_NAME)
        code, body = client.post("/mutate", admission_review("no-match", worker_pod()))
        resp = json.loads(body)["response"]
        r.check("pod without a matching Connector is admitted unchanged with a warning",
                resp["allowed"] and "patch" not in resp and resp.get("warnings"), resp)

        conns = connectors()
        for c in conns.values():
            emu.create(NS, c)
        feed, out = sorted(conns)
        synced = wait_for(lambda: all(
            condition(emu.get(f"{NS}/{n}"), "Valid") for n in conns), 20)
        r.check("controller writes conditions for both Connectors", synced, op1.tail())
        got = emu.get(f"{NS}/{feed}")
        r.check("finalizer added", "wallaroo.dev/rollout" in got["metadata"].get("finalizers", []))
        r.check("status has observedGeneration, direction and kind",
                got["status"].get("observedGeneration") == got["metadata"]["generation"]
                and got["status"].get("direction") in ("source", "sink") and got["status"].get("kind"), got["status"])
        r.check("no pods yet: Ready False NoMatchingPods",
                condition(got, "Ready")["status"] == "False" and condition(got, "Injected")["reason"] == "NoMatchingPods")

        # Pods created through the webhook get both sidecars.
        wait_for(lambda: len(emu.get(f"{NS}")["items"]) == len(conns), 5)
        time.sleep(0.5)  # let the webhook's Connector cache see both
        pods = [admit_and_create(r, emu, client, f"pod-{i}") for i in range(2)]
        names = [c["name"] for c in pods[0]["spec"].get("initContainers", [])]
        r.check("pod got one native sidecar per Connector", names == sorted(conns), names)
        env = {e["name"]: e for e in pods[0]["spec"]["initContainers"][0]["env"]}
        r.check("sidecar env carries the Connector JSON and downward-API pod name",
                json.loads(env["WALLAROO_CONNECTOR"]["value"])["metadata"]["name"] == names[0]
                and env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name")
        ready = wait_for(lambda: all(
            condition(emu.get(f"{NS}/{n}"), "Ready")["status"] == "True" for n in conns), 20)
        r.check("both Connectors Ready with 2/2 pods injected", ready,
                json.dumps(emu.get(f"{NS}/{feed}").get("status"), indent=1))
        st = emu.get(f"{NS}/{feed}")["status"]
        r.check("matchedPods/injectedPods counted", st["matchedPods"] == 2 and st["injectedPods"] == 2, st)
        kubectl_checks(r, emu, feed)

        # Spec change -> the Deployment's pod template gets the new hash (a rollout).
        old_gen = emu.get(f"{NS}/{feed}")["metadata"]["generation"]
        code, _ = emu.merge(f"{NS}/{feed}", {"spec": {"drainTimeoutSeconds": 33}})
        key = f"connector.wallaroo.dev/{feed}"
        annotated = wait_for(lambda: emu.get(DEPLOY)["spec"]["template"].get("metadata", {})
                             .get("annotations", {}).get(key), 20)
        new_hash = wait_for(lambda: emu.get(f"{NS}/{feed}")["status"].get("specHash")
                            if emu.get(f"{NS}/{feed}")["status"].get("observedGeneration") == old_gen + 1 else None, 20)
        r.check("spec change rolls the owning Deployment with the new spec hash",
                annotated and annotated == new_hash, (annotated, new_hash, op1.tail()))
        inj = condition(emu.get(f"{NS}/{feed}"), "Injected")
        r.check("status shows the rollout in progress", inj and inj["reason"] == "RolloutInProgress", inj)
        events = emu.get("/apis/events.k8s.io/v1/namespaces/apps/events")["items"]
        reasons = {e.get("reason") for e in events}
        r.check("Events published (Injected, RolloutTriggered)", {"Injected", "RolloutTriggered"} <= reasons, reasons)

        # A Connector referencing a missing Secret is reported invalid.
        bad = json.loads(json.dumps(conns[out]))
        bad["metadata"] = {"name": "needs-secret"}
        bad["spec"]["selector"] = {"matchLabels": {"app": "nothing"}}
        bad["spec"].setdefault("worker", {})["cookieFrom"] = {"secretKeyRef": {"name": "absent", "key": "cookie"}}
        emu.create(NS, bad)
        valid = wait_for(lambda: condition(emu.get(f"{NS}/needs-secret"), "Valid"), 20)
        r.check("missing Secret -> Valid False MissingSecret",
                valid and valid["status"] == "False" and valid["reason"] == "MissingSecret", valid)

        # Deleting a Connector rolls the pods that run it, then releases the finalizer.
        emu.delete(f"{NS}/{out}")
        gone = wait_for(lambda: emu.call("GET", f"{NS}/{out}")[0] == 404, 20)
        removed = emu.get(DEPLOY)["spec"]["template"]["metadata"]["annotations"].get(f"connector.wallaroo.dev/{out}")
        r.check("deletion rolls the Deployment (annotation 'removed') and the Connector goes away",
                gone and removed == "removed", (gone, removed))

        # A Connector created after its pods: their Deployment is rolled so they get it.
        late = {"apiVersion": "wallaroo.dev/v1alpha1", "kind": "Connector", "metadata": {"name": "late-udp"},
                "spec": {"connectorName": "late", "selector": {"matchLabels": {"app": "celsius"}},
                         "worker": {"port": 7900}, "metricsPort": 9480, "source": {"udp": {"port": 6900}}}}
        emu.create(NS, late)
        late_hash = wait_for(lambda: emu.get(f"{NS}/late-udp").get("status", {}).get("specHash"), 20)
        rolled_late = wait_for(lambda: emu.get(DEPLOY)["spec"]["template"]["metadata"]["annotations"]
                               .get("connector.wallaroo.dev/late-udp"), 20)
        r.check("new Connector rolls the Deployment of pods created before it",
                late_hash and rolled_late == late_hash, (late_hash, rolled_late, op1.tail()))

        # A Connector the pod cannot take (a volume it lacks): admitted without it, with the reason on pod and status.
        needs_volume = {"apiVersion": "wallaroo.dev/v1alpha1", "kind": "Connector", "metadata": {"name": "archive"},
                        "spec": {"connectorName": "archive", "selector": {"matchLabels": {"app": "celsius"}},
                                 "worker": {"port": 7950}, "metricsPort": 9481, "sink": {"file": {"dir": "/archive/out"}},
                                 "volumeMounts": [{"name": "archive", "mountPath": "/archive"}]}}
        emu.create(NS, needs_volume)
        wait_for(lambda: emu.get(f"{NS}/archive").get("status", {}).get("specHash"), 20)
        time.sleep(0.5)  # let the webhook's Connector cache see it
        code, body = client.post("/mutate", admission_review("needs-volume", worker_pod()))
        resp = json.loads(body)["response"]
        r.check("admission warns that the Connector needs a volume the pod lacks",
                any("archive not injected" in w and "volume \"archive\"" in w for w in resp.get("warnings", [])), resp)
        skipped_pod = admit_and_create(r, emu, client, "needs-volume-2")
        record = json.loads(skipped_pod["metadata"]["annotations"].get("wallaroo.dev/skipped", "{}"))
        r.check("pod records the skip with the spec hash", "archive" in record
                and record["archive"]["specHash"] == emu.get(f"{NS}/archive")["status"]["specHash"], record)
        late_in_pod = "late-udp" in [c["name"] for c in skipped_pod["spec"].get("initContainers", [])]
        r.check("...and still gets the Connectors it can take", late_in_pod, skipped_pod["spec"])
        skip_cond = wait_for(lambda: (lambda c: c if c and c["reason"] == "InjectionSkipped" else None)(
            condition(emu.get(f"{NS}/archive"), "Injected")), 20)
        r.check("status says why: Injected False InjectionSkipped with the reason",
                skip_cond and "volume \"archive\"" in skip_cond["message"], skip_cond)

        # Certificate rotation without restart: drop the Secret, the operator re-issues and reloads.
        old_ca = ca
        emu.delete(TLS)
        new_ca = wait_for(lambda: (lambda c: c if c and c != old_ca else None)(ca_from_secret(emu)), 20)
        r.check("TLS Secret re-created with a new CA", new_ca)
        def new_cert_served():
            c = WebhookClient(op1.webhook_port, new_ca, SERVICE_NAME)
            try:
                return c.post("/mutate", admission_review("rot", worker_pod()))[0] == 200
            finally:
                c.close()
        r.check("webhook serves the new certificate without a restart", wait_for(new_cert_served, 20))
        bundle = wait_for(lambda: (lambda b: b if b and base64.b64decode(b).decode() == new_ca else None)(
            emu.get(MWC)["webhooks"][0]["clientConfig"].get("caBundle")), 20)
        r.check("caBundle follows the new CA", bundle)

        m = op1.metrics()
        for series in ['wallaroo_operator_admission_requests_total{outcome="injected"}',
                       'wallaroo_operator_admission_requests_total{outcome="no_match"} 1',
                       "wallaroo_operator_reconcile_total", "wallaroo_operator_reconcile_duration_seconds_bucket",
                       "wallaroo_operator_admission_duration_seconds_bucket", "wallaroo_operator_injected_sidecars_total"]:
            r.check(f"metric {series}", series in m)

        # Second replica: serves the webhook, waits for the Lease; SIGTERM on the leader hands over.
        op2 = Operator(binary, emu, "op-2")
        ops.append(op2)
        r.check("second replica becomes ready", wait_for(op2.ready, 30), op2.tail())
        time.sleep(1)
        r.check("Lease still held by the first replica", emu.get(LEASE)["spec"]["holderIdentity"] == "op-1")
        t0 = time.monotonic()
        code = op1.terminate()
        r.check("SIGTERM: first replica exits 0", code == 0, (code, op1.tail()))
        r.check("...within 10 s", time.monotonic() - t0 < 10, time.monotonic() - t0)
        took = wait_for(lambda: emu.get(LEASE)["spec"].get("holderIdentity") == "op-2", 15)
        r.check("second replica takes the Lease over", took, emu.get(LEASE))
        emu.merge(f"{NS}/{feed}", {"spec": {"drainTimeoutSeconds": 34}})
        rolled = wait_for(lambda: emu.get(DEPLOY)["spec"]["template"]["metadata"]["annotations"].get(key) != annotated, 20)
        r.check("new leader reconciles (rolls on the next spec change)", rolled, op2.tail())
        r.check("SIGTERM: second replica exits 0", op2.terminate() == 0, op2.tail())


if __name__ == "__main__":
    sys.exit(main())
