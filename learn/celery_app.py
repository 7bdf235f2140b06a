"""The learning worker's Celery app: broker and result backend are the store's Redis.

One task at a time per worker process (solo pool, prefetch 1: a round holds a whole model in
memory, one process per GPU), acknowledged only after it finished (``acks_late``) and put back
on the queue if the worker dies mid-round (``reject_on_worker_lost``; after a ``kill -9`` it is
kombu's visibility timeout, ``LOOPCHAT_TASK_VISIBILITY_S``, that brings it back); rounds are
idempotent (``learn/loop.py``), so running one twice is safe.

While it runs, the worker writes a heartbeat (``serve.events.WORKERS``) from a thread of its
own, so ``GET /health`` sees a worker that died, even one killed in the middle of a round (the
solo pool's main thread is busy training then and answers no Celery ping).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from serve.events import MISSED_BEATS, WORKERS
from serve.loop_trigger import QUEUE, celery_url, transport_options
from serve.settings import Settings
from serve.store import resolve_redis_url, sync_client

log = logging.getLogger(__name__)

_settings = Settings()
_redis_url = resolve_redis_url(_settings)
_url = celery_url(_redis_url)

app = Celery("loopchat", broker=_url, backend=_url, include=["learn.tasks"])
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_pool="solo",
    worker_concurrency=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options=transport_options(_settings),
)


class Heartbeat:
    """Writes ``name``'s time into ``WORKERS`` every ``interval`` seconds until stopped.

    A failed write (Redis restarting) is logged and tried again next beat, never fatal: the
    worker itself reconnects on its own. Beats older than an hour are pruned as it goes, so
    workers that were killed do not pile up.
    """

    def __init__(self, url: str, name: str, interval: float) -> None:
        self.client = sync_client(url)
        self.name = name
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(WORKERS, {self.name: now})
        pipe.zremrangebyscore(WORKERS, "-inf", now - max(3600, MISSED_BEATS * self.interval))
        pipe.execute()

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat not written (%s); retrying", exc)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        """Stop beating and say so at once (``/health`` need not wait for the beat to age)."""
        self._stop.set()
        self._thread.join()
        try:
            self.client.zrem(WORKERS, self.name)
        except redis.RedisError:
            pass  # the beat ages out by itself
        self.client.close()


_heartbeat: list[Heartbeat] = []


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    name = getattr(sender, "hostname", None) or "learn"
    heartbeat = Heartbeat(_redis_url, name, _settings.worker_heartbeat_s)
    heartbeat.start()
    _heartbeat.append(heartbeat)


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    while _heartbeat:
        _heartbeat.pop().stop()
