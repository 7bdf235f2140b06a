"""The loop trigger: one round queued per ``round_every`` rankings, however many replicas count."""

from __future__ import annotations

import asyncio
import json

import redis

from serve.loop_trigger import COUNTER, QUEUE, ROUND_TASK, LoopTrigger, celery_url
from serve.settings import Settings
from serve.store import async_client


def test_celery_url_spells_unix_sockets_the_way_celery_reads_them() -> None:
    assert celery_url("unix:///run/r.sock") == "redis+socket:///run/r.sock"
    assert celery_url("unix:///run/r.sock?db=3") == "redis+socket:///run/r.sock?virtual_host=3"
    assert celery_url("redis://127.0.0.1:6379/6") == "redis://127.0.0.1:6379/6"


def test_concurrent_replicas_queue_one_round_per_round_every_rankings(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, round_every=5)

    async def replicas() -> None:
        clients = [async_client(redis_url) for _ in range(4)]  # four API processes
        triggers = [LoopTrigger(client, settings) for client in clients]
        await asyncio.gather(*(triggers[i % 4].ranking_stored() for i in range(17)))
        for client in clients:
            await client.aclose()

    asyncio.run(replicas())
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    messages = [json.loads(raw) for raw in sync.lrange(QUEUE, 0, -1)]  # kombu's queue list
    assert [m["headers"]["task"] for m in messages] == [ROUND_TASK] * 3
    assert len({m["headers"]["id"] for m in messages}) == 3
    assert sync.get(COUNTER) == "2"  # 17 = 3 rounds x 5 + 2 waiting for the next round
