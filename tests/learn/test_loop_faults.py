"""A learning round under faults: killed at each step that matters, Redis restarted while it
runs, its lock taken. Each ranking still reaches the reward model and the policy once, and the
round's effects (commit, promotion) happen once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from learn.loop import LoopConfig, run_round
from serve.events import COUNTED, GROUP, ROUND_LOCK, ROUNDS, SINCE_ROUND, STREAM, round_key
from serve.registry import Registry
from serve.settings import Settings
from serve.store import Completion, sync_client
from tests.conftest import PrivateRedis
from tests.learn.loop_helpers import TINY, arithmetic_prompts, sample_completions, submit_rankings

# A gate every finite, loadable candidate passes: these tests are about crash points, and a
# promotion must happen for the crash after it to be reached.
LENIENT = {
    **TINY,
    "lock_ttl_s": 5.0,  # renewed every 1.7 s; short, as the redelivery waits it out
    "gate": {**TINY["gate"], "require_signal": False, "significance": 1e6, "kl_budget": 1e6},
}


@pytest.fixture(scope="module")
def completions(tiny_model: Path) -> list[Completion]:
    return sample_completions(tiny_model, arithmetic_prompts(10, seed=5), n=3, max_new_tokens=8)


def setup_loop(url: str, data_dir: Path, tiny_model: Path) -> tuple[Settings, Registry]:
    settings = Settings(
        redis_url=url,
        data_dir=data_dir,
        model=str(tiny_model),
        auto_promote=True,
        ab_share=0.0,  # promotion on the gate alone (online A/B off), as these rounds expect
        loop_config=json.dumps(LENIENT),
    )
    registry = Registry.from_settings(settings, sync_client(url))
    registry.ensure_live(tiny_model)
    return settings, registry


def crash_round(round_id: str, step: str, settings: Settings) -> None:
    """The round run by a process that is killed (SIGKILL) right after ``step``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "LOOPCHAT_REDIS_URL": str(settings.redis_url),
        "LOOPCHAT_DATA_DIR": str(settings.data_dir),
        "LOOPCHAT_MODEL": str(settings.model),
        "LOOPCHAT_AUTO_PROMOTE": "1",
        "LOOPCHAT_AB_SHARE": "0",
        "LOOPCHAT_LOOP_CONFIG": str(settings.loop_config),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.learn.crash_round", round_id, step],
        env=env,
        timeout=600,
        capture_output=True,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-3000:]


def made_by(registry: Registry, round_id: str, kind: str) -> list[dict]:
    return [m for m in registry.versions(kind) if m["info"].get("round") == round_id]


def assert_counted_once(client, total: int) -> None:
    """Every ranking consumed, acked, and counted by exactly one committed round."""
    done = [json.loads(r) for r in client.lrange(ROUNDS, 0, -1)]
    assert sum(r["rankings_new"] for r in done if r.get("status") == "done") == total
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    assert client.scard(COUNTED) == 0


def crashed(
    round_id: str, step: str, redis_url: str, data_dir: Path, tiny_model: Path, completions
) -> tuple[Settings, Registry]:
    """A loop with ``completions`` ranked whose round ``round_id`` died right after ``step``."""
    settings, registry = setup_loop(redis_url, data_dir, tiny_model)
    submit_rankings(redis_url, completions)
    crash_round(round_id, step, settings)
    return settings, registry


def test_a_kill_right_after_the_promotion_does_not_train_on_the_rankings_again(
    redis_url: str, tmp_path: Path, tiny_model: Path, completions
) -> None:
    settings, registry = crashed(
        "r-promote", "promote", redis_url, tmp_path, tiny_model, completions
    )
    client = registry.client
    time.sleep(LENIENT["lock_ttl_s"])  # the dead worker's lock lapses

    record = run_round("r-promote", settings=settings)  # the redelivered task
    assert record["status"] == "done"
    # One reward model and one candidate for the round: the rankings were trained on once.
    assert len(made_by(registry, "r-promote", "reward")) == 1
    assert len(made_by(registry, "r-promote", "rloo")) == 1
    assert registry.alias("live") == record["candidate"]
    promotions = [e for e in registry.history() if e["version"] == record["candidate"]]
    assert len(promotions) == 1
    assert_counted_once(client, len(completions))


