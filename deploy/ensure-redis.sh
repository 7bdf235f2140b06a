#!/usr/bin/env bash
# Makes sure a Redis answers at 127.0.0.1:6379 (the tests' server); starts one if not.
set -euo pipefail
if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then exit 0; fi
echo "[redis] starting redis-server on 127.0.0.1:6379" >&2
mkdir -p /tmp/loopchat-redis
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir /tmp/loopchat-redis --logfile /tmp/loopchat-redis/redis.log
for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0; sleep 0.1; done
echo "[redis] redis-server did not start" >&2; exit 1
