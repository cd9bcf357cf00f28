#!/usr/bin/env bash
# Redis hash sink throughput next to a plain client's pipelined HSET rate (same data, same run).
# Needs Redis on 127.0.0.1:6379 (tests/services/redis.sh). Knobs: BENCH_MESSAGES, BENCH_ROUND, BENCH_REPS.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/services/redis.sh >/dev/null
exec cargo bench -p wallaroo-connector --bench redis_sink "$@"
