"""End to end: rankings posted the way the API stores them trigger a round that a real Celery
worker process (``loopchat worker``) runs on real Redis, leaving a loadable candidate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.events import COUNTED, GROUP, ROUND_LOCK, ROUNDS, STREAM
from serve.loop_trigger import celery_client
from serve.registry import Registry
from serve.settings import Settings
from serve.store import sync_client
from serve.supervisor import stop_process
from tests.learn.loop_helpers import (
    TINY,
    arithmetic_prompts,
    sample_completions,
    submit_rankings,
)


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    """A ``loopchat worker`` process logging to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "worker", "--loglevel", "INFO"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )


def worker_env(redis_url: str, tmp_path: Path, tiny_model: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "LOOPCHAT_REDIS_URL": redis_url,
        "LOOPCHAT_DATA_DIR": str(tmp_path),
        "LOOPCHAT_MODEL": str(tiny_model),
        "LOOPCHAT_LOOP_CONFIG": json.dumps(TINY),
        "LOOPCHAT_AUTO_PROMOTE": "1",
        "LOOPCHAT_AB_SHARE": "0",  # promotion on the gate alone, as the assertions expect
        **extra,
    }


@pytest.fixture
def worker(redis_url: str, tmp_path: Path, tiny_model: Path):
    """A ``loopchat worker`` process; the live model is bootstrapped by the worker itself."""
    log = tmp_path / "worker.log"
    process = start_worker(worker_env(redis_url, tmp_path, tiny_model), log)
    yield process, log
    stop_process(process)


@pytest.mark.slow
def test_a_celery_worker_runs_a_triggered_round_and_leaves_a_loadable_candidate(
    worker, redis_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    process, log = worker
    completions = sample_completions(tiny_model, arithmetic_prompts(12, seed=3), n=3)
    submit_rankings(redis_url, completions, round_every=12)  # the 12th queues the round

    client = sync_client(redis_url)
    deadline = time.monotonic() + 300
    while not client.llen(ROUNDS):
        assert process.poll() is None, f"worker exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no round within 300 s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
    record = json.loads(client.lindex(ROUNDS, -1))
    assert record["status"] == "done", record
    assert record["rankings_new"] == 12

    # The task's result went through the result backend, under the round (task) id.
    result = celery_client(redis_url).AsyncResult(record["round"]).get(timeout=30)
    assert result["candidate"] == record["candidate"]

    settings = Settings(redis_url=redis_url, data_dir=tmp_path)
    registry = Registry.from_settings(settings, client)
    meta = registry.get(record["candidate"])
    assert meta["kind"] == record["learner"] == "rloo" and meta["parent"] == "v1"
    assert meta["gate"]["passed"] == record["gate"]["passed"]
    assert registry.alias("live") == (record["candidate"] if record["promoted"] else "v1")
    assert record["promoted"] == record["gate"]["passed"]  # LOOPCHAT_AUTO_PROMOTE=1

    path = registry.local_path(record["candidate"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert out.shape[1] > ids.shape[1]
    client.close()


@pytest.mark.slow
def test_a_worker_killed_mid_round_has_its_round_redelivered_and_counted_once(
    redis_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    """kill -9 of the worker while its round trains: the task comes back (visibility timeout
    5 s here, LOOPCHAT_TASK_VISIBILITY_S) to the next worker, which runs the same round id to
    the end; every ranking is counted once, none is left pending."""
    env = worker_env(
        redis_url,
        tmp_path,
        tiny_model,
        LOOPCHAT_TASK_VISIBILITY_S="5",
        # a round long enough (200 policy steps, ~5 s) that the kill lands inside it
        LOOPCHAT_LOOP_CONFIG=json.dumps(
            {**TINY, "lock_ttl_s": 3.0, "rloo": {**TINY["rloo"], "steps": 200}}
        ),
    )
    log = tmp_path / "worker.log"
    completions = sample_completions(tiny_model, arithmetic_prompts(12, seed=4), n=3)
    client = sync_client(redis_url)
    first = start_worker(env, log)
    try:
        submit_rankings(redis_url, completions, round_every=12)  # queues one round
        deadline = time.monotonic() + 300
        while not (
            client.exists(ROUND_LOCK)
            and client.xpending(STREAM, GROUP)["pending"]
            and "rloo step 0:" in log.read_text()  # into the training
        ):
            assert first.poll() is None, f"worker exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no round started:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        first.kill()  # kill -9: no ack, no requeue by the worker itself
        first.wait()
        assert not client.llen(ROUNDS), "the round ended before the kill: lengthen it"
    finally:
        stop_process(first)

    second = start_worker(env, log)
    try:
        deadline = time.monotonic() + 300
        while not client.llen(ROUNDS):
            assert second.poll() is None, f"worker exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not redelivered:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        [record] = [json.loads(r) for r in client.lrange(ROUNDS, 0, -1)]
        assert record["status"] == "done", record
        assert record["rankings_new"] == 12
        assert client.xpending(STREAM, GROUP)["pending"] == 0 and client.scard(COUNTED) == 0
        result = celery_client(redis_url).AsyncResult(record["round"]).get(timeout=30)
        assert result["round"] == record["round"]  # the very task that was queued, redelivered
    finally:
        stop_process(second)
        client.close()
