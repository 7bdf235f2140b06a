"""``loopchat up`` as a user runs it: embedded Redis, the worker child, clean stop, bad flags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from serve.store import Completion, key
from tests.conftest import embedded_url, start_server

QUESTION = {"model": "loopchat", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}


def test_up_without_redis_url_uses_embedded_redis_starts_the_worker_and_stops_cleanly(
    tiny_model: Path, tmp_path: Path
) -> None:
    """No LOOPCHAT_REDIS_URL: a redis-server persisted (AOF) in the data dir, shared with the
    worker child; SIGTERM lets an in-flight request finish, then everything stops."""
    data_dir = tmp_path / "data"
    server = start_server(tiny_model, data_dir, redis_url=None, engine="hf", extra_args=[])
    try:
        worker = server.worker()
        redis_url = embedded_url(data_dir)
        assert redis_url.startswith("unix://")  # the embedded server, shared with the worker

        reply = httpx.post(f"{server.base_url}/chat/completions", json=QUESTION, timeout=60)
        assert reply.status_code == 200, reply.text
        with redis.Redis.from_url(redis_url, decode_responses=True) as store:
            saved = Completion.from_json(store.get(key("completion", reply.json()["id"])))
        assert saved.messages == QUESTION["messages"]
        assert any("aof" in p.name for p in (data_dir / "redis").rglob("*"))
        [embedded] = [p for p in psutil.process_iter() if redis_server_in(p, data_dir / "redis")]

        in_flight: dict[str, httpx.Response] = {}
        slow = {**QUESTION, "n": 4, "max_tokens": 300, "temperature": 1.0}

        def ask() -> None:
            in_flight["reply"] = httpx.post(
                f"{server.base_url}/chat/completions", json=slow, timeout=120
            )

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(1.0)  # the request is being generated (4 x 300 tokens take several seconds)
        server.process.send_signal(signal.SIGTERM)
        asking.join(120)
        assert server.process.wait(60) == 0, server.log.read_text()[-3000:]
        assert in_flight["reply"].status_code == 200
        assert len(in_flight["reply"].json()["choices"]) == 4
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
        embedded.wait(30)  # the embedded redis-server stops with its last client
    finally:
        server.stop()


def redis_server_in(process: psutil.Process, directory: Path) -> bool:
    try:
        return "redis-server" in process.name() and process.cwd() == str(directory)
    except psutil.Error:
        return False


def up(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", "up", "--no-worker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--model", "/no/such/model"], {}, "not a Hugging Face model directory"),
        (["--port", "70000"], {}, "port"),
        (["--engine", "tpu"], {}, "invalid choice"),
        ([], {"LOOPCHAT_MAX_N": "many"}, "LOOPCHAT_MAX_N"),
        ([], {"LOOPCHAT_REDIS_URL": "redis://127.0.0.1:1/0"}, "cannot reach Redis"),
    ],
)
def test_bad_flags_or_settings_fail_with_one_line_and_status_2(
    args: list[str], env: dict[str, str], words: str, tmp_path: Path
) -> None:
    result = up(*args, env={"LOOPCHAT_DATA_DIR": str(tmp_path), **env})
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_a_busy_port_fails_before_loading_anything(tiny_model: Path, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        result = up(
            "--model", str(tiny_model), "--port", port, env={"LOOPCHAT_DATA_DIR": str(tmp_path)}
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
