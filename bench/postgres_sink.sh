#!/usr/bin/env bash
# PostgreSQL sink throughput vs a plain client's COPY of the same rows (see docs/bench-postgres.md).
# Starts the throw-away 2PC instance on 127.0.0.1:5433 (prepared and staging modes both run against it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/services/postgres-2pc.sh
exec cargo bench -p wallaroo-connector --bench postgres_sink "$@"
