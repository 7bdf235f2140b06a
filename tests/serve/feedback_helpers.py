"""Storing real completions and rankings the way the API process does, for the feedback tests."""

from __future__ import annotations

import asyncio
import uuid

from serve.feedback import FeedbackService
from serve.protocol import FeedbackRequest, FeedbackResponse
from serve.settings import Settings
from serve.store import Completion, CompletionStore, async_client


def make_completion(
    n: int, version: str = "v1", user: str | None = None, identity: str | None = None
) -> Completion:
    """A completion with ``n`` recognisable candidates ``"answer 0"``, ``"answer 1"``, ..."""
    return Completion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        messages=[
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 plus 3 is 5."},
            {"role": "user", "content": "And plus 4?"},
        ],
        candidates=[f"answer {i}" for i in range(n)],
        version=version,
        user=user,
        identity=identity,
    )


def save_completions(redis_url: str, *completions: Completion, ttl: int = 3600) -> None:
    """Store completions as the chat service does, rankable for ``ttl`` seconds."""

    async def run() -> None:
        client = async_client(redis_url)
        store = CompletionStore(client, ttl)
        for completion in completions:
            await store.save(completion)
        await client.aclose()

    asyncio.run(run())


def store_rankings(redis_url: str, items: list[tuple[Completion, dict]]) -> list[FeedbackResponse]:
    """Save each completion, then submit its ranking through the real ``FeedbackService``.

    ``items`` pairs a completion with the JSON body fields of its ranking (minus the id).
    """
    save_completions(redis_url, *(completion for completion, _ in items))

    async def run() -> list[FeedbackResponse]:
        settings = Settings(redis_url=redis_url, round_every=10**9, feedback_rate=10**6)
        client = async_client(redis_url)
        service = FeedbackService(client, settings)
        results = []
        for completion, body in items:
            request = FeedbackRequest(completion_id=completion.id, **body)
            result = await service.submit(request, "addr:127.0.0.1")
            assert isinstance(result, FeedbackResponse), result
            results.append(result)
        await client.aclose()
        return results

    return asyncio.run(run())
