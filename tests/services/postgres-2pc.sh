#!/usr/bin/env bash
# A throw-away PostgreSQL instance with prepared transactions enabled (max_prepared_transactions = 10), for the
# sink's PREPARE TRANSACTION mode: initdb + pg_ctl into $PG2PC_DIR (default /tmp/wallaroo-pg-2pc) on port 5433,
# trust auth, database test. Runs as the postgres user because initdb refuses root. Idempotent.
#   tests/services/postgres-2pc.sh         start (if not running)
#   tests/services/postgres-2pc.sh stop    stop it (the data directory stays for the next start)
#   tests/services/postgres-2pc.sh restart
set -euo pipefail
. "$(dirname "$0")/lib/apt.sh"
PORT=${PG2PC_PORT:-5433}
DIR=${PG2PC_DIR:-/tmp/wallaroo-pg-2pc}
apt_install postgresql
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
ctl() { as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w -t 60 "$@"; }
case "${1:-start}" in
  stop) [ -f "$DIR/data/postmaster.pid" ] && ctl stop -m fast || true; exit 0 ;;
  restart) [ -f "$DIR/data/postmaster.pid" ] && ctl stop -m fast || true ;;
  start) ;;
  *) echo "usage: $0 [start|stop|restart]" >&2; exit 2 ;;
esac
if pg_isready -q -h 127.0.0.1 -p "$PORT"; then
  echo "postgres (2pc) already running on 127.0.0.1:$PORT"; exit 0
fi
mkdir -p "$DIR"
if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR"; fi
if [ ! -f "$DIR/data/PG_VERSION" ]; then
  as_pg "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --no-instructions >/dev/null
  cat >> "$DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
max_prepared_transactions = 10
max_connections = 100
fsync = on
CONF
fi
ctl start >/dev/null
for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p "$PORT" && break; sleep 0.5; done
if [ "$(psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Atc "select count(*) from pg_database where datname = 'test'")" = 0 ]; then
  psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qc 'CREATE DATABASE test'
fi
echo "postgres (2pc) ready on 127.0.0.1:$PORT (database test, max_prepared_transactions = $(psql -h 127.0.0.1 -p "$PORT" -U postgres -d test -Atc 'show max_prepared_transactions'))"
