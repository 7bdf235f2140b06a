"""``loopchat up`` keeps its children alive: a worker or embedded redis-server killed with
``kill -9`` is restarted, and ``/health`` names the dead part (503) until it is back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import redis

from serve.store import Completion, key
from tests.conftest import Server, embedded_url, start_server

QUESTION = {"model": "loopchat", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}


def health(server: Server) -> httpx.Response:
    return httpx.get(f"{server.url}/health", timeout=10)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 90) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def embedded_redis(data_dir: Path) -> psutil.Process | None:
    for process in psutil.process_iter():
        try:
            if "redis-server" in process.name() and process.cwd() == str(data_dir / "redis"):
                return process
        except psutil.Error:
            continue
    return None


def down(server: Server, part: str) -> dict | None:
    reply = health(server)
    body = reply.json()
    if reply.status_code == 503 and part in body["failing"]:
        return body
    return None


def up(server: Server) -> dict | None:
    reply = health(server)
    return reply.json() if reply.status_code == 200 else None


def test_a_killed_worker_and_a_killed_embedded_redis_are_restarted_and_health_names_them(
    tiny_model: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(
        tiny_model,
        data_dir,
        redis_url=None,
        extra_args=[],  # with the worker child
        env={"LOOPCHAT_WORKER_HEARTBEAT_S": "0.5"},
    )
    try:
        body = wait_for(lambda: up(server), "healthy with its worker")
        assert body["parts"]["worker"] == {"status": "ok", "required": True, "workers": 1}
        assert {name: part["status"] for name, part in body["parts"].items()} == {
            "api": "ok",
            "engine": "ok",
            "redis": "ok",
            "worker": "ok",
        }

        # kill -9 the worker: /health says so, then the supervisor's new worker is healthy.
        first = server.worker()
        first.kill()
        body = wait_for(lambda: down(server, "worker"), "503 naming the dead worker")
        assert body["status"] == "unavailable" and body["error"]["param"] == "worker"
        assert body["parts"]["worker"]["workers"] == 0
        wait_for(lambda: up(server), "healthy again with a restarted worker")
        second = server.worker()
        assert second is not None and second.pid != first.pid

        # A completion stored before redis-server is killed is there after its restart (AOF).
        reply = httpx.post(f"{server.base_url}/chat/completions", json=QUESTION, timeout=60)
        assert reply.status_code == 200, reply.text
        url = embedded_url(data_dir)
        time.sleep(1.5)  # appendfsync everysec: a kill -9 of redis-server alone loses nothing,
        # the file is written at once; the pause only keeps the test about the restart
        killed = embedded_redis(data_dir)
        killed.kill()
        body = wait_for(lambda: down(server, "redis"), "503 naming the dead redis")
        assert body["parts"]["redis"]["status"] == "down"
        wait_for(lambda: up(server), "healthy again with a restarted redis-server")
        restarted = embedded_redis(data_dir)
        assert restarted is not None and restarted.pid != killed.pid
        with redis.Redis.from_url(url, decode_responses=True) as store:
            saved = Completion.from_json(store.get(key("completion", reply.json()["id"])))
        assert saved.messages == QUESTION["messages"]
        # The API serves and stores through the restarted server.
        again = httpx.post(f"{server.base_url}/chat/completions", json=QUESTION, timeout=60)
        assert again.status_code == 200, again.text
        assert server.worker().pid == second.pid  # the worker reconnected, not restarted
    finally:
        server.stop()
