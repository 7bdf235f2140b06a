"""The whole loop at small scale, through public interfaces only.

``loopchat up`` (vLLM engine, real Redis, its real Celery worker child) serves a model; simulated
users (``learn.simulate``) chat and post 100 rankings over HTTP; the 100th ranking starts a
round in the worker (reward model, PPO, gate); the candidate is auto-promoted, hot-swapped into
the engine, and later answers carry its ``system_fingerprint``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from learn.simulate import (
    ServiceClient,
    SimulationConfig,
    run_simulation,
    wait_for_round,
    wait_for_version,
)
from tests.conftest import start_server

ADMIN = {"Authorization": "Bearer e2e-admin"}
ROUND_EVERY = 100

# A round sized for a test: two short steps of the default learner, a small gate (its verdicts are
# tested in tests/learn/test_gate.py). The tiny model's weights are random, so its reward model
# learns little from a hundred rankings: the gate's signal check is off here, the plumbing is
# what this test is about.
SMALL_LOOP = {
    "max_prompts": 8,
    "ptx_texts": 0,
    "reward": {"epochs": 1, "rankings_per_batch": 16},
    "rloo": {"steps": 2, "prompts_per_step": 4, "k": 2, "response_length": 16},
    "gate": {"prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "require_signal": False},
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rankings_make_a_new_version_that_answers(
    tiny_model: Path, redis_url: str, tmp_path: Path
) -> None:
    env = {
        "LOOPCHAT_ROUND_EVERY": str(ROUND_EVERY),
        "LOOPCHAT_AUTO_PROMOTE": "1",
        "LOOPCHAT_AB_SHARE": "0",  # promotion on the gate alone (tests/serve/test_ab_e2e.py: A/B)
        "LOOPCHAT_ADMIN_TOKEN": "e2e-admin",
        "LOOPCHAT_FEEDBACK_RATE": "100000",
        "LOOPCHAT_MAX_N": "3",
        "LOOPCHAT_LOOP_CONFIG": json.dumps(SMALL_LOOP),
    }
    server = start_server(
        tiny_model, tmp_path / "data", redis_url, "vllm", extra_args=[], env=env, timeout=600
    )
    try:
        asyncio.run(_loop_round_trip(server.url))
    finally:
        server.stop()


async def _loop_round_trip(url: str) -> None:
    # The tiny model's weights are random: brevity still orders its answers (by length).
    users = SimulationConfig(
        url=url, users=4, rankings=ROUND_EVERY, preference="brevity", k=3, max_tokens=16
    )
    summary = await run_simulation(users)
    assert summary.rankings == ROUND_EVERY and not summary.errors
    assert set(summary.versions) == {"v1"}

    record = await wait_for_round(url, ADMIN, known=set(), timeout_s=600)
    assert record is not None, "no round finished"
    assert record["status"] == "done", record.get("error")
    assert record["rankings_new"] == ROUND_EVERY and record["live"] == "v1"
    assert record["gate"]["passed"] and record["promoted"], record["gate"]
    candidate = record["candidate"]

    client = ServiceClient(url)
    try:
        assert await wait_for_version(client, candidate, timeout_s=120) is not None
        later = await client.complete([{"role": "user", "content": "What is 2 + 3?"}], 2, "e2e")
        assert later.system_fingerprint == candidate
    finally:
        await client.aclose()
    checkpoints = httpx.get(f"{url}/admin/checkpoints", headers=ADMIN).json()
    assert checkpoints["live"] == candidate and checkpoints["previous"] == "v1"

    # Users keep ranking: their new rankings are about the new version's answers.
    more = await run_simulation(
        SimulationConfig(url=url, users=2, rankings=4, preference="brevity", k=3, seed=1)
    )
    assert more.rankings == 4 and set(more.versions) == {candidate}
