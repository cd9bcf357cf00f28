#!/usr/bin/env bash
# Kafka source throughput vs a plain librdkafka consumer, same broker, same run.
# Usage: bench/kafka_source.sh [--records N] [--partitions P] [--size BYTES] [--credits C] [--refill R]
# Starts Apache Kafka on 127.0.0.1:9092 if needed (tests/services/kafka.sh), builds the example in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/services/kafka.sh
cargo build --release -p wallaroo-connector --example kafka_source_bench
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/examples/kafka_source_bench" "$@"
