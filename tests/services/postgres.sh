#!/usr/bin/env bash
# Starts the shared PostgreSQL server (127.0.0.1:5432, trust auth, user postgres, database test) if it is not
# reachable. Idempotent. Uses the Debian cluster tools (apt package postgresql, installed when missing; its
# install creates the cluster <version>/main, and one is created here if a machine has the server without it).
set -euo pipefail
. "$(dirname "$0")/lib/apt.sh"
PORT=${PGPORT_SHARED:-5432}
CLUSTER=${PG_CLUSTER:-main}  # another name (and port) lets a test exercise the fresh-machine path
apt_install postgresql
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if [ ! -f "/etc/postgresql/$version/$CLUSTER/postgresql.conf" ]; then
  pg_createcluster "$version" "$CLUSTER" --port "$PORT"
fi
if ! pg_isready -q -h 127.0.0.1 -p "$PORT"; then
  pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" start
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p "$PORT" && break; sleep 0.5; done
fi
pg_isready -h 127.0.0.1 -p "$PORT"
# Trust auth for loopback and the test database (both idempotent).
if ! psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  hba=/etc/postgresql/$version/$CLUSTER/pg_hba.conf
  sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" reload
fi
if [ "$(psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Atc "select count(*) from pg_database where datname = 'test'")" = 0 ]; then
  psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qc 'CREATE DATABASE test'
fi
echo "postgres ready on 127.0.0.1:$PORT (database test)"
