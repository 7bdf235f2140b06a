"""What ``GET /health`` checks: each part of the service, so a dead one is named, not hidden.

Parts: ``api`` (this process answers), ``engine`` (it can generate: started, not errored, not
stuck in a weight swap), ``redis`` (a PING within ``REDIS_TIMEOUT_S``) and ``worker`` (a
learning worker's heartbeat in ``serve.events.WORKERS`` within the last ``MISSED_BEATS``
intervals). The worker is required when this process started one (``loopchat up`` without
``--no-worker``); an API replica of a deployment reports workers but does not fail on them, so
a load balancer keeps routing chat to it while the learning side is down.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from serve.events import MISSED_BEATS, WORKERS
from serve.protocol import ErrorInfo, HealthPart, HealthResponse

REDIS_TIMEOUT_S = 2.0


def _part(problem: str | None, required: bool = True, **extra: Any) -> HealthPart:
    return HealthPart(
        status="down" if problem else "ok", detail=problem, required=required, **extra
    )


async def redis_part(client: aioredis.Redis) -> HealthPart:
    try:
        await asyncio.wait_for(client.ping(), REDIS_TIMEOUT_S)
    except (TimeoutError, aioredis.RedisError, OSError) as exc:
        return _part(f"no answer to PING ({type(exc).__name__})")
    return _part(None)


async def worker_part(client: aioredis.Redis, heartbeat_s: float, required: bool) -> HealthPart:
    """Workers whose heartbeat is fresh; down when none is (or Redis cannot tell)."""
    window = MISSED_BEATS * heartbeat_s
    try:
        beats = await asyncio.wait_for(
            client.zcount(WORKERS, time.time() - window, "+inf"), REDIS_TIMEOUT_S
        )
    except (TimeoutError, aioredis.RedisError, OSError):
        return _part("unknown: Redis is unreachable", required)
    silent = None if beats else f"no learning worker heartbeat in the last {window:g} s"
    return _part(silent, required, workers=beats)


async def check(state: Any) -> HealthResponse:
    """``/health`` for the app's ``state``: ``failing`` lists the required parts that are down."""
    settings = state.settings
    redis_state, worker_state = await asyncio.gather(
        redis_part(state.redis),
        worker_part(state.redis, settings.worker_heartbeat_s, settings.worker),
    )
    parts = {
        "api": _part(None),
        "engine": _part(state.engine.problem()),
        "redis": redis_state,
        "worker": worker_state,
    }
    failing = [name for name, part in parts.items() if part.required and part.status == "down"]
    error = None
    if failing:
        reasons = "; ".join(f"{name}: {parts[name].detail}" for name in failing)
        error = ErrorInfo(
            message=f"unavailable: {reasons}",
            type="server_error",
            param=failing[0],
            code="part_unavailable",
        )
    return HealthResponse(
        status="unavailable" if failing else "ok",
        version=state.engine.version,
        engine=state.engine.name,
        parts=parts,
        failing=failing,
        error=error,
    )
