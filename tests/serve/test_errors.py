"""Bad requests get OpenAI-shaped errors naming the problem, never a 500 or a stack trace.

The checks happen before the engine is involved, so one HF-engine server (with client API keys,
a short context and a small body limit) covers them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.conftest import TEST_REDIS_URL, Server, start_server

KEY = "sk-test-1"
OK = {"model": "loopchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = {
        "LOOPCHAT_API_KEYS": f"{KEY}, sk-test-2",
        "LOOPCHAT_MAX_MODEL_LEN": "64",
        "LOOPCHAT_MAX_BODY_BYTES": "4096",
        "LOOPCHAT_BODY_TIMEOUT_S": "1",
    }
    started = start_server(tiny_model, tmp_path_factory.mktemp("errors"), TEST_REDIS_URL, env=env)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def api(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as client:
        yield client


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert "Traceback" not in response.text
    for word in words:
        assert word in body["error"]["message"], body
    return body["error"]


def with_(**changes: object) -> dict:
    return {**OK, **changes}


def test_a_valid_request_with_a_key_works(api: httpx.Client) -> None:
    assert api.post("/chat/completions", json=OK).status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic sk-test-1", f"Bearer{KEY}"])
def test_missing_or_wrong_api_key_is_401(server: Server, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for path, send in (("/chat/completions", httpx.post), ("/models", httpx.get)):
        kwargs = {"json": OK} if send is httpx.post else {}
        response = send(f"{server.base_url}{path}", headers=headers, **kwargs)
        assert assert_error(response, 401, None, "API key")["code"] == "invalid_api_key"


def test_the_openai_client_sees_typed_errors(server: Server) -> None:
    good = openai.OpenAI(base_url=server.base_url, api_key="sk-test-2", max_retries=0)
    bad = openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        good.chat.completions.create(model="gpt-4o", messages=OK["messages"])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        good.chat.completions.create(model="loopchat", messages=[])
    with pytest.raises(openai.BadRequestError) as too_long:
        good.chat.completions.create(
            model="loopchat", messages=[{"role": "user", "content": "hello " * 100}]
        )
    assert too_long.value.code == "context_length_exceeded"


def test_invalid_json_is_400(api: httpx.Client) -> None:
    response = api.post(
        "/chat/completions",
        content=b'{"model": "loopchat",',
        headers=JSON,
    )
    assert assert_error(response, 400, None, "not valid JSON")["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "param", "word"),
    [
        ({"model": "loopchat"}, "messages", "required"),
        (with_(messages=[]), "messages", "at least 1"),
        (with_(messages="hi"), "messages", "list"),
        (with_(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "user"),
        (with_(messages=[{"role": "user"}]), "messages[0].content", "required"),
        (with_(messages=[{"content": "hi"}]), "messages[0].role", "required"),
        (with_(n=0), "n", "greater than or equal to 1"),
        (with_(n=5), "n", "at most 4"),
        (with_(n=2, temperature=0), "temperature", "n > 1"),
        (with_(temperature=3), "temperature", "less than or equal to 2"),
        (with_(top_p=0), "top_p", "greater than 0"),
        (with_(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (with_(seed=-1), "seed", "greater than or equal to 0"),
        (with_(seed=2**53), "seed", "less than or equal to 9007199254740991"),
        (with_(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
        (with_(stream="yes please"), "stream", "boolean"),
        ([OK], None, "dictionary"),
    ],
)
def test_malformed_request_is_422_naming_the_field(
    api: httpx.Client, body: object, param: str | None, word: str
) -> None:
    response = api.post("/chat/completions", json=body)
    assert_error(response, 422, param, word)


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ('"messages": [{"role": "user", "content": "hi \\ud800"}]', "messages[0].content"),
        ('"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]',
         "messages[0].content[0].text"),
        ('"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud83d"', "stop"),
        ('"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800"', "user"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_in_any_text_is_422_naming_the_field(
    api: httpx.Client, field: str, param: str
) -> None:
    """JSON can escape half a UTF-16 pair, which no UTF-8 store or tokenizer takes."""
    body = f'{{"model": "loopchat", {field}}}'.encode()
    response = api.post("/chat/completions", content=body, headers=JSON)
    assert_error(response, 422, param, "lone surrogate")


def test_unknown_model_is_404(api: httpx.Client) -> None:
    error = assert_error(api.post("/chat/completions", json=with_(model="gpt-4o")), 404, "model")
    assert error["code"] == "model_not_found"
    assert_error(api.get("/models/gpt-4o"), 404, "model", "gpt-4o")
    assert api.get("/models/loopchat").json()["id"] == "loopchat"


def test_prompt_or_answer_longer_than_the_context_is_400(api: httpx.Client) -> None:
    long = with_(messages=[{"role": "user", "content": "hello " * 100}])
    error = assert_error(api.post("/chat/completions", json=long), 400, "messages", "64 tokens")
    assert error["code"] == "context_length_exceeded"
    response = api.post("/chat/completions", json=with_(max_tokens=60))
    assert_error(response, 400, "max_tokens", "64 tokens", "60 completion tokens")
    streamed = api.post("/chat/completions", json={**long, "stream": True})
    assert_error(streamed, 400, "messages", "context length")


def test_body_over_the_limit_is_413(api: httpx.Client) -> None:
    big = with_(messages=[{"role": "user", "content": "x" * 5000}])
    assert_error(api.post("/chat/completions", json=big), 413, None, "4096 bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        yield b'{"model": "loopchat", "messages": [{"role": "user", "content": "'
        yield b"x" * 5000
        yield b'"}]}'

    assert_error(api.post("/chat/completions", content=chunks()), 413, None, "larger")


def test_a_body_that_stops_arriving_is_408_within_the_body_timeout(server: Server) -> None:
    """A client that sends its headers and part of its body, then nothing, is answered 408
    after LOOPCHAT_BODY_TIMEOUT_S (1 s here) instead of holding the connection for ever."""
    import socket
    import time
    from urllib.parse import urlsplit

    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
            b'{"model": "loopchat", '
        )
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            if not (data := sock.recv(4096)):
                break
            reply += data
        waited = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.9 < waited < 10


def test_unknown_route_and_method_keep_the_error_shape(api: httpx.Client) -> None:
    assert_error(api.get("/nowhere"), 404, None, "/v1/nowhere")
    wrong_method = api.get("/chat/completions")
    assert_error(wrong_method, 405, None, "POST")
    assert wrong_method.headers["allow"] == "POST"


def test_failed_requests_store_nothing(api: httpx.Client) -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    before = set(client.scan_iter("loopchat:completion:*"))
    api.post("/chat/completions", json=with_(n=9))
    api.post("/chat/completions", json=with_(model="other"))
    assert set(client.scan_iter("loopchat:completion:*")) == before


TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
SCHEMA = {"name": "answer", "schema": {"type": "object"}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "none"}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),  # on the HF engine
        ({"response_format": {"type": "json_schema", "json_schema": SCHEMA}}, "response_format"),
    ],
)
def test_features_this_server_lacks_are_400_naming_the_field_not_ignored(
    api: httpx.Client, fields: dict, param: str
) -> None:
    for stream in (False, True):
        response = api.post("/chat/completions", json=with_(stream=stream, **fields))
        error = assert_error(response, 400, param, param)
        assert error["code"] == "unsupported_parameter"


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [], "tool_choice": "none"},
        {"logprobs": False, "top_logprobs": 0},
        {"logprobs": True, "top_logprobs": 20},
        {"response_format": {"type": "text"}},
    ],
)
def test_asking_for_none_of_those_or_for_logprobs_is_fine(api: httpx.Client, fields: dict) -> None:
    assert api.post("/chat/completions", json=with_(**fields)).status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true, as OpenAI
        ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"logprobs": [1]}, "logprobs"),
    ],
)
def test_malformed_feature_fields_are_422_naming_the_field(
    api: httpx.Client, fields: dict, param: str
) -> None:
    response = api.post("/chat/completions", json=with_(**fields))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"].startswith(param)
