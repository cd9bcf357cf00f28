"""Helpers shared by the operator's emulator-based tests and benchmarks (test tooling)."""
import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


class Results:
    """Counts checks; every check names what it verified so a failure reads as a sentence."""

    def __init__(self, suite):
        self.suite, self.passed, self.failed = suite, 0, 0

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"  ok    {self.suite}: {name}", flush=True)
        else:
            self.failed += 1
            print(f"  FAIL  {self.suite}: {name} {detail}", flush=True)
        return ok

    def skip(self, name, why):
        print(f"  skip  {self.suite}: {name} ({why})", flush=True)

    def report(self):
        print(f"RESULT {self.suite} passed={self.passed} failed={self.failed}", flush=True)
        return 0 if self.failed == 0 else 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=20.0, interval=0.1):
    """Polls pred until it returns something truthy; returns that value or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except Exception:
            v = None
        if v:
            return v
        time.sleep(interval)
    return None


class Emulator:
    def __init__(self, seeds=(), version="1.30", python=sys.executable):
        self.dir = tempfile.mkdtemp(prefix="wallaroo-emu-")
        port_file = os.path.join(self.dir, "port")
        args = [python, os.path.join(HERE, "emulator.py"), "--port-file", port_file, "--version", version]
        for s in seeds:
            args += ["--seed", s]
        self.proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        if not wait_for(lambda: os.path.exists(port_file), timeout=30):
            raise RuntimeError("emulator did not start")
        with open(port_file) as f:
            self.port = int(f.read())
        self.url = f"http://127.0.0.1:{self.port}"
        self.kubeconfig = os.path.join(self.dir, "kubeconfig")
        with open(self.kubeconfig, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters: [{{name: emu, cluster: {{server: "{self.url}"}}}}]
users: [{{name: emu, user: {{}}}}]
contexts: [{{name: emu, context: {{cluster: emu, user: emu, namespace: default}}}}]
current-context: emu
""")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def call(self, method, path, body=None, content_type="application/json"):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path):
        code, body = self.call("GET", path)
        return body if code == 200 else None

    def create(self, path, body):
        code, out = self.call("POST", path, body)
        if code != 201:
            raise RuntimeError(f"create {path}: {code} {out}")
        return out

    def merge(self, path, body):
        return self.call("PATCH", path, body, "application/merge-patch+json")

    def delete(self, path):
        return self.call("DELETE", path)


class Operator:
    def __init__(self, binary, emulator, name, extra_env=None, args=()):
        self.webhook_port, self.admin_port = free_port(), free_port()
        env = dict(os.environ)
        env.update({
            "KUBECONFIG": emulator.kubeconfig,
            "POD_NAMESPACE": "wallaroo-system",
            "POD_NAME": name,
            "WEBHOOK_ADDR": f"127.0.0.1:{self.webhook_port}",
            "ADMIN_ADDR": f"127.0.0.1:{self.admin_port}",
            "SIDECAR_IMAGE": "wallaroo/connectors:e2e",
            "RUST_LOG": env.get("RUST_LOG", "info,kube=warn"),
            "LOG_FORMAT": "text",
        })
        env.update(extra_env or {})
        self.log_path = os.path.join(emulator.dir, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, "run", *args], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def http(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def ready(self):
        return self.http("/readyz")[0] == 200

    def metrics(self):
        return self.http("/metrics")[1]

    def terminate(self, timeout=20):
        """SIGTERM, then the exit code (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def tail(self, n=30):
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class WebhookClient:
    """Keep-alive HTTPS client that trusts one CA and checks the Service DNS name, like the API server."""

    def __init__(self, port, ca_pem, server_name):
        self.port, self.server_name = port, server_name
        self.ctx = ssl.create_default_context(cadata=ca_pem)
        self.sock = None

    def _connect(self):
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.ctx.wrap_socket(raw, server_hostname=self.server_name)
        self.reader = self.sock.makefile("rb")

    def post(self, path, body):
        if self.sock is None:
            self._connect()
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.server_name}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        self.sock.sendall(head + data)
        status_line = self.reader.readline().decode()
        code = int(status_line.split()[1])
        length, chunked = 0, False
        while True:
            line = self.reader.readline().decode().strip()
            if not line:
                break
            k, v = line.split(":", 1)
            if k.lower() == "content-length":
                length = int(v)
            if k.lower() == "transfer-encoding" and "chunked" in v:
                chunked = True
        if chunked:
            out = b""
            while True:
                size = int(self.reader.readline().strip(), 16)
                if size == 0:
                    self.reader.readline()
                    break
                out += self.reader.read(size)
                self.reader.readline()
        else:
            out = self.reader.read(length)
        return code, out

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def admission_review(uid, pod, namespace="apps", operation="CREATE"):
    return {
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "oldObject": None, "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


def decode_patch(review):
    raw = review.get("response", {}).get("patch")
    return json.loads(base64.b64decode(raw)) if raw else None


def build_operator(release=False):
    """Builds the operator binary, unless WALLAROO_OPERATOR_BIN points at one."""
    explicit = os.environ.get("WALLAROO_OPERATOR_BIN")
    if explicit:
        return explicit
    cmd = ["cargo", "build", "-q", "-p", "wallaroo-connector-operator"] + (["--release"] if release else [])
    subprocess.run(cmd, cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "release" if release else "debug", "wallaroo-connector-operator")
