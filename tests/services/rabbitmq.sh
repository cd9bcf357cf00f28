#!/usr/bin/env bash
# Starts the shared RabbitMQ on 127.0.0.1:5672 (guest/guest) unless it already accepts connections.
# Idempotent.
set -euo pipefail
up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if up; then
    echo "rabbitmq: already running"
    exit 0
fi
rabbitmq-server -detached
# The node takes a while to boot; wait for it, then for the AMQP listener.
rabbitmqctl wait --timeout 120 "${RABBITMQ_PID_FILE:-/var/lib/rabbitmq/mnesia/rabbit@$(hostname -s).pid}" >/dev/null 2>&1 || true
for _ in $(seq 1 120); do
    if up; then
        echo "rabbitmq: started"
        exit 0
    fi
    sleep 1
done
echo "rabbitmq: did not come up on 127.0.0.1:5672" >&2
exit 1
