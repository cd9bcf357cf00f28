#!/usr/bin/env python3
"""The Dockerfile checked without a Docker engine (none runs on these machines).

What can break an image silently is a shared library: the runtime stage must install every library the binaries
link (other than glibc and libgcc, which debian:slim has), and the build stage the headers for them. This maps each
library the built binaries link (ldd) to its Debian package (dpkg -S) and checks both stages' package lists, plus
the image's shape: both binaries built, stripped and copied, a numeric non-root user, MALLOC_ARENA_MAX.
"""
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from k8slib import ROOT, Results  # noqa: E402

BASE = {"libc6", "libgcc-s1"}  # in debian:bookworm-slim already
DEV = {"libssl3": "libssl-dev", "zlib1g": "zlib1g-dev"}


def stages(text):
    text = re.sub(r"\\\n", " ", text)
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line.strip(), re.I)
        if m:
            cur = m.group(1)
            out[cur] = []
        elif cur:
            out[cur].append(line.strip())
    return out


def apt_packages(lines):
    pkgs = set()
    for line in lines:
        for m in re.finditer(r"apt-get install ([^&]*)", line):
            pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


def linked_packages(binary):
    libs = []
    for line in subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout.splitlines():
        m = re.search(r"=>\s+(\S+)", line)
        if m and m.group(1).startswith("/"):
            libs.append(m.group(1))
    pkgs = {}
    for lib in libs:
        real = os.path.realpath(lib)
        found = None
        for path in (lib, real, lib.replace("/lib/", "/usr/lib/"), real.replace("/usr/lib/", "/lib/")):
            p = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
            if p.returncode == 0:
                found = p.stdout.split(":")[0]
                break
        pkgs[lib] = found
    return pkgs


def main():
    r = Results("image")
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    st = stages(text)
    r.check("two stages: builder and runtime", set(st) == {"builder", "runtime"}, list(st))
    builder, runtime = apt_packages(st.get("builder", [])), apt_packages(st.get("runtime", []))
    build = " ".join(st.get("builder", []))
    r.check("builder builds both binaries, locked, release",
            re.search(r"cargo build --release --locked -p wallaroo-connector -p wallaroo-connector-operator", build))
    r.check("both binaries stripped and copied into the runtime image",
            "strip /out/wallaroo-connector /out/wallaroo-connector-operator" in build
            and any("COPY --from=builder /out/wallaroo-connector /out/wallaroo-connector-operator" in l
                    for l in st.get("runtime", [])))
    user = next((l.split()[1] for l in st.get("runtime", []) if l.startswith("USER ")), "")
    r.check("runs as a numeric non-root user", re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), user)
    r.check("MALLOC_ARENA_MAX set", any(l.startswith("ENV MALLOC_ARENA_MAX=") for l in st.get("runtime", [])))
    r.check("CA roots for TLS brokers", "ca-certificates" in runtime, runtime)

    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    subprocess.run(["cargo", "build", "-q", "-p", "wallaroo-connector", "-p", "wallaroo-connector-operator"],
                   cwd=ROOT, check=True)
    linked_by = {name: linked_packages(os.path.join(target, "debug", name))
                 for name in ("wallaroo-connector", "wallaroo-connector-operator")}
    for name, linked in linked_by.items():
        unknown = [lib for lib, pkg in linked.items() if pkg is None]
        r.check(f"{name}: every linked library belongs to a Debian package", not unknown, unknown)
        need = {pkg for pkg in linked.values() if pkg} - BASE
        r.check(f"{name}: runtime stage installs every linked library ({sorted(need)})", need <= runtime,
                sorted(need - runtime))
        headers = {DEV.get(p, p + " (unknown -dev package)") for p in need}
        r.check(f"{name}: builder installs their headers ({sorted(headers)})", headers <= builder,
                sorted(headers - builder))
    extra = runtime - BASE - {"ca-certificates"} - {p for linked in linked_by.values() for p in linked.values()}
    r.check("runtime stage installs nothing the binaries do not link", not extra, sorted(extra))
    return r.report()


if __name__ == "__main__":
    sys.exit(main())
