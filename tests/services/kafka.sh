#!/usr/bin/env bash
# Starts the Kafka-protocol test broker (tansu, in-memory storage) on 127.0.0.1:9092 unless something already
# answers there. Idempotent: safe to call before every test run.
#
# Environment:
#   TANSU          path of the tansu binary (default ~/.cache/wallaroo-connectors/tools/bin/tansu)
#   KAFKA_PORT     port to listen on (default 9092)
#   TANSU_LOG      log file (default ~/.cache/wallaroo-connectors/tansu-<port>.log)
#
# tansu is installed with `cargo install --locked --root ~/.cache/wallaroo-connectors/tools tansu --features dynostore`
# (scripts/test.sh does it when the binary is missing).
set -euo pipefail

TANSU="${TANSU:-$HOME/.cache/wallaroo-connectors/tools/bin/tansu}"
PORT="${KAFKA_PORT:-9092}"
LOG="${TANSU_LOG:-$HOME/.cache/wallaroo-connectors/tansu-$PORT.log}"

answers() {
    # bash's /dev/tcp: no extra tools needed.
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

if answers; then
    echo "kafka: something already listens on 127.0.0.1:$PORT; leaving it running"
    exit 0
fi

if [ ! -x "$TANSU" ]; then
    echo "kafka: the tansu broker binary is missing at $TANSU" >&2
    echo "kafka: install it with: cargo install --locked --root ~/.cache/wallaroo-connectors/tools tansu --features dynostore" >&2
    exit 1
fi

mkdir -p "$(dirname "$LOG")"
echo "kafka: starting tansu on 127.0.0.1:$PORT (log: $LOG)"
nohup "$TANSU" broker \
    --storage-engine memory://tansu/ \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    >"$LOG" 2>&1 </dev/null &
pid=$!

for _ in $(seq 1 100); do
    if answers; then
        echo "kafka: tansu (pid $pid) is answering on 127.0.0.1:$PORT"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "kafka: tansu exited during start-up; last lines of $LOG:" >&2
        tail -n 20 "$LOG" >&2 || true
        exit 1
    fi
    sleep 0.1
done
echo "kafka: tansu did not answer on 127.0.0.1:$PORT within 10 s; last lines of $LOG:" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
