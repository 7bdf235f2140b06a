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

from serve.events import ROUNDS
from serve.loop_trigger import celery_client
from serve.registry import Registry
from serve.settings import Settings
from serve.store import sync_client
from tests.learn.loop_helpers import (
    TINY,
    arithmetic_prompts,
    sample_completions,
    submit_rankings,
)


@pytest.fixture
def worker(redis_url: str, tmp_path: Path, tiny_model: Path):
    """A ``loopchat worker`` process; the live model is bootstrapped by the worker itself."""
    env = {
        **os.environ,
        "LOOPCHAT_REDIS_URL": redis_url,
        "LOOPCHAT_DATA_DIR": str(tmp_path),
        "LOOPCHAT_MODEL": str(tiny_model),
        "LOOPCHAT_LOOP_CONFIG": json.dumps(TINY),
        "LOOPCHAT_AUTO_PROMOTE": "1",
        "LOOPCHAT_AB_SHARE": "0",  # promotion on the gate alone, as the assertions expect
    }
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "worker", "--loglevel", "INFO"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    yield process, log
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
