"""Identity, limits and what reaches the logs and Redis, against a real server process.

One server for the module: several API keys (each test's identity is a key of its own) and a
small chat rate limit.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from serve.identity import key_identity
from serve.store import Completion
from tests.conftest import TEST_REDIS_URL, Server, start_server

pytestmark = pytest.mark.slow  # starts a real process

KEYS = [f"sk-sec-{i}" for i in range(6)]
CHAT_RATE = 3
ASK = {"model": "loopchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = {"LOOPCHAT_API_KEYS": ",".join(KEYS), "LOOPCHAT_CHAT_RATE": str(CHAT_RATE)}
    started = start_server(tiny_model, tmp_path_factory.mktemp("security"), TEST_REDIS_URL, env=env)
    yield started
    started.stop()


def with_key(server: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_chat_over_the_rate_limit_is_429_per_key_whatever_user_it_names(server: Server) -> None:
    with with_key(server, KEYS[0]) as api, with_key(server, KEYS[1]) as other:
        statuses = [
            api.post("/v1/chat/completions", json={**ASK, "user": f"u{i}"}).status_code
            for i in range(CHAT_RATE + 1)
        ]
        assert statuses == [200] * CHAT_RATE + [429]
        refused = api.post("/v1/chat/completions", json=ASK).json()["error"]
        assert refused["type"] == "rate_limit_error" and refused["code"] == "rate_limit_exceeded"
        assert f"more than {CHAT_RATE} chat requests per minute" in refused["message"]
        assert other.post("/v1/chat/completions", json=ASK).status_code == 200


@pytest.mark.parametrize("token", ["ключ".encode(), b"sk-sec-0\xff", "sk-sec-é".encode()])
def test_a_non_ascii_bearer_token_is_401_json(server: Server, token: bytes) -> None:
    headers = {b"authorization": b"Bearer " + token}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=ASK, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"


def raw_request(server: Server, request_line_target: bytes) -> bytes:
    """Send one request with an exact target (httpx would normalise it); returns the reply."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"GET " + request_line_target + b" HTTP/1.1\r\nHost: x\r\n"
            b"X-Note: %0D%0AINJECTED-HEADER\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_encoded_newlines_cannot_add_log_lines_and_query_strings_are_not_logged(
    server: Server,
) -> None:
    reply = raw_request(server, b"/v1/x%0AINJECTED-LINE%0D%0AINJECTED-CR?session_hash=s3cret")
    assert reply.startswith(b"HTTP/1.1 404"), reply[:200]
    assert raw_request(server, b"/health?session_hash=s3cret").startswith(b"HTTP/1.1 200")
    lines = server.log.read_text().splitlines()
    [logged] = [line for line in lines if "INJECTED-LINE" in line]
    assert '"GET /v1/x' in logged and 'INJECTED-CR HTTP/1.1" 404' in logged  # one line
    assert not [line for line in lines if line.startswith("INJECTED")]
    log = "\n".join(lines)
    assert "s3cret" not in log
    assert "session_hash" not in log


def test_no_api_key_is_stored_anywhere_in_redis_only_its_hash(server: Server) -> None:
    key = KEYS[2]
    with with_key(server, key) as api:
        answer = api.post("/v1/chat/completions", json={**ASK, "n": 2, "user": "ann"}).json()
        ranked = api.post("/v1/feedback", json={"completion_id": answer["id"], "ranking": [1, 0]})
        assert ranked.status_code == 201, ranked.text
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    stored = Completion.from_json(client.get(f"loopchat:completion:{answer['id']}"))
    assert stored.identity == key_identity(key) and stored.user == "ann"
    dumped = []
    for name in client.scan_iter("*"):
        kind = client.type(name)
        value = {
            "string": lambda n: client.get(n),
            "hash": lambda n: client.hgetall(n),
            "list": lambda n: client.lrange(n, 0, -1),
            "set": lambda n: client.smembers(n),
            "zset": lambda n: client.zrange(n, 0, -1),
            "stream": lambda n: client.xrange(n),
        }[kind](name)
        dumped.append(f"{name} {value}")
    everything = "\n".join(dumped)
    assert key_identity(key) in everything  # the identity is there ...
    assert not [key_ for key_ in KEYS if key_ in everything]  # ... no key is
    client.close()
