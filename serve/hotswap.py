"""Keep a serving process's engine on the registry's ``live`` version.

Every API replica runs one :func:`follow_live` task from the app's lifespan. It listens on the
registry's pub/sub channel (a promotion or rollback anywhere is seen within milliseconds), and
also checks the alias when it starts and every ``poll_seconds`` — pub/sub is fire-and-forget, so
a message sent while this process was reconnecting would otherwise be lost for good.

The swap itself is the engine's (contract: ``engine.swap(local_dir, version)`` lets in-flight
requests finish and tags every output with the version that produced it), so no request fails
while weights change. Registry calls are blocking (sync Redis, fsspec downloads), so they run in
a thread and never stall the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from serve.registry import CHANNEL, Registry

log = logging.getLogger(__name__)


class LiveFollower:
    """Swaps ``engine`` to the live version whenever it differs from what it serves."""

    def __init__(self, registry: Registry, engine: Any) -> None:
        self.registry = registry
        self.engine = engine
        self._lock = asyncio.Lock()

    async def sync(self) -> str | None:
        """Swap to the live version if needed; return the version now served (None: no live).

        Serialised, so a burst of announcements leads to one swap per actual change.
        """
        async with self._lock:
            live = await asyncio.to_thread(self.registry.alias, "live")
            if live is None or live == self.engine.version:
                return live
            local_dir = await asyncio.to_thread(self.registry.local_path, live)
            base_dir = await asyncio.to_thread(self.registry.base_path, live)
            old = self.engine.version
            await self.engine.swap(str(local_dir), live, base_dir)
            log.info("hot-swapped %s -> %s", old, live)
            return live


async def follow_live(
    registry: Registry, engine: Any, aclient: aioredis.Redis, poll_seconds: float = 30.0
) -> None:
    """Run forever (cancel to stop): follow ``live`` through pub/sub plus a periodic check.

    A failed swap or a Redis outage is logged and retried on the next message or poll, never
    allowed to end the task: the engine keeps serving the version it has meanwhile.
    """
    follower = LiveFollower(registry, engine)
    while True:
        pubsub = aclient.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            await _sync_logged(follower)  # also covers messages missed while (re)connecting
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=poll_seconds
                )
                if message is None or _is_live_change(message):
                    await _sync_logged(follower)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("lost the registry channel; reconnecting")
            await asyncio.sleep(min(poll_seconds, 2.0))
        finally:
            await pubsub.aclose()


@contextlib.asynccontextmanager
async def following_live(
    registry: Registry, engine: Any, aclient: aioredis.Redis, poll_seconds: float = 30.0
) -> AsyncIterator[asyncio.Task]:
    """Run :func:`follow_live` for the duration of the block (the app's lifespan)."""
    task = asyncio.create_task(follow_live(registry, engine, aclient, poll_seconds), name="hotswap")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _is_live_change(message: dict) -> bool:
    try:
        return json.loads(message["data"]).get("alias") == "live"
    except (ValueError, TypeError, AttributeError):
        return False


async def _sync_logged(follower: LiveFollower) -> None:
    try:
        await follower.sync()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("could not swap to the live version; serving %s", follower.engine.version)
