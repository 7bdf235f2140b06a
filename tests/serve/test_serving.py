"""The chat service under load: a bounded waiting room answered 503, and tokenizing off the loop.

In-process tests drive :class:`serve.serving.ChatService` over a real HF engine and the real
Redis; one test sends concurrent requests to a real ``loopchat up`` process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve.engine import make_engine
from serve.protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse
from serve.serving import ChatService
from serve.settings import Settings
from serve.store import CompletionStore, async_client
from tests.conftest import start_server

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def chat_request(stream: bool = False, **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="loopchat", messages=fields.pop("messages", QUESTION), stream=stream, **fields
    )


def with_chat(
    tiny_model: Path, settings: Settings, scenario: Callable[[ChatService], Awaitable[Any]]
) -> Any:
    """Run ``scenario`` with a chat service over a started HF engine and the real Redis."""

    async def run() -> Any:
        engine = make_engine("hf", tiny_model, "v1", settings)
        await engine.start()
        client = async_client(settings.redis_url)
        try:
            return await scenario(ChatService(engine, CompletionStore(client, 60), settings))
        finally:
            await engine.shutdown()
            await client.aclose()

    return asyncio.run(run())


def test_requests_beyond_the_waiting_room_are_503_and_every_freed_place_is_reused(
    tiny_model: Path, redis_url: str, tmp_path: Path
) -> None:
    """The engine generates ``concurrency`` at once and lets ``max_waiting`` more wait; the
    next request is refused before anything is queued. A place comes back when its stream
    ends and also when a stream is dropped unread (its client left before the first byte)."""
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, max_waiting=1, chat_rate=10**6)

    async def scenario(chat: ChatService) -> None:
        places = chat.engine.concurrency + settings.max_waiting
        for _ in range(2):  # the second time round, every place was given back
            held = [
                await chat.create_chat_completion(chat_request(True, max_tokens=4), "addr:t")
                for _ in range(places)
            ]
            assert all(hasattr(stream, "__aiter__") for stream in held)  # accepted, unread
            refused = await chat.create_chat_completion(chat_request(), "addr:t")
            assert isinstance(refused, ErrorResponse) and refused.status_code == 503
            assert refused.error.code == "server_busy" and refused.error.type == "server_error"
            read = held.pop()
            assert (await read.__anext__()).startswith("data: ")
            await read.aclose()  # a client that left mid-answer
            held.clear()  # the rest dropped unread
            served = await chat.create_chat_completion(chat_request(max_tokens=4), "addr:t")
            assert isinstance(served, ChatCompletionResponse)

    with_chat(tiny_model, settings, scenario)


def test_tokenizing_a_long_prompt_does_not_stall_the_event_loop(
    tiny_model: Path, redis_url: str, tmp_path: Path
) -> None:
    """A prompt of ~600 kB (under the 1 MiB body limit, far over the context) takes a long
    while to render and tokenize before it can be refused; meanwhile a heartbeat on the loop
    keeps beating, where on the loop itself the work would stall it for all of that time."""
    settings = Settings(data_dir=tmp_path, redis_url=redis_url)
    messages = [{"role": "user", "content": "What is 2 + 3? " * 40_000}]

    async def scenario(chat: ChatService) -> tuple[float, float, ErrorResponse]:
        tokenizer = chat.engine.tokenizer
        started = time.perf_counter()  # the same work done on the loop: how long it blocks
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) > 100_000
        on_loop = time.perf_counter() - started

        gaps: list[float] = []
        done = asyncio.Event()

        async def heartbeat() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        beating = asyncio.create_task(heartbeat())
        request = chat_request(messages=messages)
        result = await chat.create_chat_completion(request, "addr:t")
        done.set()
        await beating
        return on_loop, max(gaps), result

    on_loop, longest_gap, result = with_chat(tiny_model, settings, scenario)
    assert isinstance(result, ErrorResponse) and result.error.code == "context_length_exceeded"
    assert on_loop > 0.2  # long enough to tell a stalled loop from a beating one
    assert longest_gap < on_loop / 4, (longest_gap, on_loop)


@pytest.mark.slow  # starts a real server
def test_more_concurrent_requests_than_the_engine_takes_get_503_and_serving_goes_on(
    tiny_model: Path, redis_url: str, tmp_path: Path
) -> None:
    server = start_server(
        tiny_model,
        tmp_path / "data",
        redis_url,
        env={"LOOPCHAT_MAX_WAITING": "0", "LOOPCHAT_CHAT_RATE": "100000"},
    )
    body = {"model": "loopchat", "messages": QUESTION, "n": 4, "max_tokens": 200}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            return list(
                await asyncio.gather(
                    *(client.post("/chat/completions", json=body) for _ in range(16))
                )
            )

    try:
        replies = asyncio.run(burst())
        statuses = [reply.status_code for reply in replies]
        assert set(statuses) == {200, 503}, statuses
        for reply in replies:
            if reply.status_code == 503:
                assert reply.headers["retry-after"] == "1"
                error = reply.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["code"] == "server_busy"
        after = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=300)
        assert after.status_code == 200 and len(after.json()["choices"]) == 4
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]
