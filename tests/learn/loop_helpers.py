"""Realistic feedback for loop tests: a real model answers real prompts, users rank the answers,
and the rankings go through the real ``FeedbackService`` into the Redis stream."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.feedback import FeedbackService
from serve.protocol import FeedbackRequest, FeedbackResponse
from serve.settings import Settings
from serve.store import Completion, CompletionStore, async_client

# A round in seconds on the nano model: few prompts, short learner runs, a small gate.
TINY = {
    "max_prompts": 4,
    "ptx_texts": 8,
    "reward": {"rankings_per_batch": 4, "warmup_steps": 1},
    "ppo": {
        "engine": "hf",
        "steps": 2,
        "batch_size": 4,
        "mini_batch_size": 4,
        "ppo_epochs": 1,
        "response_length": 8,
        "ptx_batch_size": 2,
        "ptx_length": 32,
    },
    "rloo": {"k": 2, "prompts_per_step": 2, "steps": 1, "response_length": 8},
    "dpo": {"epochs": 1, "rankings_per_step": 4},
    "bon": {"n": 2, "response_length": 8, "batch_size": 8},
    "gate": {"prompts": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
}


def arithmetic_prompts(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [
        [{"role": "user", "content": f"What is {rng.randrange(30)} + {rng.randrange(10)}?"}]
        for _ in range(count)
    ]


def sample_completions(
    model_dir: Path, prompts: list[list[dict]], n: int = 3, max_new_tokens: int = 12, seed: int = 0
) -> list[Completion]:
    """What the served model answered: ``n`` sampled candidates per prompt."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    completions = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids,
                do_sample=True,
                num_return_sequences=n,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        completions.append(
            Completion(
                id=f"chatcmpl-{uuid.uuid4().hex}",
                messages=messages,
                candidates=answers,
                version="v1",
                user="tester",
            )
        )
    return completions


def shorter_first(candidates: list[str]) -> list[list[int]]:
    """A user who prefers short answers: best to worst, equal lengths tied."""
    lengths = sorted({len(c) for c in candidates})
    return [[i for i, c in enumerate(candidates) if len(c) == length] for length in lengths]


def submit_rankings(
    redis_url: str,
    completions: list[Completion],
    round_every: int = 10**9,
    rank: Callable[[list[str]], list[list[int]]] = shorter_first,
) -> list[FeedbackResponse]:
    """Store each completion and post its ranking (by ``rank``) as the API process does (which
    also counts it for the loop trigger)."""

    async def run() -> list[FeedbackResponse]:
        settings = Settings(redis_url=redis_url, round_every=round_every, feedback_rate=10**6)
        client = async_client(redis_url)
        store = CompletionStore(client, settings.completion_ttl)
        service = FeedbackService(client, settings)
        results = []
        for completion in completions:
            await store.save(completion)
            request = FeedbackRequest(
                completion_id=completion.id,
                ranking=rank(completion.candidates),
                user=completion.user,
            )
            result = await service.submit(request, "addr:127.0.0.1")
            assert isinstance(result, FeedbackResponse), result
            results.append(result)
        await client.aclose()
        return results

    return asyncio.run(run())
