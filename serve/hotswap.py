"""Keep a serving process's engine on the registry's ``live`` version.

Every API replica runs one :func:`follow_live` task from the app's lifespan; it also keeps the
candidate engine of online A/B (:class:`CandidateFollower`) on the candidate whose answers may
enter mixed slates. It listens on the
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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from serve.ab import eligible_candidate
from serve.engine.base import Engine
from serve.registry import CHANNEL, Registry
from serve.settings import Settings

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


class CandidateFollower:
    """Keeps a second engine on the candidate that may enter mixed slates (online A/B), and
    none when there is no such candidate (``serve.ab.eligible_candidate``: A/B on, gate passed,
    not live). ``engine`` is what the chat service reads; ``make_engine(dir, version,
    base_dir)`` builds an engine, not started (``base_dir``: an adapter version's base)."""

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        make_engine: Callable[[str, str, Path | None], Engine],
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.make_engine = make_engine
        self.engine: Engine | None = None
        self._lock = asyncio.Lock()

    async def sync(self) -> str | None:
        """Load, swap or drop the candidate engine as the registry says; return its version."""
        async with self._lock:
            wanted = await asyncio.to_thread(eligible_candidate, self.registry, self.settings)
            held = self.engine.version if self.engine is not None else None
            if wanted == held:
                return wanted
            if wanted is None:
                await self.aclose()
                log.info("candidate %s left the mixed slates", held)
                return None
            local_dir = str(await asyncio.to_thread(self.registry.local_path, wanted))
            base_dir = await asyncio.to_thread(self.registry.base_path, wanted)
            if self.engine is None:
                engine = self.make_engine(local_dir, wanted, base_dir)
                await engine.start()
                self.engine = engine
            else:
                await self.engine.swap(local_dir, wanted, base_dir)
            log.info("candidate %s enters mixed slates (was %s)", wanted, held)
            return wanted

    async def aclose(self) -> None:
        """Stop offering the candidate; shut its engine down once its requests are done."""
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.drain()
            await engine.shutdown()


async def follow_live(
    registry: Registry,
    engine: Any,
    aclient: aioredis.Redis,
    poll_seconds: float = 30.0,
    candidate: CandidateFollower | None = None,
) -> None:
    """Run forever (cancel to stop): follow ``live`` (and, given ``candidate``, the candidate)
    through pub/sub plus a periodic check.

    A failed swap or a Redis outage is logged and retried on the next message or poll, never
    allowed to end the task: the engine keeps serving the version it has meanwhile.
    """
    follower = LiveFollower(registry, engine)
    followers: list[LiveFollower | CandidateFollower] = [follower]
    if candidate is not None:
        followers.append(candidate)
    while True:
        pubsub = aclient.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            for each in followers:  # also covers messages missed while (re)connecting
                await _sync_logged(each)
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=poll_seconds
                )
                alias = None if message is None else _alias(message)
                if message is None or alias == "live":
                    await _sync_logged(follower)
                if candidate is not None and (message is None or alias in ("live", "candidate")):
                    await _sync_logged(candidate)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("lost the registry channel; reconnecting")
            await asyncio.sleep(min(poll_seconds, 2.0))
        finally:
            await pubsub.aclose()


@contextlib.asynccontextmanager
async def following_live(
    registry: Registry,
    engine: Any,
    aclient: aioredis.Redis,
    poll_seconds: float = 30.0,
    candidate: CandidateFollower | None = None,
) -> AsyncIterator[asyncio.Task]:
    """Run :func:`follow_live` for the duration of the block (the app's lifespan)."""
    task = asyncio.create_task(
        follow_live(registry, engine, aclient, poll_seconds, candidate), name="hotswap"
    )
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _alias(message: dict) -> str | None:
    """The alias a registry announcement is about (None when it is not one)."""
    try:
        return json.loads(message["data"]).get("alias")
    except (ValueError, TypeError, AttributeError):
        return None


async def _sync_logged(follower: LiveFollower | CandidateFollower) -> None:
    try:
        await follower.sync()
    except asyncio.CancelledError:
        raise
    except Exception:
        held = follower.engine.version if follower.engine is not None else None
        log.exception(
            "could not follow the registry (%s); serving %s", type(follower).__name__, held
        )
