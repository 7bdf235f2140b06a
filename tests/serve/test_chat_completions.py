"""The chat API of a real ``loopchat up`` process, driven by the official openai client.

Every test runs against both engines; one server per engine serves the whole module (vLLM takes
about half a minute to start on CPU).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from serve.store import Completion, key
from tests.conftest import TEST_REDIS_URL, Server, start_server
from tests.serve.checkpoint_helpers import variant
from tests.serve.logprobs_helpers import check_logprobs

ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.slow)]
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module", params=ENGINES)
def server(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    data_dir = tmp_path_factory.mktemp(f"chat-{request.param}")
    model = variant(tiny_model, 1, data_dir / "model")  # greedy answers that are not empty
    started = start_server(model, data_dir, TEST_REDIS_URL, engine=request.param)
    yield started
    assert started.stop() == 0, started.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def store() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL, decode_responses=True)
    yield client
    client.close()


def stored(store: redis.Redis, completion_id: str) -> Completion:
    raw = store.get(key("completion", completion_id))
    assert raw is not None, f"completion {completion_id} was not stored"
    return Completion.from_json(raw)


def test_plain_completion_has_id_version_usage_and_is_stored(
    client: openai.OpenAI, store: redis.Redis
) -> None:
    reply = client.chat.completions.create(
        model="loopchat", messages=QUESTION, max_tokens=8, user="alice"
    )
    assert reply.id.startswith("chatcmpl-")
    assert reply.system_fingerprint == "v1"
    assert reply.model == "loopchat"
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    saved = stored(store, reply.id)
    assert saved.messages == QUESTION
    assert saved.candidates == [choice.message.content]
    assert (saved.version, saved.user) == ("v1", "alice")
    assert 0 < store.ttl(key("completion", reply.id)) <= 7 * 24 * 3600


def test_stream_sends_role_text_usage_and_done_and_stores_what_it_sent(
    server: Server, client: openai.OpenAI, store: redis.Redis
) -> None:
    chunks = list(
        client.chat.completions.create(
            model="loopchat",
            messages=QUESTION,
            max_tokens=10,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert {c.system_fingerprint for c in chunks} == {"v1"}
    texts, roles, finished = ["", ""], [None, None], [None, None]
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        roles[choice.index] = roles[choice.index] or choice.delta.role
        texts[choice.index] += choice.delta.content or ""
        finished[choice.index] = finished[choice.index] or choice.finish_reason
    assert roles == ["assistant", "assistant"]
    assert all(reason in ("stop", "length") for reason in finished)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and 2 <= usage.completion_tokens <= 20
    assert stored(store, chunks[0].id).candidates == texts
    # on the wire: server-sent events ending with [DONE]
    body = {"model": "loopchat", "messages": QUESTION, "max_tokens": 2, "stream": True}
    raw = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.splitlines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_n4_gives_four_distinct_candidates_all_stored(
    client: openai.OpenAI, store: redis.Redis
) -> None:
    reply = client.chat.completions.create(
        model="loopchat", messages=QUESTION, n=4, max_tokens=16, temperature=1.0
    )
    answers = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert len(set(answers)) == 4
    assert stored(store, reply.id).candidates == answers


def test_seed_reproduces_the_same_candidates(client: openai.OpenAI) -> None:
    def ask(seed: int) -> list[str]:
        reply = client.chat.completions.create(
            model="loopchat", messages=QUESTION, n=3, max_tokens=12, temperature=1.0, seed=seed
        )
        return [c.message.content for c in reply.choices]

    first = ask(1234)
    assert ask(1234) == first
    assert ask(4321) != first


def test_multi_turn_conversation_is_rendered_and_stored_whole(
    client: openai.OpenAI, store: redis.Redis
) -> None:
    messages = [
        {"role": "system", "content": "You answer sums."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "And plus 5?"},
    ]
    single = client.chat.completions.create(model="loopchat", messages=QUESTION, max_tokens=2)
    reply = client.chat.completions.create(model="loopchat", messages=messages, max_tokens=6)
    assert reply.usage.prompt_tokens > single.usage.prompt_tokens + 10
    assert stored(store, reply.id).messages == messages


def test_stop_string_and_max_completion_tokens_end_the_answer(client: openai.OpenAI) -> None:
    def greedy(**kwargs: object) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model="loopchat", messages=QUESTION, temperature=0, **kwargs
        )

    full = greedy(max_tokens=24).choices[0].message.content
    stop = full.strip()[3:5]
    assert len(stop) == 2, full
    cut = greedy(max_tokens=24, stop=[stop]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (full[: full.find(stop)], "stop")
    short = greedy(max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3
    assert short.choices[0].message.content == full[: len(short.choices[0].message.content)]


def test_every_choice_carries_its_own_logprobs_in_openais_shape(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="loopchat", messages=QUESTION, n=3, max_tokens=8, logprobs=True, top_logprobs=4
    )
    assert reply.choices[0].logprobs.content[0].top_logprobs[0].logprob <= 0  # the client parses
    entries = []
    for choice in reply.choices:
        mine = choice.model_dump()["logprobs"]["content"]
        check_logprobs(choice.message.content, mine, top=4)
        entries.append([e["bytes"] for e in mine])
    assert len({str(e) for e in entries}) == 3  # each answer's own tokens
    # an entry per token of the text: special tokens (the end of turn) are generated, not text
    assert sum(map(len, entries)) <= reply.usage.completion_tokens
    plain = client.chat.completions.create(model="loopchat", messages=QUESTION, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_a_greedy_answer_picks_its_most_likely_token_each_time(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="loopchat", messages=QUESTION, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    [choice] = reply.choices
    check_logprobs(choice.message.content, choice.model_dump()["logprobs"]["content"], top=2)
    for entry in choice.logprobs.content:
        best = entry.top_logprobs[0]
        assert (best.bytes, best.logprob) == (entry.bytes, pytest.approx(entry.logprob))


def test_streamed_chunks_carry_the_logprobs_of_the_text_they_bring(client: openai.OpenAI) -> None:
    chunks = client.chat.completions.create(
        model="loopchat", messages=QUESTION, n=2, max_tokens=10, stream=True, logprobs=True
    )
    texts, entries = ["", ""], [[], []]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.content:
                assert choice.logprobs is not None, "a chunk with text and no logprobs"
            if choice.logprobs is not None:
                entries[choice.index] += choice.model_dump()["logprobs"]["content"]
    for text, mine in zip(texts, entries, strict=True):
        assert mine
        check_logprobs(text, mine, top=0)


JSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "verdict",
        "schema": {
            "type": "object",
            "properties": {"answer": {"enum": ["yes", "no"]}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    },
}


def test_json_response_format_is_followed_on_vllm_and_refused_on_hf(
    server: Server, client: openai.OpenAI
) -> None:
    """vLLM constrains the answer to the schema (structured outputs, xgrammar on CPU); the
    transformers engine cannot, and says so naming ``response_format``, streaming or not."""
    engine = httpx.get(f"{server.url}/health").json()["engine"]
    if engine == "hf":
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(
                    model="loopchat", messages=QUESTION, response_format=JSON_FORMAT, stream=stream
                )
            assert refused.value.body["param"] == "response_format"
        return
    reply = client.chat.completions.create(
        model="loopchat", messages=QUESTION, max_tokens=64, temperature=0,
        response_format=JSON_FORMAT,
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert json.loads(reply.choices[0].message.content) in ({"answer": "yes"}, {"answer": "no"})
    objects = client.chat.completions.create(
        model="loopchat", messages=QUESTION, n=4, max_tokens=32, seed=1,
        response_format={"type": "json_object"},
    )  # fmt: skip
    ended = [c.message.content for c in objects.choices if c.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    assert all(c.message.content.startswith("{") for c in objects.choices)
    unsatisfiable = {"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": unsatisfiable}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="loopchat", messages=QUESTION, response_format=bad, stream=stream
            )
        assert refused.value.body["param"] == "response_format"


def test_models_health_and_metrics(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["loopchat"]
    assert client.models.retrieve("loopchat").id == "loopchat"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["version"] == "v1"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'loopchat_live_version_info{version="v1"} 1.0' in metrics
    assert 'loopchat_chat_requests_total{outcome="ok"}' in metrics
    assert "loopchat_request_latency_seconds_bucket" in metrics
    assert "loopchat_completion_tokens_total" in metrics


def test_client_disconnect_aborts_the_generation(server: Server) -> None:
    def aborted() -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith('loopchat_chat_requests_total{outcome="aborted"}'):
                return float(line.split()[-1])
        return 0.0

    before = aborted()
    body = {"model": "loopchat", "messages": QUESTION, "n": 4, "max_tokens": 400, "stream": True}
    body["temperature"] = 1.0
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
        next(response.iter_lines())  # the first event arrived; now hang up
    deadline = time.monotonic() + 30
    while aborted() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted() == before + 1


def test_a_streamed_completion_is_stored_before_its_last_finish_chunk_is_sent(
    server: Server, store: redis.Redis
) -> None:
    """A client that ranks the moment it has every candidate's ``finish_reason`` must find
    the completion. The server is frozen (SIGSTOP) as soon as that chunk arrives, so whatever
    it had not stored by then is not in Redis when we look."""
    import os
    import signal

    body = {"model": "loopchat", "messages": QUESTION, "stream": True, "n": 2}
    body |= {"temperature": 1.0, "max_tokens": 8}
    for _ in range(10):
        finished: set[int] = set()
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                finished |= {c["index"] for c in chunk["choices"] if c.get("finish_reason")}
                if len(finished) == 2:
                    os.kill(server.process.pid, signal.SIGSTOP)
                    try:
                        raw = store.get(key("completion", chunk["id"]))
                    finally:
                        os.kill(server.process.pid, signal.SIGCONT)
                    assert raw is not None, "the last finish chunk came before the completion"
                    break
        assert len(finished) == 2
