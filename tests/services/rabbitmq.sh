#!/usr/bin/env bash
# Starts the shared RabbitMQ on 127.0.0.1:5672 (user guest/guest, vhost /) unless it already accepts AMQP
# connections; installs Debian's rabbitmq-server when it is missing. No systemd: `rabbitmq-server -detached`
# (Debian's wrapper drops to the rabbitmq user), then `rabbitmqctl await_startup`. Idempotent.
#   tests/services/rabbitmq.sh [start|stop|restart]
set -euo pipefail
. "$(dirname "$0")/lib/apt.sh"
up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
stop() {
  if command -v rabbitmqctl >/dev/null && up; then
    rabbitmqctl stop >/dev/null
    for _ in $(seq 1 100); do up || return 0; sleep 0.2; done
    echo "rabbitmq: still listening after rabbitmqctl stop" >&2; return 1
  fi
}
case "${1:-start}" in
  stop) stop; exit 0 ;;
  restart) stop ;;
  start) ;;
  *) echo "usage: $0 [start|stop|restart]" >&2; exit 2 ;;
esac
apt_install rabbitmq-server
if up; then
  echo "rabbitmq: already running"
  exit 0
fi
# The node name defaults to rabbit@<short hostname>, which a container's hostname may not resolve to; localhost
# always does. rabbitmq-server and rabbitmqctl both read this file, so they agree on the name.
env_conf=/etc/rabbitmq/rabbitmq-env.conf
if ! grep -qx 'NODENAME=rabbit@localhost' "$env_conf" 2>/dev/null; then
  echo 'NODENAME=rabbit@localhost' >> "$env_conf"
fi
# guest may log in from loopback only (RabbitMQ's default loopback_users), which is where the tests connect from.
mkdir -p /var/log/rabbitmq && chown rabbitmq: /var/log/rabbitmq
pidfile=/var/lib/rabbitmq/mnesia/rabbit@localhost.pid
# A node that is already booting (an earlier call that gave up waiting) is waited for, not started twice.
if ! rabbitmqctl -q ping >/dev/null 2>&1; then
  echo "rabbitmq: starting (logs in /var/log/rabbitmq)"
  rm -f "$pidfile"
  rabbitmq-server -detached
fi
# `wait` waits for the node to write its pid file, then for the rabbit application to have started.
if ! rabbitmqctl -q wait --timeout 150 "$pidfile" >/dev/null; then
  echo "rabbitmq: the node did not finish booting; last lines of its logs:" >&2
  tail -n 30 /var/log/rabbitmq/*.log >&2 || true
  exit 1
fi
for _ in $(seq 1 60); do
  if up; then
    echo "rabbitmq: started on 127.0.0.1:5672 ($(rabbitmqctl version 2>/dev/null || echo '?'))"
    exit 0
  fi
  sleep 0.5
done
echo "rabbitmq: booted but nothing listens on 127.0.0.1:5672" >&2
exit 1
