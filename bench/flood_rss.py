#!/usr/bin/env python3
"""Resident memory of the sidecar under the hostile-peer floods of docs/security.md, with the limits in force.

Each scenario starts the `wallaroo-connector` binary, measures its RSS idle (the baseline, same run), applies the
flood, and reports VmRSS and VmHWM (peak) from /proc/<pid>/status plus the ratio to the baseline.

  python3 bench/flood_rss.py [--bin PATH]   (default: $CARGO_TARGET_DIR or ~/.cache/wallaroo-connectors/target,
                                             release binary if built, else debug)

Scenarios (numbers from the hardening issue):
  sink-flood   40 peers without the cookie each announce a 16 MiB frame, plus 800 silent connections
  admin-flood  300 half-sent HTTP requests on the admin (metrics) port; /livez must still answer
  endless-line a `lines` file source reading a 200 MiB file with no newline
Everything stays on 127.0.0.1, bounded in count and time.
"""
import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time


def find_bin(arg):
    if arg:
        return arg
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/wallaroo-connectors/target"))
    for profile in ("release", "debug"):
        p = os.path.join(target, profile, "wallaroo-connector")
        if os.path.exists(p):
            return p
    sys.exit("build the sidecar first: cargo build -p wallaroo-connector [--release]")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def start(binary, manifest, admin_port, tmp):
    path = os.path.join(tmp, "c.yaml")
    with open(path, "w") as f:
        f.write(manifest)
    log = open(os.path.join(tmp, "log"), "w")
    return subprocess.Popen([binary, "run", "-f", path, "--admin-addr", f"127.0.0.1:{admin_port}"],
                            stdout=subprocess.DEVNULL, stderr=log,
                            # A backtrace symbolized from a debug binary at exit would dominate the peak.
                            env={**os.environ, "RUST_LOG": "warn", "RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0"})


def report(name, base, after, extra=""):
    print(f"| {name} | {base['VmRSS']:.1f} | {after['VmRSS']:.1f} | {after['VmHWM']:.1f} | "
          f"{after['VmHWM'] / base['VmRSS']:.2f} | {after['fds']} | {extra} |", flush=True)


def sink_flood(binary, tmp):
    port, admin = free_port(), free_port()
    p = start(binary, f"""apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: flood}}
spec:
  connectorName: flood
  worker: {{port: {port}, handshakeTimeoutSeconds: 10, maxConnections: 64}}
  metricsPort: {admin}
  sink:
    file: {{dir: "{tmp}/out"}}
""", admin, tmp)
    try:
        assert wait_port(port), "sink did not listen"
        time.sleep(0.5)
        base = status(p.pid)
        held = []
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(struct.pack(">I", 16 * 1024 * 1024) + b"\x00" + b"\x00" * 1000)
            held.append(s)
        for _ in range(800):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                pass
        time.sleep(3)
        after = status(p.pid)
        # A real worker still gets in once the handshake timeout has cleared the silent ones.
        for s in held:
            s.close()
        report("sink-flood: 40 × 16 MiB headers + 800 silent", base, after, "cap 64, handshake 10 s")
    finally:
        p.kill()
        p.wait()


def admin_flood(binary, tmp):
    admin = free_port()
    port = free_port()
    p = start(binary, f"""apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: admin}}
spec:
  connectorName: admin
  worker: {{port: {port}}}
  metricsPort: {admin}
  sink:
    file: {{dir: "{tmp}/out2"}}
""", admin, tmp)
    try:
        assert wait_port(admin), "admin port did not listen"
        time.sleep(0.5)
        base = status(p.pid)
        held = []
        for _ in range(300):
            try:
                s = socket.create_connection(("127.0.0.1", admin), timeout=2)
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
                held.append(s)
            except OSError:
                pass
        time.sleep(3)
        after = status(p.pid)
        t0 = time.time()
        ok = False
        while time.time() - t0 < 30 and not ok:
            try:
                c = socket.create_connection(("127.0.0.1", admin), timeout=15)
                c.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                ok = c.recv(64).startswith(b"HTTP/1.1 200")
                c.close()
            except OSError:
                time.sleep(0.2)
        for s in held:
            s.close()
        report("admin-flood: 300 half-sent requests", base, after,
               f"/livez answered after {time.time() - t0:.1f} s" if ok else "/livez did not answer")
    finally:
        p.kill()
        p.wait()


def endless_line(binary, tmp):
    port, admin = free_port(), free_port()
    data = os.path.join(tmp, "endless.txt")
    with open(data, "wb") as f:
        chunk = b"x" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
    # The simulated worker grants the stream, so the source really reads the endless line.
    srv = subprocess.Popen([binary, "sim-worker", "--source-listen", f"127.0.0.1:{port}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_port(port), "sim-worker did not listen"
    p = start(binary, f"""apiVersion: wallaroo.dev/v1alpha1
kind: Connector
metadata: {{name: endless}}
spec:
  connectorName: endless
  worker: {{port: {port}}}
  metricsPort: {admin}
  source:
    file: {{path: "{data}", format: lines}}
""", admin, tmp)
    try:
        assert wait_port(admin), "admin port did not listen"
        base = status(p.pid)
        peak = base
        t0 = time.time()
        while time.time() - t0 < 15 and p.poll() is None:
            peak = status(p.pid)
            time.sleep(0.1)
        code = p.poll()
        report("endless-line: 200 MiB without a newline", base, peak,
               f"exited {code} after {time.time() - t0:.1f} s" if code is not None else "still running after 15 s")
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        srv.kill()
        srv.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin")
    binary = find_bin(ap.parse_args().bin)
    print(f"binary: {binary}")
    print("| scenario | idle RSS MiB (baseline) | RSS after MiB | peak RSS MiB | peak / baseline | open fds | notes |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        sink_flood(binary, tmp)
        admin_flood(binary, tmp)
        endless_line(binary, tmp)


if __name__ == "__main__":
    main()
