"""Learning rounds on real Redis and a real registry: each ranking counted once, one round at a
time, and what a dead worker left behind picked up by the next round."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import redis

from learn.learner import LEARNERS, load_state
from learn.loop import LoopConfig, round_history, run_round
from serve.events import (
    COUNTED,
    GROUP,
    LAST_ID,
    ROUND_LOCK,
    ROUNDS,
    STREAM,
    UNUSABLE,
    FeedbackLog,
)
from serve.registry import Registry
from serve.settings import Settings
from serve.store import Completion, sync_client
from tests.learn.loop_helpers import (
    TINY,
    arithmetic_prompts,
    sample_completions,
    submit_rankings,
)


@pytest.fixture(scope="module")
def completions(tiny_model: Path) -> list[Completion]:
    """What the tiny model answered to 16 prompts, 3 candidates each."""
    return sample_completions(tiny_model, arithmetic_prompts(16), n=3, max_new_tokens=8)


@pytest.fixture
def loop(redis_url: str, tmp_path: Path, tiny_model: Path):
    """Settings, a Redis client and a registry whose live policy is the tiny model."""
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, model=str(tiny_model))
    client = sync_client(redis_url)
    registry = Registry.from_settings(settings, client)
    registry.ensure_live(tiny_model)
    yield settings, client, registry
    client.close()


def fresh(completions: list[Completion]) -> list[Completion]:
    """The same answers as new completions (a completion can be ranked once per user)."""
    return [
        Completion(
            id=f"{c.id}-{time.monotonic_ns()}",
            messages=c.messages,
            candidates=c.candidates,
            version=c.version,
            user=c.user,
        )
        for c in completions
    ]


def stream_ids(client: redis.Redis) -> list[str]:
    return [entry_id for entry_id, _ in client.xrange(STREAM)]


def pending(client: redis.Redis) -> int:
    return client.xpending(STREAM, GROUP)["pending"]


def test_a_round_counts_each_new_ranking_once_and_leaves_a_gated_candidate(
    loop, completions, redis_url
) -> None:
    settings, client, registry = loop
    config = LoopConfig.from_settings(settings, TINY)
    submit_rankings(redis_url, fresh(completions[:12]))
    ids = stream_ids(client)

    first = run_round("round-1", config, settings)
    assert first["status"] == "done"
    assert first["rankings_new"] == 12
    assert first["stream"] == {"first": ids[0], "last": ids[-1], "count": 12}
    assert client.get(LAST_ID) == ids[-1]
    assert pending(client) == 0
    candidate = registry.get(first["candidate"])
    assert candidate["kind"] == config.learner == "rloo" and candidate["parent"] == "v1"
    assert candidate["info"]["reward_model"] == first["rm"]["version"] == "rm-1"
    assert registry.alias("candidate") == first["candidate"]
    assert candidate["gate"]["passed"] == first["gate"]["passed"]
    assert registry.alias("live") == "v1"  # auto_promote is off: the candidate waits

    assert run_round("round-2", config, settings)["skipped"].startswith("0 new rankings")

    submit_rankings(redis_url, fresh(completions[12:15]))
    third = run_round("round-3", config, settings)
    assert third["rankings_new"] == 3 and third["rankings_total"] == 15
    assert third["rm"]["version"] == "rm-2" and third["rm"]["warm_start"] is True
    rounds = [json.loads(r)["round"] for r in client.lrange(ROUNDS, 0, -1)]
    assert rounds == ["round-1", "round-3"]


def test_on_policy_prompts_come_from_the_round_s_rankings_but_the_held_out_ones(
    loop, completions, redis_url
) -> None:
    settings, client, registry = loop
    config = LoopConfig.from_settings(settings, {**TINY, "learner": "ppo", "max_prompts": 20})
    submit_rankings(redis_url, fresh(completions[:12]))
    distinct = {json.dumps(c.messages) for c in completions[:12]}

    record = run_round("round-wide", config, settings)
    window = record["data_window"]
    assert window["train"] + window["heldout"] == 12 and window["heldout"] == 1
    assert registry.get(record["candidate"])["info"]["prompts"] == len(distinct) - 1


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_each_learner_runs_a_round_chosen_by_its_setting_alone(
    name, redis_url, tmp_path, tiny_model, completions
) -> None:
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, model=str(tiny_model), learner=name)
    client = sync_client(redis_url)
    registry = Registry.from_settings(settings, client)
    registry.ensure_live(tiny_model)
    submit_rankings(redis_url, fresh(completions[:6]))

    record = run_round(f"round-{name}", LoopConfig.from_settings(settings, TINY), settings)
    assert record["learner"] == record["policy"]["learner"] == name
    assert registry.get(record["candidate"])["kind"] == name
    assert "kl_to_sft" in record["gate"] and record["gate"]["reason"]
    client.close()


def test_the_next_round_continues_from_the_last_candidate_even_unpromoted(
    loop, completions, redis_url
) -> None:
    settings, client, registry = loop
    config = LoopConfig.from_settings(settings, TINY)
    submit_rankings(redis_url, fresh(completions[:8]))
    first = run_round("first", config, settings)
    assert registry.alias("live") == "v1" and first["start"] == "v1"
    assert load_state(registry.local_path(first["candidate"]))["learner"] == config.learner

    submit_rankings(redis_url, fresh(completions[8:12]))
    second = run_round("second", config, settings)
    assert second["start"] == first["candidate"] and second["live"] == "v1"
    assert registry.get(second["candidate"])["info"]["continued"] is True
    assert registry.get(second["candidate"])["parent"] == first["candidate"]


def test_an_operator_rollback_restarts_learning_from_live(loop, completions, redis_url) -> None:
    settings, client, registry = loop
    config = LoopConfig.from_settings(settings, TINY)
    submit_rankings(redis_url, fresh(completions[:8]))
    first = run_round("first", config, settings)
    registry.promote(first["candidate"], by="op", reason="try it", force=True)
    registry.rollback(by="op", reason="worse in practice")

    submit_rankings(redis_url, fresh(completions[8:12]))
    second = run_round("second", config, settings)
    assert second["start"] == "v1"
    assert registry.get(second["candidate"])["info"]["continued"] is False


def test_auto_promote_waits_while_an_operator_rollback_pins_live(
    loop, completions, redis_url
) -> None:
    settings, client, registry = loop
    settings = settings.model_copy(update={"auto_promote": True, "ab_share": 0.0})  # gate alone
    lenient = {"kl_budget": 1e9, "significance": 1e9, "require_signal": False}
    config = LoopConfig.from_settings(settings, {**TINY, "gate": {**TINY["gate"], **lenient}})
    submit_rankings(redis_url, fresh(completions[:6]))
    first = run_round("first", config, settings)
    assert first["promoted"] and registry.alias("live") == first["candidate"]
    registry.rollback(by="op", reason="worse in practice")

    submit_rankings(redis_url, fresh(completions[6:12]))
    second = run_round("second", config, settings)
    assert second["gate"]["passed"] and not second["promoted"]
    assert "pinned" in second["promote_refused"] and registry.alias("live") == "v1"
    assert registry.alias("candidate") == second["candidate"]  # waiting for the operator

    registry.unpin(by="op", reason="fixed the prompts")
    submit_rankings(redis_url, fresh(completions[12:16]))
    third = run_round("third", config, settings)
    assert third["promoted"] and registry.alias("live") == third["candidate"]


def test_held_out_rankings_are_trained_on_in_the_next_round(loop, completions, redis_url) -> None:
    settings, client, _ = loop
    config = LoopConfig.from_settings(settings, {**TINY, "heldout_fraction": 0.25})
    submit_rankings(redis_url, fresh(completions[:8]))
    first = run_round("first", config, settings)
    assert first["data_window"]["train"] == 6 and first["data_window"]["heldout"] == 2

    submit_rankings(redis_url, fresh(completions[8:12]))
    second = run_round("second", config, settings)
    # the 4 new ones and the 2 the first round held out: each trained on exactly once
    assert second["data_window"]["train"] + second["data_window"]["heldout"] == 6
    assert second["data_window"]["replay"] == 6  # the reward model also sees the older ones


def test_a_round_reads_its_new_rankings_the_carried_ones_and_a_recent_window_only(
    loop, completions, redis_url
) -> None:
    """Not the whole stream: what a round knows is bounded by its own size."""
    _, client, _ = loop
    submit_rankings(redis_url, fresh(completions[:16]))
    ids = stream_ids(client)
    feedback = FeedbackLog(client)
    feedback.ack([entry_id for entry_id, _ in feedback.read_new("w", count=10)])
    new = feedback.read_new("w", count=100)  # 10..15

    known = round_history(feedback, new, {ids[2]}, window=3)
    assert [entry_id for entry_id, _ in known] == [ids[2], *ids[10:]]
    assert [entry_id for entry_id, _ in round_history(feedback, new, set(), 8)] == ids[8:]


def test_a_round_replays_from_its_window_and_trims_the_stream_to_the_retention(
    loop, completions, redis_url, tiny_model, tmp_path
) -> None:
    _, client, _ = loop
    settings = Settings(
        redis_url=redis_url, data_dir=tmp_path, model=str(tiny_model), feedback_retention=4
    )
    config = LoopConfig.from_settings(
        settings, {**TINY, "heldout_fraction": 0.25, "history_window": 7}
    )
    submit_rankings(redis_url, fresh(completions[:8]))
    ids = stream_ids(client)
    first = run_round("first", config, settings)
    assert first["data_window"]["heldout"] == 2  # ids 6, 7: kept for the next round
    assert stream_ids(client) == ids[4:]  # 0..3 consumed and beyond the newest 4: trimmed

    submit_rankings(redis_url, fresh(completions[8:12]))
    ids = stream_ids(client)  # 4..11
    second = run_round("second", config, settings)
    assert second["data_window"]["train"] + second["data_window"]["heldout"] == 6
    assert second["data_window"]["replay"] == 1  # of 4, 5 only 5 is among the newest 7
    assert second["rankings_total"] == 12  # all-time, trimmed ones included
    assert stream_ids(client) == ids[4:] and FeedbackLog(client).total() == 12


def test_rankings_that_order_nothing_are_consumed_and_counted_by_reason(
    loop, completions, redis_url
) -> None:
    settings, client, _ = loop
    config = LoopConfig.from_settings(settings, TINY)
    submit_rankings(redis_url, fresh(completions[:6]))
    submit_rankings(redis_url, fresh(completions[6:9]), rank=lambda c: [list(range(len(c)))])

    record = run_round("mixed", config, settings)
    assert record["rankings_new"] == 9
    assert record["rankings_unusable"] == {"all_tied": 3}
    assert record["data_window"]["train"] + record["data_window"]["heldout"] == 6
    assert client.hgetall(UNUSABLE) == {"all_tied": "3"}
    assert pending(client) == 0


def test_a_redelivered_round_returns_its_record_without_training_again(
    loop, completions, redis_url
) -> None:
    settings, client, registry = loop
    config = LoopConfig.from_settings(settings, TINY)
    submit_rankings(redis_url, fresh(completions[:6]))
    first = run_round("task-42", config, settings)
    versions = [v["version"] for v in registry.versions()]

    again = run_round("task-42", config, settings)
    assert again["replayed"] is True
    assert again["candidate"] == first["candidate"]
    assert [v["version"] for v in registry.versions()] == versions
    assert client.llen(ROUNDS) == 1


def test_rankings_committed_just_before_a_crash_are_not_counted_again(
    loop, completions, redis_url, monkeypatch
) -> None:
    settings, client, _ = loop
    config = LoopConfig.from_settings(settings, TINY)
    submit_rankings(redis_url, fresh(completions[:8]))

    def crash(self, ids):  # the worker dies after the commit, before acking
        raise ConnectionError("worker lost")

    with monkeypatch.context() as patch:
        patch.setattr(FeedbackLog, "ack", crash)
        with pytest.raises(ConnectionError):
            run_round("crashing", config, settings)
    assert pending(client) == 8 and client.scard(COUNTED) == 8

    submit_rankings(redis_url, fresh(completions[8:10]))
    after = run_round("next", config, settings)
    assert after["rankings_new"] == 2  # the 8 redelivered ones were already counted
    assert pending(client) == 0 and client.scard(COUNTED) == 0


def test_a_dead_consumers_pending_rankings_are_reclaimed(loop, completions, redis_url) -> None:
    settings, client, _ = loop
    submit_rankings(redis_url, fresh(completions[:10]))
    dead = FeedbackLog(client)
    assert len(dead.read_new("dead-worker", count=4)) == 4  # read, never acked: it died

    record = run_round("after-death", LoopConfig.from_settings(settings, TINY), settings)
    assert record["rankings_new"] == 10
    assert pending(client) == 0
    consumers = {c["name"]: c["pending"] for c in client.xinfo_consumers(STREAM, GROUP)}
    assert consumers["dead-worker"] == 0


def test_only_one_round_runs_at_a_time_and_its_lock_is_renewed(
    loop, completions, redis_url
) -> None:
    settings, client, registry = loop
    # A lock that expires in 0.6 s: the round outlives it many times over, so it must renew it.
    config = LoopConfig.from_settings(settings, {**TINY, "lock_ttl_s": 0.6})
    submit_rankings(redis_url, fresh(completions[:8]))
    start = threading.Barrier(2)
    results: list[dict] = []

    def worker(name: str) -> None:
        start.wait()
        results.append(run_round(name, config, settings))

    threads = [threading.Thread(target=worker, args=(f"r{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in results if r.get("status") == "done"]
    skipped = [r for r in results if "skipped" in r]
    assert len(done) == 1 and len(skipped) == 1
    assert skipped[0]["skipped"] == "another round is running"
    assert done[0]["rankings_new"] == 8
    assert len(registry.versions(config.learner)) == 1
    assert client.exists(ROUND_LOCK) == 0


def test_a_lock_left_by_a_dead_round_lapses(loop, completions, redis_url) -> None:
    settings, client, _ = loop
    config = LoopConfig.from_settings(settings, TINY)
    submit_rankings(redis_url, fresh(completions[:6]))
    client.set(ROUND_LOCK, "token-of-a-dead-worker", px=500)

    assert run_round("blocked", config, settings)["skipped"] == "another round is running"
    time.sleep(0.6)
    assert run_round("unblocked", config, settings)["status"] == "done"


def test_a_candidate_in_ab_keeps_its_place_and_auto_promote_leaves_it_to_the_users(
    loop, completions, redis_url, tiny_model
) -> None:
    settings, client, registry = loop
    settings = settings.model_copy(update={"auto_promote": True, "ab_share": 0.5})
    under_test = registry.register(tiny_model, "rloo", "v1", {})
    registry.record_gate(under_test, {"passed": True, "reasons": []})
    registry.set_candidate(under_test)
    submit_rankings(redis_url, fresh(completions[:12]))

    record = run_round("round-ab", LoopConfig.from_settings(settings, TINY), settings)
    assert record["status"] == "done" and record["ab_under_test"] == under_test
    assert record["candidate"] != under_test and registry.alias("candidate") == under_test
    assert registry.get(record["candidate"])["gate"] == record["gate"]  # still gated
    assert record["promoted"] is False and registry.alias("live") == "v1"
