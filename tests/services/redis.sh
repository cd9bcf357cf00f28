#!/usr/bin/env bash
# Starts the shared Redis on 127.0.0.1:6379 unless it already answers PING. Idempotent.
set -euo pipefail
if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    echo "redis: already running"
    exit 0
fi
mkdir -p /var/lib/redis /var/log/redis
redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
for _ in $(seq 1 50); do
    if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
        echo "redis: started"
        exit 0
    fi
    sleep 0.2
done
echo "redis: did not come up on 127.0.0.1:6379 (see /var/log/redis/ci.log)" >&2
exit 1
