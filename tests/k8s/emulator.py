#!/usr/bin/env python3
"""In-memory Kubernetes API emulator for the operator's end-to-end tests. TEST TOOLING, not a Kubernetes.

Why our own: PyPI's kmock 0.8 emulator keeps objects as plain dicts without resourceVersions, label selectors,
status subresources or JSON patch, and its watch ignores resourceVersion, so kube-rs watchers, finalizers and
optimistic concurrency cannot be exercised against it. This emulator implements exactly the API semantics the
operator relies on:

* typed paths for core and grouped resources, namespaced and cluster-scoped, with /status subresources
* resourceVersion (one global counter), uid, generation (bumped on spec changes), creationTimestamp, generateName
* GET / LIST (labelSelector, fieldSelector=metadata.name, limit/continue paging, `kind: XList`) / WATCH (from a resourceVersion, replaying
  history, 410 Gone when too old, timeoutSeconds, JSON content type, selector-aware ADDED/DELETED transitions)
* POST (AlreadyExists), PUT (Conflict on stale resourceVersion), PATCH (merge, strategic-as-merge, JSON patch with
  `test`), DELETE (finalizers -> deletionTimestamp; removal when the last finalizer goes)
* metadata-only requests (Accept: ...;as=PartialObjectMetadata[List]) as kube-rs sends for PartialObjectMeta<K>
* /version (configurable), Status errors with reason and code
* GET /_emulator/requests: every request's method and path so far (test hook, not a Kubernetes API)
* for kubectl: legacy discovery (/api, /apis, /api/v1, /apis/<group>/<version>, short names and categories from
  stored CRDs) and server-side printing (`as=Table`, a stored CRD's additionalPrinterColumns evaluated on the
  objects)

Run: python3 emulator.py --port 0 --port-file /tmp/port [--seed objects.yaml] [--version 1.30]
"""
import argparse
import copy
import datetime
import json
import random
import re
import string
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jsonpatch
import yaml

# plural -> (group, version, kind, namespaced, has_status)
RESOURCES = {
    ("", "pods"): ("", "v1", "Pod", True, True),
    ("", "secrets"): ("", "v1", "Secret", True, False),
    ("", "configmaps"): ("", "v1", "ConfigMap", True, False),
    ("", "services"): ("", "v1", "Service", True, True),
    ("", "namespaces"): ("", "v1", "Namespace", False, True),
    ("", "events"): ("", "v1", "Event", True, False),
    ("apps", "deployments"): ("apps", "v1", "Deployment", True, True),
    ("apps", "replicasets"): ("apps", "v1", "ReplicaSet", True, True),
    ("apps", "statefulsets"): ("apps", "v1", "StatefulSet", True, True),
    ("apps", "daemonsets"): ("apps", "v1", "DaemonSet", True, True),
    ("coordination.k8s.io", "leases"): ("coordination.k8s.io", "v1", "Lease", True, False),
    ("events.k8s.io", "events"): ("events.k8s.io", "v1", "Event", True, False),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"):
        ("admissionregistration.k8s.io", "v1", "MutatingWebhookConfiguration", False, False),
    ("apiextensions.k8s.io", "customresourcedefinitions"):
        ("apiextensions.k8s.io", "v1", "CustomResourceDefinition", False, True),
    ("wallaroo.dev", "connectors"): ("wallaroo.dev", "v1alpha1", "Connector", True, True),
}
KIND_TO_PLURAL = {(g, k): p for (g, p), (_, _, k, _, _) in RESOURCES.items()}
HISTORY = 200_000


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code, reason, message):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self):
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


SEL_RE = re.compile(r"^\s*(!?)([A-Za-z0-9_.\-/]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9_.\-]*)|\s+(in|notin)\s+\(([^)]*)\))?\s*$")


def split_selector(sel):
    parts, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def parse_selector(sel):
    reqs = []
    for part in split_selector(sel or ""):
        m = SEL_RE.match(part)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        neg, key, op, val, setop, vals = m.groups()
        if setop:
            reqs.append((key, setop, {v.strip() for v in vals.split(",") if v.strip()}))
        elif op:
            reqs.append((key, "!=" if op == "!=" else "=", val))
        else:
            reqs.append((key, "!" if neg else "exists", None))
    return reqs


