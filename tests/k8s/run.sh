#!/usr/bin/env bash
# Operator tests that are not plain `cargo test`: the operator binary end to end against the in-memory API emulator,
# the Helm chart rendered, linted and validated, and the Dockerfile checked against what the binaries link.
# Prints one closing line: "N passed, M failed".
#
# Needs only PyPI and crates.io. The Python environment lives in ~/.cache/wallaroo-connectors/venv-k8s and is
# (re)created when missing or when requirements.txt changes.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${WALLAROO_K8S_VENV:-$HOME/.cache/wallaroo-connectors/venv-k8s}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "== creating $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || { echo "0 passed, 1 failed"; exit 1; }
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt" \
        || { echo "0 passed, 1 failed"; exit 1; }
    echo "$want" > "$stamp"
fi
py="$venv/bin/python"

echo "== building wallaroo-connector-operator"
if ! (cd "$root" && cargo build -q -p wallaroo-connector-operator); then
    echo "0 passed, 1 failed"
    exit 1
fi
bin="${CARGO_TARGET_DIR:-$root/target}/debug/wallaroo-connector-operator"

passed=0
failed=0
run_suite() {
    local name="$1"; shift
    echo "== $name"
    local log
    log="$(mktemp)"
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local line
    line="$(grep -E '^RESULT ' "$log" | tail -1)"
    if [[ -z "$line" ]]; then
        echo "   $name produced no result (exit $rc)"
        failed=$((failed + 1))
    else
        local p f
        p="$(sed -E 's/.*passed=([0-9]+).*/\1/' <<<"$line")"
        f="$(sed -E 's/.*failed=([0-9]+).*/\1/' <<<"$line")"
        passed=$((passed + p))
        failed=$((failed + f))
        if [[ $rc -ne 0 && $f -eq 0 ]]; then failed=$((failed + 1)); fi
    fi
    rm -f "$log"
}

export WALLAROO_OPERATOR_BIN="$bin" _WC_OPERATOR_BIN="$bin"
run_suite "chart: render, lint, validate" timeout 300 "$py" "$here/chart_test.py"
run_suite "e2e: operator against the API emulator" timeout 300 "$py" "$here/e2e.py"
run_suite "image: Dockerfile against what the binaries link" timeout 900 "$py" "$here/image_test.py"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
