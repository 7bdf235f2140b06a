"""The pages on a deployed host: no cross-origin use, no uploads (a real server process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import TEST_REDIS_URL, Server, start_server

pytestmark = pytest.mark.slow  # starts a real process

DEPLOYED = {"Host": "chat.example.org"}  # not localhost: where Gradio echoed any Origin


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = {"LOOPCHAT_ADMIN_TOKEN": "t"}
    started = start_server(tiny_model, tmp_path_factory.mktemp("guards"), TEST_REDIS_URL, env=env)
    yield started
    started.stop()


@pytest.mark.parametrize("page", ["/chat", "/ops"])
def test_another_origin_gets_no_cors_grant_on_a_deployed_host(server: Server, page: str) -> None:
    evil = {**DEPLOYED, "Origin": "https://evil.example"}
    simple = httpx.get(f"{server.url}{page}/config", headers=evil)
    assert simple.status_code == 200  # the page still answers; the browser just may not read it
    assert "access-control-allow-origin" not in simple.headers
    preflight = httpx.options(
        f"{server.url}{page}/gradio_api/queue/join",
        headers={**evil, "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    same = httpx.get(
        f"{server.url}{page}/config", headers={**DEPLOYED, "Origin": "http://chat.example.org"}
    )
    assert same.status_code == 200


@pytest.mark.parametrize("page", ["/chat", "/ops"])
def test_uploads_are_refused(server: Server, page: str) -> None:
    reply = httpx.post(
        f"{server.url}{page}/gradio_api/upload", files={"files": ("x.txt", b"anything")}
    )
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "uploads_disabled"
