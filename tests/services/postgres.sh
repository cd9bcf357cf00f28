#!/usr/bin/env bash
# Starts the shared PostgreSQL server (127.0.0.1:5432, trust auth, user postgres, database test) if it is not
# reachable. Idempotent. Uses the Debian cluster tools (apt package postgresql).
set -euo pipefail
PORT=${PGPORT_SHARED:-5432}
if ! command -v pg_ctlcluster >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
if ! pg_isready -q -h 127.0.0.1 -p "$PORT"; then
  version=$(ls /etc/postgresql | sort -V | tail -1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p "$PORT" && break; sleep 0.5; done
fi
pg_isready -h 127.0.0.1 -p "$PORT"
# Trust auth for loopback and the test database (both idempotent).
if ! psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  version=$(ls /etc/postgresql | sort -V | tail -1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$version" main reload
fi
if [ "$(psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Atc "select count(*) from pg_database where datname = 'test'")" = 0 ]; then
  psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qc 'CREATE DATABASE test'
fi
echo "postgres ready on 127.0.0.1:$PORT (database test)"
