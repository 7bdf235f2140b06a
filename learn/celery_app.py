"""The learning worker's Celery app: broker and result backend are the store's Redis.

One task at a time per worker process (solo pool, prefetch 1: a round holds a whole model in
memory, one process per GPU), acknowledged only after it finished (``acks_late``) and put back
on the queue if the worker dies mid-round (``reject_on_worker_lost``); rounds are idempotent
(``learn/loop.py``), so running one twice is safe.
"""

from __future__ import annotations

from celery import Celery

from serve.loop_trigger import QUEUE, celery_url
from serve.settings import Settings
from serve.store import resolve_redis_url

_url = celery_url(resolve_redis_url(Settings()))

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
)
