#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what is missing (from crates.io, PyPI, Maven Central
# and Debian only), starts the servers the tests talk to (tests/services/*.sh install their own: PostgreSQL, Redis,
# RabbitMQ, Apache Kafka, moto), then lints and tests everything. `.ci/run` calls this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${WALLAROO_CACHE:-$HOME/.cache/wallaroo-connectors}"
mkdir -p "$cache"
# Build outputs live outside the clone so repeated runs are incremental.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
# One build per run: incremental caches would only add ~10 GB of disk (the machines' disk is shared and small).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export WALLAROO_SPEC_DIR="${WALLAROO_SPEC_DIR:-$root/../shared/spec}"

step() { printf '\n==> %s\n' "$*"; }
passed=0; failed=0; failures=()
run() {  # run NAME CMD...: counts outcomes, keeps going so one report shows every failure
  local name="$1"; shift
  step "$name"
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); failures+=("$name"); fi
}

step "toolchain: $(cargo --version)"
# C toolchain and headers for the bundled librdkafka and the TLS stacks (Debian packages). apt.sh runs
# `apt-get update` once for this script and the service scripts together.
. tests/services/lib/apt.sh
apt_install build-essential pkg-config libssl-dev zlib1g-dev

step "starting services"
for s in tests/services/*.sh; do
  [ -e "$s" ] || continue
  echo "-- $s"
  bash "$s"
done

run "format" cargo fmt --all -- --check
run "clippy" cargo clippy --workspace --all-targets -- -D warnings
run "cargo test (unit, conformance, integrations, operator)" cargo test --workspace --no-fail-fast
if [ -x tests/k8s/run.sh ]; then
  run "operator: API emulator end to end, Helm chart" tests/k8s/run.sh
fi
run "chaos: file source -> worker model -> PostgreSQL sink under kill -9 and PostgreSQL restarts (short)" \
  python3 tests/chaos/run.py --seconds 20 --records 300000 --seed "${CHAOS_SEED:-7}" \
  --bin "$CARGO_TARGET_DIR/debug/wallaroo-connector"
run "celsius demo" ./examples/celsius/run.sh

echo
if [ "$failed" -gt 0 ]; then
  printf 'failed step: %s\n' "${failures[@]}"
fi
echo "suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