def selector_matches(reqs, labels):
    labels = labels or {}
    for key, op, val in reqs:
        have = labels.get(key)
        if op == "=" and have != val:
            return False
        if op == "!=" and have == val:
            return False
        if op == "in" and have not in val:
            return False
        if op == "notin" and have in val:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!" and key in labels:
            return False
    return True


class Store:
    def __init__(self, version):
        self.lock = threading.Condition()
        self.objects = {}  # (group, plural, ns, name) -> obj
        self.rv = 1
        self.events = []  # (rv, group, plural, type, obj, old)
        self.first_rv = 1
        self.version = version
        # (method, path, watch?) of every API request, for tests that check which calls a client makes.
        self.requests = []

    def _bump(self):
        self.rv += 1
        return str(self.rv)

    def _record(self, group, plural, type_, obj, old):
        self.events.append((self.rv, group, plural, type_, copy.deepcopy(obj), old))
        if len(self.events) > HISTORY:
            drop = len(self.events) - HISTORY
            self.first_rv = self.events[drop][0]
            del self.events[:drop]
        self.lock.notify_all()

    def get(self, group, plural, ns, name):
        obj = self.objects.get((group, plural, ns, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{plural}.{group or "core"} "{name}" not found')
        return obj

    def create(self, group, plural, ns, body):
        g, v, kind, namespaced, _ = RESOURCES[(group, plural)]
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if namespaced:
            meta["namespace"] = ns
        key = (group, plural, ns if namespaced else None, name)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{plural}.{group or "core"} "{name}" already exists')
        body["apiVersion"] = f"{g}/{v}" if g else v
        body["kind"] = kind
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        meta["resourceVersion"] = self._bump()
        self.objects[key] = body
        self._record(group, plural, "ADDED", body, None)
        return body

    def _store_update(self, group, plural, key, old, new):
        _, _, _, _, has_status = RESOURCES[(group, plural)]
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        for f in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
            if f in old["metadata"]:
                new["metadata"][f] = old["metadata"][f]
        if new == old:
            return old
        spec_of = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status", "apiVersion", "kind")}
        new["metadata"]["generation"] = old["metadata"].get("generation", 1) + (1 if spec_of(new) != spec_of(old) else 0)
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            meta["resourceVersion"] = self._bump()
            del self.objects[key]
            self._record(group, plural, "DELETED", new, old)
            return new
        meta["resourceVersion"] = self._bump()
        self.objects[key] = new
        self._record(group, plural, "MODIFIED", new, old)
        return new

    def update(self, group, plural, ns, name, sub, body, patch_type=None):
        _, _, _, namespaced, has_status = RESOURCES[(group, plural)]
        key = (group, plural, ns if namespaced else None, name)
        old = self.get(*key)
        if patch_type is None:  # PUT
            want_rv = body.get("metadata", {}).get("resourceVersion")
            if want_rv and want_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": '
                               "the object has been modified; please apply your changes to the latest version and try again")
            new = copy.deepcopy(body)
        elif patch_type == "json":
            # Kubernetes (evanphx/json-patch) treats `test` of a missing member against null as a match.
            ops = []
            for op in body:
                if op.get("op") == "test" and op.get("value") is None:
                    try:
                        jsonpatch.JsonPointer(op["path"]).resolve(old)
                    except jsonpatch.JsonPointerException:
                        continue
                ops.append(op)
            try:
                new = jsonpatch.apply_patch(old, ops)
            except (jsonpatch.JsonPatchConflict, jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {e}")
        else:
            new = merge_patch(old, body)
        new.setdefault("metadata", {})
        if sub == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            merged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            new = merged
        elif has_status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        return self._store_update(group, plural, key, old, new)

    def delete(self, group, plural, ns, name):
        _, _, _, namespaced, _ = RESOURCES[(group, plural)]
        key = (group, plural, ns if namespaced else None, name)
        old = self.get(*key)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["metadata"]["resourceVersion"] = self._bump()
            self.objects[key] = new
            self._record(group, plural, "MODIFIED", new, old)
            return new
        old["metadata"]["resourceVersion"] = self._bump()
        del self.objects[key]
        self._record(group, plural, "DELETED", old, old)
        return old


SHORT_NAMES = {("", "pods"): ["po"], ("", "secrets"): [], ("", "services"): ["svc"], ("", "namespaces"): ["ns"],
               ("", "configmaps"): ["cm"], ("", "events"): ["ev"], ("apps", "deployments"): ["deploy"],
               ("apps", "replicasets"): ["rs"], ("apps", "statefulsets"): ["sts"], ("apps", "daemonsets"): ["ds"],
               ("apiextensions.k8s.io", "customresourcedefinitions"): ["crd", "crds"]}


def crd_for(store, group, plural):
    """The stored CustomResourceDefinition of a custom resource, if one was created (kubectl reads its columns)."""
    return store.objects.get(("apiextensions.k8s.io", "customresourcedefinitions", None, f"{plural}.{group}"))


def discovery(store, path):
    """Legacy (non-aggregated) discovery documents, as kubectl falls back to them: /api, /apis, /api/v1, /apis/g/v."""
    parts = [p for p in path.split("/") if p]
    if not (parts in (["api"], ["api", "v1"]) or (parts[:1] == ["apis"] and len(parts) <= 3)):
        return None  # an object or collection path
    gvs = {}
    for (group, plural), (g, v, kind, namespaced, has_status) in RESOURCES.items():
        gvs.setdefault((g, v), []).append((group, plural, kind, namespaced, has_status))
    if path == "/api":
        return {"kind": "APIVersions", "apiVersion": "v1", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
    if path == "/apis":
        groups = [{"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                   "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
                  for (g, v) in sorted(gvs) if g]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    if parts == ["api", "v1"]:
        gv = ("", "v1")
    elif len(parts) == 3 and parts[0] == "apis" and (parts[1], parts[2]) in gvs:
        gv = (parts[1], parts[2])
    elif len(parts) == 2 and parts[0] == "apis" and any(g == parts[1] for g, _ in gvs):
        v = next(v for g, v in gvs if g == parts[1])
        return {"kind": "APIGroup", "apiVersion": "v1", "name": parts[1],
                "versions": [{"groupVersion": f"{parts[1]}/{v}", "version": v}],
                "preferredVersion": {"groupVersion": f"{parts[1]}/{v}", "version": v}}
    else:
        return None
    verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
    resources = []
    for group, plural, kind, namespaced, has_status in sorted(gvs[gv], key=lambda r: r[1]):
        names = crd_for(store, group, plural)
        crd_names = (names or {}).get("spec", {}).get("names", {})
        resources.append({"name": plural, "singularName": crd_names.get("singular", kind.lower()),
                          "namespaced": namespaced, "kind": kind, "verbs": verbs,
                          "shortNames": crd_names.get("shortNames", SHORT_NAMES.get((group, plural), [])),
                          **({"categories": crd_names["categories"]} if crd_names.get("categories") else {})})
        if has_status:
            resources.append({"name": f"{plural}/status", "singularName": "", "namespaced": namespaced, "kind": kind,
                              "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{gv[0]}/{gv[1]}" if gv[0] else gv[1], "resources": resources}


JSONPATH_FILTER = re.compile(r'^(\w+)\[\?\(@\.(\w+)==["\']([^"\']*)["\']\)\]$')


def jsonpath(obj, expr):
    """The subset of JSONPath that printer columns use: `.a.b`, and `.a[?(@.k=="v")].b`."""
    cur = [obj]
    for part in [p for p in re.split(r"\.(?![^\[]*\])", expr) if p]:
        m = JSONPATH_FILTER.match(part)
        nxt = []
        for c in cur:
            if not isinstance(c, dict):
                continue
            if m:
                nxt += [x for x in c.get(m.group(1)) or [] if isinstance(x, dict) and str(x.get(m.group(2))) == m.group(3)]
            elif part in c:
                nxt.append(c[part])
        cur = nxt
    return cur[0] if cur else None


def age(ts):
    try:
        then = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return "<unknown>"
    secs = int((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= 2 * size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def as_table(store, group, plural, objs, list_meta):
    """meta.k8s.io/v1 Table as the API server renders it for `kubectl get`: a CRD's additionalPrinterColumns, or
    NAME and AGE."""
    crd = crd_for(store, group, plural)
    cols = []
    if crd:
        for ver in crd["spec"].get("versions", []):
            if ver.get("served"):
                cols = ver.get("additionalPrinterColumns", [])
                break
    defs = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
    defs += [{"name": c["name"], "type": c["type"], "format": "", "description": c.get("description", ""),
              "priority": c.get("priority", 0)} for c in cols] or [
        {"name": "Age", "type": "date", "format": "", "description": "", "priority": 0}]
    rows = []
    for o in objs:
        cells = [o["metadata"]["name"]]
        for c in cols or [{"type": "date", "jsonPath": ".metadata.creationTimestamp"}]:
            v = jsonpath(o, c["jsonPath"])
            cells.append(age(v) if c["type"] == "date" else ("<none>" if v is None else v))
        rows.append({"cells": cells, "object": as_metadata(o)})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "columnDefinitions": defs,
            "rows": rows}


def as_metadata(obj):
    return {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]}


def parse_path(path):
    """-> (group, plural, namespace, name, subresource) or None."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    ns = None
    if len(rest) >= 3 and rest[0] == "namespaces" and (group, rest[2]) in RESOURCES:
        ns, rest = rest[1], rest[2:]
    if not rest:
        return None
    plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
    if (group, plural) not in RESOURCES:
        return None
    return group, plural, ns, name, sub


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: Store = None
    quiet = True

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write("emulator: " + fmt % args + "\n")

    def _send(self, code, body, content_type="application/json"):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        ct = self.headers.get("Content-Type", "")
        return yaml.safe_load(raw) if "yaml" in ct else json.loads(raw)

    def _dispatch(self, method):
        try:
            self._handle(method)
        except ApiError as e:
            self._send(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # an emulator bug must surface as a 500, not a hung client
            self._send(500, ApiError(500, "InternalError", f"emulator: {e!r}").status())

    do_GET = lambda self: self._dispatch("GET")
    do_POST = lambda self: self._dispatch("POST")
    do_PUT = lambda self: self._dispatch("PUT")
    do_PATCH = lambda self: self._dispatch("PATCH")
    do_DELETE = lambda self: self._dispatch("DELETE")

    def _handle(self, method):
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        st = self.store
        if url.path == "/_emulator/requests":
            with st.lock:
                return self._send(200, [list(r) for r in st.requests])
        with st.lock:
            st.requests.append((method, url.path, q.get("watch") in ("1", "true")))
        if url.path == "/version":
            major, minor = st.version.split(".")[:2]
            return self._send(200, {"major": major, "minor": minor, "gitVersion": f"v{major}.{minor}.0",
                                    "platform": "linux/amd64"})
        if url.path in ("/healthz", "/readyz", "/livez"):
            return self._send(200, "ok")
        if method == "GET":
            with st.lock:
                doc = discovery(st, url.path.rstrip("/"))
            if doc is not None:
                return self._send(200, doc)
        parsed = parse_path(url.path)
        if parsed is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({url.path})")
        group, plural, ns, name, sub = parsed
        g, v, kind, namespaced, _ = RESOURCES[(group, plural)]
        accept = self.headers.get("Accept", "")
        meta_only = "as=PartialObjectMetadata" in accept
        table = "as=Table" in accept
        if method == "GET" and name is None and q.get("watch") in ("1", "true"):
            return self._watch(group, plural, ns if namespaced else None, q, meta_only)
        with st.lock:
            if method == "GET" and name is None:
                reqs = parse_selector(q.get("labelSelector", ""))
                field_name = None
                fs = q.get("fieldSelector", "")
                if fs.startswith("metadata.name="):
                    field_name = fs.split("=", 1)[1]
                items = [o for (og, op, ons, oname), o in st.objects.items()
                         if og == group and op == plural and (ns is None or ons == ns)
                         and selector_matches(reqs, o["metadata"].get("labels"))
                         and (field_name is None or oname == field_name)]
                # Paging as the API server does it: `limit` and an opaque `continue` token (here: the offset and
                # the list's resourceVersion, so every page of one list answers from the same version).
                items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
                offset, list_rv = 0, str(st.rv)
                if q.get("continue"):
                    offset_s, list_rv = q["continue"].split(":", 1)
                    offset = int(offset_s)
                limit = int(q.get("limit") or 0)
                page = items[offset:offset + limit] if limit else items[offset:]
                meta = {"resourceVersion": list_rv}
                if limit and offset + limit < len(items):
                    meta["continue"] = f"{offset + limit}:{list_rv}"
                    meta["remainingItemCount"] = len(items) - offset - limit
                if table:
                    return self._send(200, as_table(st, group, plural, page, meta))
                page = [as_metadata(o) if meta_only else o for o in page]
                out = {"apiVersion": "meta.k8s.io/v1" if meta_only else (f"{g}/{v}" if g else v),
                       "kind": "PartialObjectMetadataList" if meta_only else f"{kind}List",
                       "metadata": meta, "items": page}
                return self._send(200, out)
            key_ns = ns if namespaced else None
            if method == "GET":
                obj = st.get(group, plural, key_ns, name)
                if table:
                    return self._send(200, as_table(st, group, plural, [obj], {"resourceVersion": str(st.rv)}))
                return self._send(200, as_metadata(obj) if meta_only else obj)
            body = self._body()
            if method == "POST" and name is None:
                if ns is None and namespaced:
                    ns = (body.get("metadata") or {}).get("namespace") or "default"
                return self._send(201, st.create(group, plural, ns if namespaced else None, body))
            if method == "PUT":
                return self._send(200, st.update(group, plural, key_ns, name, sub, body))
            if method == "PATCH":
                ct = self.headers.get("Content-Type", "")
                ptype = "json" if "json-patch" in ct else "merge"
                return self._send(200, st.update(group, plural, key_ns, name, sub, body, ptype))
            if method == "DELETE":
                return self._send(200, st.delete(group, plural, key_ns, name))
        raise ApiError(405, "MethodNotAllowed", f"{method} not allowed on {url.path}")

    def _chunk(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, group, plural, ns, q, meta_only):
        st = self.store
        reqs = parse_selector(q.get("labelSelector", ""))
        timeout = min(float(q.get("timeoutSeconds") or 300), 300)
        deadline = time.monotonic() + timeout
        rv = q.get("resourceVersion", "")
        view = (lambda o: as_metadata(o)) if meta_only else (lambda o: o)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with st.lock:
            if rv in ("", "0"):
                pos_rv = st.rv
                initial = [o for (og, op, ons, _), o in st.objects.items()
                           if og == group and op == plural and (ns is None or ons == ns)
                           and selector_matches(reqs, o["metadata"].get("labels"))]
                pending = [{"type": "ADDED", "object": view(copy.deepcopy(o))} for o in initial]
            else:
                pos_rv = int(rv)
                pending = []
                if pos_rv + 1 < st.first_rv:
                    pending = [{"type": "ERROR", "object": ApiError(410, "Expired", "too old resource version").status()}]
                    deadline = 0
        try:
            for ev in pending:
                self._chunk(ev)
            while time.monotonic() < deadline:
                with st.lock:
                    batch = [e for e in st.events if e[0] > pos_rv]
                    if not batch:
                        st.lock.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                        batch = [e for e in st.events if e[0] > pos_rv]
                out = []
                for erv, eg, ep, etype, obj, old in batch:
                    pos_rv = max(pos_rv, erv)
                    if eg != group or ep != plural or (ns is not None and obj["metadata"].get("namespace") != ns):
                        continue
                    now_ok = selector_matches(reqs, obj["metadata"].get("labels"))
                    was_ok = old is not None and selector_matches(reqs, old["metadata"].get("labels"))
                    if etype == "DELETED":
                        if was_ok or now_ok:
                            out.append({"type": "DELETED", "object": view(obj)})
                    elif now_ok:
                        out.append({"type": "ADDED" if (etype == "ADDED" or not was_ok) else "MODIFIED", "object": view(obj)})
                    elif was_ok:
                        out.append({"type": "DELETED", "object": view(obj)})
                for ev in out:
                    self._chunk(ev)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True


def seed(store, path):
    with open(path) as f:
        # JSON (a list of objects) loads much faster than YAML for the large benchmark fixtures.
        docs = json.load(f) if path.endswith(".json") else [d for d in yaml.safe_load_all(f) if d]
    with store.lock:
        for d in docs:
            seed_one(store, d)


def seed_one(store, d):
    if True:
        group = d["apiVersion"].split("/")[0] if "/" in d["apiVersion"] else ""
        plural = KIND_TO_PLURAL[(group, d["kind"])]
        ns = d.get("metadata", {}).get("namespace", "default") if RESOURCES[(group, plural)][3] else None
        status = d.pop("status", None)
        obj = store.create(group, plural, ns, d)
        if status is not None:
            obj["status"] = status


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--seed", action="append", default=[])
    ap.add_argument("--version", default="1.30")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    store = Store(args.version)
    for s in args.seed:
        seed(store, s)
    Handler.store = store
    Handler.quiet = not args.verbose
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(port))
        import os
        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"emulator listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
