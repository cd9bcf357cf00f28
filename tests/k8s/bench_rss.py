#!/usr/bin/env python3
"""Operator memory with 1,000 Connectors and 5,000 pods (benchmark, not a test).

Seeds the API emulator with 1,000 Connectors in 50 namespaces and 5,000 opted-in pods whose metadata looks like
real ReplicaSet pods (labels, owner reference, injection annotation, managedFields), starts the release-built
operator, waits until every Connector has been reconciled (status.observedGeneration set), then samples the
operator's resident set size for 10 s. Prints VmRSS (steady state) and VmHWM (peak).

Run: tests/k8s/bench_rss.py [--watch-namespaces]   (uses the venv created by tests/k8s/run.sh)
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from k8slib import Emulator, Operator, build_operator, wait_for  # noqa: E402

CONNECTORS, PODS, NAMESPACES = 1000, 5000, 50


def fixtures(path):
    objs = [{"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
             "metadata": {"name": "wallaroo-connectors"},
             "webhooks": [{"name": "inject.wallaroo.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                           "clientConfig": {"service": {"name": "wallaroo-connectors-webhook",
                                                        "namespace": "wallaroo-system"}}}]}]
    per_ns = CONNECTORS // NAMESPACES
    for n in range(NAMESPACES):
        ns = f"team-{n}"
        for i in range(per_ns):
            app = f"app-{i // 2}"
            # restartOnChange false: the seeded pods carry made-up spec hashes, and rolling them is not what is measured.
            spec = {"connectorName": f"c{i}", "selector": {"matchLabels": {"app": app}}, "worker": {"port": 7100 + i},
                    "restartOnChange": False}
            if i % 2 == 0:
                spec["source"] = {"kafka": {"brokers": ["kafka-0.kafka:9092", "kafka-1.kafka:9092"],
                                            "topics": [f"topic-{i}"], "groupId": f"group-{n}-{i}",
                                            "properties": {"security.protocol": "SASL_SSL"}}}
            else:
                spec["sink"] = {"udp": {"host": "collector", "port": 9000}}
                spec["metricsPort"] = 9500 + i
            objs.append({"apiVersion": "wallaroo.dev/v1alpha1", "kind": "Connector",
                         "metadata": {"name": f"conn-{i}", "namespace": ns}, "spec": spec})
    per_ns_pods = PODS // NAMESPACES
    for n in range(NAMESPACES):
        ns = f"team-{n}"
        for p in range(per_ns_pods):
            app = f"app-{p % (per_ns // 2)}"
            injected = {f"conn-{2 * (p % (per_ns // 2))}": "0123456789abcdef",
                        f"conn-{2 * (p % (per_ns // 2)) + 1}": "fedcba9876543210"}
            objs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": f"{app}-7d9f8b6c4-{p:05d}", "namespace": ns,
                "labels": {"app": app, "wallaroo.dev/inject": "true", "pod-template-hash": "7d9f8b6c4"},
                "annotations": {"wallaroo.dev/injected": json.dumps(injected, separators=(",", ":")),
                                "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{app}-7d9f8b6c4",
                                     "uid": f"rs-{n}-{app}", "controller": True, "blockOwnerDeletion": True}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}]},
                "spec": {"containers": [{"name": "worker", "image": "wallaroo/app:1"}]},
                "status": {"phase": "Running"}})
    with open(path, "w") as f:
        json.dump(objs, f)


def status_of(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024.0
    return out


def main():
    binary = build_operator(release=True)
    seed = os.path.join(tempfile.mkdtemp(prefix="wallaroo-bench-"), "seed.json")
    fixtures(seed)
    t0 = time.monotonic()
    emu = Emulator(seeds=[seed])
    print(f"emulator seeded with {CONNECTORS} Connectors and {PODS} pods in {time.monotonic() - t0:.1f} s")
    # MALLOC_ARENA_MAX=2 as the image and the chart set it.
    env = {"RUST_LOG": "warn", "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
    if "--watch-namespaces" in sys.argv:
        # Every namespace named: one Connector watch and one pod watch per namespace instead of two cluster-wide.
        env["WATCH_NAMESPACES"] = ",".join(f"team-{n}" for n in range(NAMESPACES))
        print(f"watching {NAMESPACES} namespaces one by one")
    op = Operator(binary, emu, "bench", extra_env=env)
    try:
        start = time.monotonic()
        if not wait_for(op.ready, 120):
            print("operator not ready:\n" + op.tail())
            return 1

        def reconciled():
            items = emu.get("/apis/wallaroo.dev/v1alpha1/connectors")["items"]
            return sum(1 for c in items if c.get("status", {}).get("observedGeneration")) == CONNECTORS

        if not wait_for(reconciled, 600, interval=2):
            print("not every Connector was reconciled:\n" + op.tail())
            return 1
        print(f"all {CONNECTORS} Connectors reconciled {time.monotonic() - start:.1f} s after start")
        samples = []
        for _ in range(10):
            samples.append(status_of(op.proc.pid))
            time.sleep(1)
        rss = max(s["VmRSS"] for s in samples)
        hwm = samples[-1]["VmHWM"]
        m = op.metrics()
        reconciles = next((l.split()[-1] for l in m.splitlines() if l.startswith("wallaroo_operator_reconcile_total")), "?")
        last = samples[-1]
        print(f"operator RSS steady max {rss:.1f} MiB (anonymous {last['RssAnon']:.1f}, file-backed "
              f"{last['RssFile']:.1f}), peak (VmHWM) {hwm:.1f} MiB, reconciles {reconciles}")
        print(f"RESULT rss_mib={rss:.1f} hwm_mib={hwm:.1f}")
        return 0
    finally:
        op.terminate(10)
        emu.stop()


if __name__ == "__main__":
    sys.exit(main())
