# syntax=docker/dockerfile:1.7
# One image, two binaries: `wallaroo-connector` (the sidecar) and `wallaroo-connector-operator`.
#   docker build -t ghcr.io/wallaroo-labs/wallaroo-connectors:0.1.0 .

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
# The sidecar builds librdkafka from source (rdkafka's bundled copy, features libz + ssl): a C toolchain and the
# OpenSSL and zlib headers. tests/k8s/image_test.py checks these against what the binaries link.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and incremental artifacts between builds; the binaries are copied out of the
# cached target directory because it is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wallaroo-connector -p wallaroo-connector-operator \
 && mkdir -p /out \
 && cp target/release/wallaroo-connector target/release/wallaroo-connector-operator /out/ \
 && strip /out/wallaroo-connector /out/wallaroo-connector-operator

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# The only shared libraries the binaries link besides glibc: OpenSSL and zlib (librdkafka's TLS and compression),
# plus CA roots for brokers. tests/k8s/image_test.py fails when a binary links a library this list misses.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=builder /out/wallaroo-connector /out/wallaroo-connector-operator /usr/local/bin/
# glibc creates up to 8 malloc arenas per core; two keep both processes' resident memory low at no measurable cost
# for their few threads.
ENV MALLOC_ARENA_MAX=2
# Numeric user so Kubernetes can enforce runAsNonRoot without reading /etc/passwd.
USER 65532:65532
EXPOSE 8443 8080 9464
# No ENTRYPOINT: the operator Deployment runs `wallaroo-connector-operator run`, injected sidecars run
# `wallaroo-connector run`; this default makes `docker run IMAGE` print the operator's usage.
CMD ["wallaroo-connector-operator", "--help"]
