"""The loop trigger: one round queued per ``round_every`` rankings, however many replicas count.

Rankings are counted by the feedback service's store script, so the trigger is tested through
the real ``FeedbackService`` storing real rankings.
"""

from __future__ import annotations

import asyncio
import json

import redis

from serve.events import SINCE_ROUND, STREAM
from serve.feedback import FeedbackService
from serve.loop_trigger import QUEUE, ROUND_TASK, celery_url
from serve.protocol import FeedbackRequest, FeedbackResponse
from serve.settings import Settings
from serve.store import async_client
from tests.serve.feedback_helpers import make_completion, save_completions


def test_celery_url_spells_unix_sockets_the_way_celery_reads_them() -> None:
    assert celery_url("unix:///run/r.sock") == "redis+socket:///run/r.sock"
    assert celery_url("unix:///run/r.sock?db=3") == "redis+socket:///run/r.sock?virtual_host=3"
    assert celery_url("redis://127.0.0.1:6379/6") == "redis://127.0.0.1:6379/6"


def _post_concurrently(
    redis_url: str, settings: Settings, bodies: list[dict], replicas: int = 4
) -> list[object]:
    """Submit ``bodies`` all at once, spread over ``replicas`` API processes' services."""

    async def run() -> list[object]:
        clients = [async_client(redis_url) for _ in range(replicas)]
        services = [FeedbackService(client, settings) for client in clients]
        results = await asyncio.gather(
            *(
                services[i % replicas].submit(FeedbackRequest(**body), "addr:127.0.0.1")
                for i, body in enumerate(bodies)
            )
        )
        for client in clients:
            await client.aclose()
        return list(results)

    return asyncio.run(run())


def _queued_rounds(sync: redis.Redis) -> list[dict]:
    return [json.loads(raw) for raw in sync.lrange(QUEUE, 0, -1)]  # kombu's queue list


def test_concurrent_replicas_queue_one_round_per_round_every_rankings(redis_url: str) -> None:
    completions = [make_completion(2) for _ in range(17)]
    save_completions(redis_url, *completions)
    bodies = [{"completion_id": c.id, "ranking": [1, 0], "user": "ann"} for c in completions]
    repeats = [{**body, "ranking": [0, 1]} for body in bodies[:6]]  # 409s count nothing

    results = _post_concurrently(
        redis_url, Settings(redis_url=redis_url, round_every=5), bodies + repeats
    )
    assert sum(isinstance(r, FeedbackResponse) for r in results) == 17
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    messages = _queued_rounds(sync)
    assert [m["headers"]["task"] for m in messages] == [ROUND_TASK] * 3
    assert len({m["headers"]["id"] for m in messages}) == 3
    assert sync.get(SINCE_ROUND) == "2"  # 17 = 3 rounds x 5 + 2 waiting for the next round


def test_a_round_that_cannot_be_sent_gives_its_count_back_and_the_ranking_stays_stored(
    redis_url: str,
) -> None:
    completions = [make_completion(2) for _ in range(6)]
    save_completions(redis_url, *completions)
    # Rankings go to the real Redis; the round is sent to a database the server refuses to open
    # (at once: an unreachable port costs Celery ~20 s of reconnecting before it gives up).
    refusing = Settings(redis_url=f"{redis_url.rsplit('/', 1)[0]}/99999", round_every=5)
    bodies = [{"completion_id": c.id, "ranking": [0, 1], "user": "bo"} for c in completions]

    first_five = _post_concurrently(redis_url, refusing, bodies[:5], replicas=1)
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    assert all(isinstance(r, FeedbackResponse) for r in first_five)
    assert sync.xlen(STREAM) == 5
    assert sync.get(SINCE_ROUND) == "5"  # the fifth claimed the round, then gave its count back

    [sixth] = _post_concurrently(
        redis_url, Settings(redis_url=redis_url, round_every=5), bodies[5:]
    )
    assert isinstance(sixth, FeedbackResponse)
    assert [m["headers"]["task"] for m in _queued_rounds(sync)] == [ROUND_TASK]
    assert sync.get(SINCE_ROUND) == "1"  # the sixth claimed the round again and sent it
