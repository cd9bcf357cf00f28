#!/usr/bin/env bash
# The Celsius example end to end, on one machine, no cluster:
#   UDP f32 readings -> udp source sidecar -> simulated worker (x * 1.8 + 32) -> udp sink sidecar -> UDP listener
# Prints the Fahrenheit text and checks every value.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
cargo build -q -p wallaroo-connector
bin="$CARGO_TARGET_DIR/debug/wallaroo-connector"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

readings=(-40 0 12.5 37 100 451)

# 1. Where the Fahrenheit text ends up (upstream's run_sample listened on UDP 8901 the same way).
python3 - "$work/received.txt" "${#readings[@]}" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 8901))
s.settimeout(60)
with open(sys.argv[1], "w") as out:
    for _ in range(int(sys.argv[2])):
        data, _ = s.recvfrom(65536)
        out.write(data.decode()); out.flush()
PY
pids+=($!)

# 2. The sink sidecar listens for the worker on 7200; 3. the simulated worker runs the pipeline;
# 4. the source sidecar connects to the worker on 7100 and listens for readings on UDP 6789.
RUST_LOG=${RUST_LOG:-warn} "$bin" run -f "$here/connectors.yaml" --name celsius-out 2>"$work/sink.log" & pids+=($!)
RUST_LOG=${RUST_LOG:-warn} "$bin" sim-worker --source-listen 127.0.0.1:7100 --sink-connect 127.0.0.1:7200 \
  --app celsius --checkpoint-ms 200 2>"$work/worker.log" & pids+=($!)
RUST_LOG=${RUST_LOG:-warn} "$bin" run -f "$here/connectors.yaml" --name celsius-feed 2>"$work/source.log" & pids+=($!)

# Wait until the source sidecar is ready (connected to the worker, UDP socket bound).
python3 - <<'PY'
import time, urllib.request
for _ in range(300):
    try:
        if urllib.request.urlopen("http://127.0.0.1:9464/readyz", timeout=1).status == 200:
            break
    except Exception:
        time.sleep(0.1)
else:
    raise SystemExit("source sidecar never became ready")
PY

# 5. Send the readings as big-endian f32 datagrams, like a sensor would.
python3 - "${readings[@]}" <<'PY'
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for v in sys.argv[1:]:
    s.sendto(struct.pack(">f", float(v)), ("127.0.0.1", 6789))
    print(f"sent    {float(v):8.1f} C")
PY

wait "${pids[0]}"
echo "received (Fahrenheit):"
sed 's/^/        /' "$work/received.txt"
python3 - "$work/received.txt" "${readings[@]}" <<'PY'
import sys
got = [float(x) for x in open(sys.argv[1]).read().split()]
want = [round(float(c) * 1.8 + 32, 1) for c in sys.argv[2:]]
if got != want:
    raise SystemExit(f"MISMATCH: got {got}, want {want}")
print(f"all {len(want)} conversions correct")
PY
