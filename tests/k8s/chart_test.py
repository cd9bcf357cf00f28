#!/usr/bin/env python3
"""The Helm chart, rendered and linted with the real Helm engine (helm-python-sdk, no helm CLI), every manifest and
the CRD validated with kubernetes-validate --strict, and the example Connectors validated against the CRD schema."""
import glob
import json
import os
import re
import subprocess
import sys

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from k8slib import ROOT, Results, build_operator  # noqa: E402

CHART = os.path.join(ROOT, "charts", "wallaroo-connectors")
KUBE_VERSION = "1.30.0"
# Kinds from other projects' CRDs; kubernetes-validate has no schema for them.
FOREIGN = {"Certificate", "Issuer", "ServiceMonitor", "PodMonitor"}

SCENARIOS = {
    "defaults": {},
    "cert-manager, ServiceMonitor, PodMonitor, one namespace": {
        "certs": {"mode": "cert-manager"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                    "podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "watchNamespaces": ["apps"],
    },
    "two namespaces, Ignore, no leader election, regular sidecars": {
        "watchNamespaces": ["apps", "etl"],
        "webhook": {"failurePolicy": "Ignore"},
        "leaderElection": False,
        "sidecar": {"mode": "never", "image": {"repository": "example.com/wc", "tag": "dev"},
                    "resources": {"limits": {"cpu": "200m", "memory": ""}}},
        "certs": {"mode": "cert-manager", "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}},
    },
}


def docs_of(rendered):
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                out.append((path, d))
    return out


def find(docs, kind, name_part=""):
    return [d for _, d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]


def validate_k8s(r, label, doc):
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        r.check(f"{label}: {doc['kind']}/{doc['metadata']['name']} valid (strict)", True)
    except kubernetes_validate.SchemaNotFoundError:
        if doc["kind"] in FOREIGN:
            r.skip(f"{label}: {doc['kind']}/{doc['metadata']['name']}", "no upstream schema for this CRD kind")
        else:
            r.check(f"{label}: {doc['kind']} has a schema", False)
    except kubernetes_validate.ValidationError as e:
        r.check(f"{label}: {doc['kind']}/{doc['metadata']['name']} valid (strict)", False,
                f"{'.'.join(map(str, e.path))}: {e.message}")


def main():
    r = Results("chart")
    chart = helm.Chart.load(CHART)
    r.check("Chart loads", chart.name == "wallaroo-connectors")

    for label, values in SCENARIOS.items():
        report = helm.lint(CHART, values, strict=True, namespace="wallaroo-system", kube_version="v" + KUBE_VERSION)
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
        r.check(f"helm lint --strict ({label})", not problems, problems)
        rendered = chart.render(values, name="wallaroo-connectors", namespace="wallaroo-system", is_install=True)
        docs = docs_of(rendered)
        r.check(f"renders ({label})", len(docs) >= 8, [d["kind"] for _, d in docs])
        for _, d in docs:
            validate_k8s(r, label, d)

        hooks = find(docs, "MutatingWebhookConfiguration")[0]["webhooks"][0]
        r.check(f"webhook only sees opted-in pods ({label})",
                hooks["objectSelector"] == {"matchLabels": {"wallaroo.dev/inject": "true"}}
                and hooks["rules"][0]["operations"] == ["CREATE"] and hooks["rules"][0]["resources"] == ["pods"])
        want_policy = values.get("webhook", {}).get("failurePolicy", "Fail")
        r.check(f"failurePolicy {want_policy} ({label})", hooks["failurePolicy"] == want_policy)
        r.check(f"reinvocationPolicy IfNeeded, sideEffects NoneOnDryRun ({label})",
                hooks["reinvocationPolicy"] == "IfNeeded" and hooks["sideEffects"] == "NoneOnDryRun")
        dep = find(docs, "Deployment")[0]
        r.check(f"2 replicas and a PDB ({label})",
                dep["spec"]["replicas"] == 2 and find(docs, "PodDisruptionBudget"))
        ctr = dep["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in ctr["env"]}
        r.check(f"non-root, read-only root filesystem ({label})",
                dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
                and ctr["securityContext"]["readOnlyRootFilesystem"])
        cert_mode = values.get("certs", {}).get("mode", "self-signed")
        r.check(f"cert mode wiring ({label})",
                (env["CERT_MODE"] == "files") == (cert_mode == "cert-manager")
                and bool(find(docs, "Certificate")) == (cert_mode == "cert-manager")
                and ("cert-manager.io/inject-ca-from" in find(docs, "MutatingWebhookConfiguration")[0]["metadata"]
                     .get("annotations", {})) == (cert_mode == "cert-manager"))
        ns = values.get("watchNamespaces", [])
        watch_bindings = [d for _, d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
                          and d["roleRef"]["name"].endswith("-watch")]
        if ns:
            r.check(f"watched namespaces: watch rules bound by one RoleBinding in each, nothing cluster-wide ({label})",
                    [d["kind"] for d in watch_bindings] == ["RoleBinding"] * len(ns)
                    and sorted(d["metadata"]["namespace"] for d in watch_bindings) == sorted(ns), watch_bindings)
        else:
            r.check(f"watch rules bound cluster-wide ({label})", [d["kind"] for d in watch_bindings] == ["ClusterRoleBinding"])
        rules = [rule for _, d in docs if d["kind"] in ("Role", "ClusterRole") for rule in d["rules"]]
        r.check(f"RBAC has no wildcards ({label})",
                all("*" not in rule.get("verbs", []) + rule.get("resources", []) + rule.get("apiGroups", []) for rule in rules))
        r.check(f"RBAC never lists or watches Secrets ({label})",
                not any("secrets" in rule["resources"] and set(rule["verbs"]) & {"list", "watch"} for rule in rules))
        r.check(f"ServiceMonitor toggle ({label})",
                bool(find(docs, "ServiceMonitor")) == values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False))
        pm = find(docs, "PodMonitor")
        r.check(f"PodMonitor toggle ({label})",
                bool(pm) == values.get("metrics", {}).get("podMonitor", {}).get("enabled", False))
        if pm:
            spec = pm[0]["spec"]
            keep = [x for x in spec["podMetricsEndpoints"][0]["relabelings"] if x["action"] == "keep"]
            r.check(f"PodMonitor scrapes opted-in pods' wcm-* ports in the watched namespaces ({label})",
                    spec["selector"]["matchLabels"] == {"wallaroo.dev/inject": "true"}
                    and keep and keep[0]["regex"] == "wcm-.+"
                    and spec["namespaceSelector"] == ({"matchNames": ns} if ns else {"any": True}), spec)
        if ns:
            sel = hooks["namespaceSelector"]["matchExpressions"]
            r.check(f"webhook restricted to watched namespaces ({label})",
                    any(e["operator"] == "In" and e["values"] == ns for e in sel))

        binary = os.environ.get("_WC_OPERATOR_BIN")
        if binary:
            help_text = subprocess.run([binary, "run", "--help"], capture_output=True, text=True).stdout
            accepted = set(re.findall(r"env: ([A-Z_]+)=", help_text))
            unknown = [k for k in env if k not in accepted | {"RUST_LOG", "MALLOC_ARENA_MAX"}]
            r.check(f"every env var the chart sets is an operator setting ({label})", not unknown, unknown)

    # values.schema.json rejects bad values.
    for bad in ({"certs": {"mode": "bogus"}}, {"sidecar": {"mode": "sometimes"}}, {"webhook": {"failurePolicy": "Maybe"}},
                {"replicaCount": 0}, {"unknownKey": 1}, {"sidecar": {"resources": {"requests": {"cpu": "lots"}}}}):
        try:
            chart.validate_schema(bad)
            r.check(f"schema rejects {bad}", False)
        except helm.HelmError:
            r.check(f"schema rejects {json.dumps(bad)}", True)

    # The CRD: identical in chart and crds/, valid as a CRD.
    crd_path = os.path.join(CHART, "crds", "connector.yaml")
    with open(crd_path) as f, open(os.path.join(ROOT, "crds", "connector.yaml")) as g:
        chart_crd, crd_text = f.read(), g.read()
    r.check("chart ships crds/connector.yaml unchanged", chart_crd == crd_text)
    crd = yaml.safe_load(crd_text)
    validate_k8s(r, "crd", crd)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    # Example Connectors (written with the examples) and our fixtures validate against the CRD schema.
    patterns = ["examples/**/connector*.yaml", "examples/**/*.connector.yaml", "operator/tests/fixtures/**/*connectors.yaml"]
    files = sorted({p for pat in patterns for p in glob.glob(os.path.join(ROOT, pat), recursive=True)})
    validator = jsonschema.Draft7Validator(schema)
    seen = 0
    for path in files:
        for d in yaml.safe_load_all(open(path)):
            if not d or d.get("kind") != "Connector":
                continue
            seen += 1
            errors = sorted(validator.iter_errors(d), key=lambda e: list(e.path))
            r.check(f"{os.path.relpath(path, ROOT)}: Connector {d['metadata']['name']} matches the CRD schema",
                    not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:3]])
    if not any(p.startswith(os.path.join(ROOT, "examples")) for p in files):
        r.skip("example Connectors", "none under examples/ yet")
    r.check("at least one Connector validated against the schema", seen > 0)
    bad = {"apiVersion": "wallaroo.dev/v1alpha1", "kind": "Connector", "metadata": {"name": "x"},
           "spec": {"connectorName": "x", "source": {"udp": {"port": "not-a-port"}}}}
    r.check("CRD schema rejects a wrongly typed field", any(True for _ in validator.iter_errors(bad)))
    return r.report()


if __name__ == "__main__":
    sys.exit(main())
