"""Rankings posted while Redis is killed and restarted (``kill -9``, AOF ``appendfsync
always``): every ranking answered 201 is in the stream afterwards, and a post that met the
outage is a 503 to retry, never a 500."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from serve.events import STREAM
from tests.conftest import PrivateRedis, start_server

RESTARTS = 3
POSTERS = 4
COMPLETIONS = 1200  # an identity ranks a completion once: one completion per ranking
PACE_S = 0.04  # between one poster's rankings, so the completions outlast the restarts


def test_every_201_survives_redis_restarts_with_rankings_in_flight(
    tiny_model: Path, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    server = start_server(
        tiny_model,
        tmp_path / "data",
        redis_url=private_redis.url,
        env={
            "LOOPCHAT_FEEDBACK_RATE": "1000000",
            "LOOPCHAT_CHAT_RATE": "1000000",
            "LOOPCHAT_ACCESS_LOG": "0",
        },  # fmt: skip
    )
    try:
        question = {
            "model": "loopchat",
            "messages": [{"role": "user", "content": "What is 2 + 3?"}],
            "n": 2,
            "max_tokens": 2,
            "temperature": 1.0,
        }

        def create(count: int) -> list[str]:
            with httpx.Client(base_url=server.base_url, timeout=60) as client:
                replies = [client.post("/chat/completions", json=question) for _ in range(count)]
            assert all(r.status_code == 200 for r in replies), replies[0].text
            return [r.json()["id"] for r in replies]

        with ThreadPoolExecutor(POSTERS) as pool:
            batches = pool.map(create, [COMPLETIONS // POSTERS] * POSTERS)
        unranked = iter([cid for batch in batches for cid in batch])

        stored: list[str] = []
        statuses: dict[int, int] = {}
        stop = threading.Event()
        lock = threading.Lock()

        def post(poster: int) -> None:
            with httpx.Client(base_url=server.base_url, timeout=30) as client:
                while not stop.is_set():
                    with lock:
                        completion_id = next(unranked, None)
                    if completion_id is None:
                        return
                    time.sleep(PACE_S)
                    body = {"completion_id": completion_id, "ranking": [1, 0], "user": f"p{poster}"}
                    try:
                        reply = client.post("/feedback", json=body)
                    except httpx.TransportError:
                        continue  # the API itself never went away; count what it answered
                    with lock:
                        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
                        if reply.status_code == 201:
                            stored.append(reply.json()["id"])

        posters = [threading.Thread(target=post, args=(i,)) for i in range(POSTERS)]
        for thread in posters:
            thread.start()
        before_restart = []
        for _ in range(RESTARTS):
            time.sleep(1.5)
            with lock:
                before_restart.append(len(stored))
            private_redis.restart(down_s=0.5)  # kill -9, half a second down, start from AOF
        time.sleep(1.5)
        stop.set()
        for thread in posters:
            thread.join(60)
        before_restart.append(len(stored))

        assert set(statuses) <= {201, 503}, statuses  # an outage is a 503 to retry, not a 500
        assert all(b > a for a, b in zip(before_restart, before_restart[1:], strict=False))
        with redis.Redis.from_url(private_redis.url, decode_responses=True) as client:
            in_stream = [json.loads(f["event"])["id"] for _, f in client.xrange(STREAM)]
        lost = set(stored) - set(in_stream)
        assert not lost, f"{len(lost)} of {len(stored)} rankings answered 201 are missing"
        assert len(in_stream) == len(set(in_stream))  # none stored twice
        print(f"rankings 201: {len(stored)}, lost: {len(lost)}, statuses: {statuses}")
    finally:
        server.stop()