def test_a_kill_between_commit_and_promotion_is_finished_by_the_redelivered_round(
    redis_url: str, tmp_path: Path, tiny_model: Path, completions
) -> None:
    settings, registry = crashed("r-commit", "commit", redis_url, tmp_path, tiny_model, completions)
    client = registry.client
    committed = json.loads(client.get(round_key("r-commit")))
    assert committed["promoted"] and registry.alias("live") == "v1"  # decided, not yet done
    versions = [m["version"] for m in registry.versions()]
    time.sleep(LENIENT["lock_ttl_s"])  # the redelivery comes after the dead worker's lock lapsed

    replay = run_round("r-commit", settings=settings)
    assert replay["replayed"] is True
    assert registry.alias("live") == committed["candidate"]
    assert [m["version"] for m in registry.versions()] == versions  # nothing trained again
    assert_counted_once(client, len(completions))


def test_a_round_killed_before_committing_retrains_from_where_it_started(
    redis_url: str, tmp_path: Path, tiny_model: Path, completions
) -> None:
    args = ("r-register", "register", redis_url, tmp_path, tiny_model, completions)
    settings, registry = crashed(*args)
    [dead_rm] = made_by(registry, "r-register", "reward")
    time.sleep(LENIENT["lock_ttl_s"])

    record = run_round("r-register", settings=settings)
    assert record["status"] == "done"
    redo_rm = registry.get(record["rm"]["version"])
    assert redo_rm["parent"] == dead_rm["parent"] != dead_rm["version"]
    assert_counted_once(registry.client, len(completions))


def test_a_round_survives_a_redis_restart_while_it_runs_and_counts_once(
    tmp_path: Path, tiny_model: Path, completions
) -> None:
    """Redis goes down for 4 s (longer than redis-py's own retries) while the learner trains:
    the lock renewer keeps retrying instead of dying, renews once Redis is back (the lock key
    survived in the append-only file), and the round commits. Its lock expires after 8 s and
    the learner runs longer than that, so a renewer that died would cost the round."""
    redis_server = PrivateRedis(tmp_path / "redis", fsync="always")
    try:
        settings, registry = setup_loop(redis_server.url, tmp_path / "data", tiny_model)
        slow = {**LENIENT, "lock_ttl_s": 8.0, "rloo": {**TINY["rloo"], "steps": 400}}
        config = LoopConfig.from_settings(settings, slow)
        submit_rankings(redis_server.url, completions)
        result: dict = {}

        def round_() -> None:
            result.update(run_round("r-1", config, settings))

        rounds = threading.Thread(target=round_)
        rounds.start()
        deadline = time.monotonic() + 120
        while not made_by(registry, "r-1", "reward"):
            assert time.monotonic() < deadline and rounds.is_alive(), result
            time.sleep(0.05)
        time.sleep(1.0)  # past the round's Redis reads: the learner is training
        outage = time.monotonic()
        redis_server.restart(down_s=4.0)
        rounds.join(300)
        assert result.get("status") == "done", result
        assert time.monotonic() - outage > slow["lock_ttl_s"]  # it did outlive the expiry
        client = sync_client(redis_server.url)
        assert client.exists(ROUND_LOCK) == 0
        assert_counted_once(client, len(completions))
    finally:
        redis_server.kill()


def test_a_round_skipped_for_a_busy_lock_gives_its_trigger_count_back(
    redis_url: str, tmp_path: Path, tiny_model: Path, completions
) -> None:
    settings, registry = setup_loop(redis_url, tmp_path, tiny_model)
    client = registry.client
    submit_rankings(redis_url, completions[:4], round_every=4)  # the 4th claims a round
    assert client.get(SINCE_ROUND) == "0"
    client.set(ROUND_LOCK, "another-worker", px=60_000)

    record = run_round("queued", LoopConfig.from_settings(settings), settings, claimed=4)
    assert record["skipped"] == "another round is running"
    assert client.get(SINCE_ROUND) == "4"  # the next ranking claims the round at once
    submit_rankings(redis_url, completions[4:5], round_every=4)
    assert client.get(SINCE_ROUND) == "1"
