"""Queue a learning round every ``LOOPCHAT_ROUND_EVERY`` new rankings (the feedback route calls it).

The API never imports training code: it sends the Celery task ``learn.tasks.run_round`` *by
name* to the ``learn`` queue on the same Redis the store uses, and a worker (``loopchat
worker``) runs it. Any number of API replicas may count at once: the counter
``loopchat:loop:since_round`` is incremented and, when it reaches ``round_every``, decreased by
``round_every`` in one server-side step (:data:`CLAIM_ROUND_LUA`), so exactly one ranking per
``round_every`` claims the round (no double rounds, no lost counts). That step runs inside the
feedback service's store script, so counting costs no round trip of its own; the ranking that
claimed a round then sends it (:class:`LoopTrigger`).

The counter is "rankings since the last *triggered* round"; which rankings a round actually
used is decided by the learner (``learn/loop.py``), so a late or duplicated task costs at most a
skipped round, never a ranking counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis

from serve.events import SINCE_ROUND
from serve.settings import Settings
from serve.store import resolve_redis_url

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

QUEUE = "learn"
ROUND_TASK = "learn.tasks.run_round"

# A Lua function for a script that stores rankings (serve/feedback.py) to count one in the same
# atomic step: INCR, and when the count reaches `every` take `every` off it and answer 1 (the
# caller then sends the task, see LoopTrigger.send_claimed_round).
CLAIM_ROUND_LUA = """
local function claim_round(counter, every)
  local n = redis.call('INCR', counter)
  if n >= every then
    redis.call('DECRBY', counter, every)
    return 1
  end
  return 0
end
"""


def celery_url(redis_url: str) -> str:
    """The Celery broker/backend URL for a redis-py URL.

    redis-py spells a unix socket ``unix:///path?db=N``; Celery (kombu and its result backend)
    wants ``redis+socket:///path?virtual_host=N``. TCP and TLS URLs are the same for both.
    """
    parts = urlsplit(redis_url)
    if parts.scheme != "unix":
        return redis_url
    db = parse_qs(parts.query).get("db", ["0"])[0]
    query = f"?virtual_host={db}" if db != "0" else ""
    return f"redis+socket://{parts.netloc}{parts.path}{query}"


def transport_options(settings: Settings) -> dict[str, float]:
    """kombu's Redis transport options for the learning queue, the same for sender and worker.

    A round is acked when it ends (``acks_late``). If its worker dies, the message waits in
    kombu's "unacked" set until it is ``visibility_timeout`` old, then any worker's sweep puts
    it back on the queue (kombu's default: an hour). Sweeping every ``unacked_restore_interval``
    seconds with no throttle, a lost round is running again ``task_visibility_s`` plus at most
    a tenth of it later.
    """
    visibility = settings.task_visibility_s
    return {
        "visibility_timeout": visibility,
        "unacked_restore_interval": max(1, min(30, visibility // 10)),
        "unacked_restore_throttle": 1,
    }


# Celery's package loads its attributes lazily, and a first ``from celery import Celery`` in
# several threads at once can fail with an ImportError (rounds are sent from worker threads).
_CELERY_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def celery_client(redis_url: str) -> Celery:
    """A Celery app that only sends tasks (one per Redis URL, reused across requests)."""
    with _CELERY_LOCK:
        from celery import Celery

        url = celery_url(redis_url)
        app = Celery("loopchat-api", broker=url, backend=url, set_as_current=False)
        app.conf.broker_transport_options = transport_options(Settings())
        return app


def send_round(redis_url: str, **kwargs: object) -> str:
    """Queue one learning round; returns the Celery task id (also the round id)."""
    result = celery_client(redis_url).send_task(ROUND_TASK, kwargs=kwargs, queue=QUEUE)
    return str(result.id)


class LoopTrigger:
    """Sends the learning round that a stored ranking claimed (:data:`CLAIM_ROUND_LUA`)."""

    def __init__(self, aclient: aioredis.Redis, settings: Settings) -> None:
        self.client = aclient
        self.settings = settings

    async def send_claimed_round(self) -> None:
        """Queue the round the caller's ranking claimed.

        Sending runs in a thread (kombu is blocking). If it fails the count is given back, so
        the next ranking claims the round again; the ranking itself is already stored and is
        never lost.
        """
        every = self.settings.round_every
        try:
            task_id = await asyncio.to_thread(
                send_round, resolve_redis_url(self.settings), claimed=every
            )
        except Exception:
            await self.client.incrby(SINCE_ROUND, every)
            log.exception("could not queue a learning round; will retry on the next ranking")
            return
        log.info("queued learning round %s after %d rankings", task_id, every)
