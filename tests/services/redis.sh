#!/usr/bin/env bash
# Starts the shared Redis on 127.0.0.1:6379 unless it already answers PING; installs Debian's redis-server when
# it is missing. No systemd: redis-server daemonizes itself. Idempotent.
#   tests/services/redis.sh [start|stop|restart]
set -euo pipefail
. "$(dirname "$0")/lib/apt.sh"
PORT=6379
LOG=/var/log/redis/ci.log
pong() { redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; }
stop() {
  if command -v redis-cli >/dev/null && pong; then
    redis-cli -h 127.0.0.1 -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do pong || return 0; sleep 0.1; done
    echo "redis: still answering after SHUTDOWN" >&2; return 1
  fi
}
case "${1:-start}" in
  stop) stop; exit 0 ;;
  restart) stop ;;
  start) ;;
  *) echo "usage: $0 [start|stop|restart]" >&2; exit 2 ;;
esac
apt_install redis-server
if pong; then
  echo "redis: already running"
  exit 0
fi
mkdir -p /var/lib/redis /var/log/redis
# No persistence: the tests make their own keys and a restart starting empty is what they expect.
redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$PORT" --save "" --appendonly no \
  --dir /var/lib/redis --logfile "$LOG"
for _ in $(seq 1 50); do
  if pong; then
    echo "redis: started on 127.0.0.1:$PORT"
    exit 0
  fi
  sleep 0.2
done
echo "redis: did not come up on 127.0.0.1:$PORT; last lines of $LOG:" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
