"""The checkpoint registry on a real Redis and real checkpoint directories."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import redis

from serve.registry import (
    CHANNEL,
    METADATA_FILE,
    NoPrevious,
    NotAPolicy,
    NotGated,
    Pinned,
    PromotionRefused,
    ReasonRequired,
    Registry,
    RegistryError,
    UnknownVersion,
)
from serve.store import sync_client
from tests.serve.checkpoint_helpers import passed, poisoned, same_files, variant


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return sync_client(redis_url)


@pytest.fixture
def registry(client: redis.Redis, tmp_path: Path) -> Registry:
    return Registry(client, str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def test_register_copies_the_directory_with_its_metadata(
    registry: Registry, tiny_model: Path
) -> None:
    version = registry.register(
        tiny_model, "sft", None, {"loss": 1.5}, {"reward_model": None, "data_window": [0, 0]}
    )
    assert version == "v1"
    meta = registry.get("v1")
    assert meta["kind"] == "sft" and meta["parent"] is None and meta["metrics"] == {"loss": 1.5}
    assert meta["info"]["data_window"] == [0, 0] and meta["gate"] is None and meta["finite"]
    stored = registry.local_path("v1")
    assert json.loads((stored / METADATA_FILE).read_text())["version"] == "v1"
    assert (stored / "model.safetensors").read_bytes() == (
        tiny_model / "model.safetensors"
    ).read_bytes()


def test_policies_and_reward_models_are_numbered_separately(
    registry: Registry, tiny_model: Path
) -> None:
    assert registry.register(tiny_model, "sft", None, {}) == "v1"
    assert registry.register(tiny_model, "reward", None, {}) == "rm-1"
    assert registry.register(tiny_model, "ppo", "v1", {}, {"reward_model": "rm-1"}) == "v2"
    assert registry.register(tiny_model, "reward", "rm-1", {}) == "rm-2"
    assert [m["version"] for m in registry.versions()] == ["v1", "rm-1", "v2", "rm-2"]
    assert [m["version"] for m in registry.versions("policy")] == ["v1", "v2"]
    assert [m["version"] for m in registry.versions("reward")] == ["rm-1", "rm-2"]
    with pytest.raises(UnknownVersion):
        registry.register(tiny_model, "ppo", "v9", {})


def test_a_version_is_invisible_until_every_file_is_written(
    registry: Registry, tiny_model: Path, tmp_path: Path
) -> None:
    big = tmp_path / "big-model"
    variant(tiny_model, 1, big)
    (big / "optimizer.bin").write_bytes(b"\1" * (192 << 20))  # makes the copy take a while
    result: dict[str, str] = {}
    writer = threading.Thread(
        target=lambda: result.update(v=registry.register(big, "sft", None, {}))
    )
    store = Path(registry.root)
    writer.start()
    seen_partial = False
    while writer.is_alive():
        partial = list(store.glob(".tmp-*")) if store.exists() else []
        if partial and writer.is_alive():
            visible = registry.versions()
            if not visible:
                seen_partial = True
            else:  # the rename and the Redis mark happened between our two looks
                assert same_files(big, registry.local_path(visible[0]["version"]))
        time.sleep(0.001)
    writer.join()
    assert seen_partial, "the copy was never observed in progress"
    assert [m["version"] for m in registry.versions()] == [result["v"]]
    stored = registry.local_path(result["v"])
    assert not list(store.glob(".tmp-*"))
    assert same_files(big, stored) and (stored / METADATA_FILE).is_file()


def test_promote_and_rollback_move_the_aliases_and_keep_history(
    registry: Registry, tiny_model: Path
) -> None:
    live, _ = registry.ensure_live(tiny_model)
    assert live == "v1" and registry.aliases() == {
        "live": "v1",
        "candidate": None,
        "previous": None,
    }
    v2 = passed(registry, registry.register(tiny_model, "ppo", "v1", {"kl": 0.01}))
    registry.set_candidate(v2)
    assert registry.alias("candidate") == "v2"
    registry.promote(v2, by="alice", reason="better on held-out rankings")
    assert registry.aliases() == {"live": "v2", "candidate": None, "previous": "v1"}
    registry.promote(v2, by="alice", reason="again")  # already live: nothing changes
    v3 = passed(registry, registry.register(tiny_model, "ppo", "v2", {}))
    registry.promote(v3, by="bob", reason="next round")
    assert registry.rollback(by="carol", reason="users complain") == "v2"
    assert registry.aliases() == {"live": "v2", "candidate": None, "previous": "v1"}
    assert registry.rollback(by="carol", reason="still bad") == "v1"
    assert registry.alias("previous") is None
    with pytest.raises(NoPrevious):
        registry.rollback(by="carol", reason="nothing left")
    history = registry.history()
    assert [(h["action"], h["version"], h["from"], h["by"]) for h in history] == [
        ("bootstrap", "v1", None, "bootstrap"),
        ("promote", "v2", "v1", "alice"),
        ("promote", "v3", "v2", "bob"),
        ("rollback", "v2", "v3", "carol"),
        ("rollback", "v1", "v2", "carol"),
    ]
    assert history[1]["reason"] == "better on held-out rankings"
    assert all(a["time"] <= b["time"] for a, b in zip(history, history[1:], strict=False))


def test_non_finite_weights_never_go_live_even_forced(
    registry: Registry, tiny_model: Path, tmp_path: Path
) -> None:
    registry.ensure_live(tiny_model)
    bad = registry.register(poisoned(tiny_model, 2, tmp_path / "nan"), "ppo", "v1", {})
    assert registry.get(bad)["finite"] is False
    registry.record_gate(bad, {"passed": True, "reasons": []})
    for force in (False, True):
        with pytest.raises(PromotionRefused, match="non-finite"):
            registry.promote(bad, by="op", reason="try", force=force)
    assert registry.alias("live") == "v1" and len(registry.history()) == 1


def test_a_failed_gate_blocks_promotion_unless_forced(registry: Registry, tiny_model: Path) -> None:
    registry.ensure_live(tiny_model)
    v2 = registry.register(tiny_model, "ppo", "v1", {})
    registry.record_gate(v2, {"passed": False, "reasons": ["KL 0.9 over budget 0.2"]})
    assert registry.get(v2)["gate"]["reasons"] == ["KL 0.9 over budget 0.2"]
    with pytest.raises(PromotionRefused, match="KL 0.9 over budget"):
        registry.promote(v2, by="op", reason="try")
    registry.promote(v2, by="op", reason="I know better", force=True)
    assert registry.alias("live") == "v2"


def test_a_version_without_a_gate_result_is_never_candidate_nor_live_unless_forced(
    registry: Registry, tiny_model: Path
) -> None:
    registry.ensure_live(tiny_model)
    v2 = registry.register(tiny_model, "ppo", "v1", {})
    with pytest.raises(NotGated):
        registry.set_candidate(v2)
    with pytest.raises(NotGated, match="no gate result"):
        registry.promote(v2, by="op", reason="looks fine")
    with pytest.raises(ReasonRequired):
        registry.promote(v2, by="op", reason=" ", force=True)
    with pytest.raises(RegistryError):  # no automatic caller can force
        registry.promote(v2, by="loop", reason="r", force=True, automatic=True)
    assert registry.aliases() == {"live": "v1", "candidate": None, "previous": None}
    registry.promote(v2, by="op", reason="hotfix, gate skipped", force=True)
    last = registry.history()[-1]
    assert (last["version"], last["by"], last["forced"]) == ("v2", "op", True)
    assert last["reason"] == "hotfix, gate skipped"
    v3 = passed(registry, registry.register(tiny_model, "ppo", "v2", {}))
    registry.promote(v3, by="op", reason="gate passed")
    assert registry.history()[-1]["forced"] is False


def test_a_rollback_pins_live_against_automatic_promotion_until_an_operator_lifts_it(
    registry: Registry, tiny_model: Path
) -> None:
    registry.ensure_live(tiny_model)
    v2, v3, v4 = (passed(registry, registry.register(tiny_model, "ppo", "v1", {})) for _ in "abc")
    registry.promote(v2, by="loop", reason="round 1", automatic=True)
    registry.rollback(by="carol", reason="users complain")
    assert registry.pin()["version"] == "v1" and registry.pin()["by"] == "carol"
    with pytest.raises(Pinned, match="carol"):
        registry.promote(v3, by="loop", reason="round 2", automatic=True)
    assert registry.alias("live") == "v1"
    assert registry.unpin(by="carol", reason="fixed")["version"] == "v1"
    assert registry.pin() is None and registry.history()[-1]["action"] == "unpin"
    registry.promote(v3, by="loop", reason="round 2", automatic=True)
    assert registry.alias("live") == "v3"
    registry.rollback(by="dan", reason="again")
    registry.promote(v4, by="dan", reason="my pick")  # an operator's promotion lifts the pin
    assert registry.pin() is None and registry.alias("live") == "v4"
    assert registry.unpin(by="dan", reason="nothing pinned") is None


def test_reward_models_and_unknown_versions_are_refused(
    registry: Registry, tiny_model: Path
) -> None:
    rm = registry.register(tiny_model, "reward", None, {})
    with pytest.raises(NotAPolicy):
        registry.promote(rm, by="op", reason="no")
    with pytest.raises(NotAPolicy):
        registry.set_candidate(rm)
    for name in ("v7", "latest"):
        with pytest.raises(UnknownVersion):
            registry.promote(name, by="op", reason="no")
    assert registry.get("v7") is None and registry.alias("live") is None


def test_alias_changes_are_announced(
    registry: Registry, client: redis.Redis, tiny_model: Path
) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    registry.ensure_live(tiny_model)
    registry.set_candidate(passed(registry, registry.register(tiny_model, "ppo", "v1", {})))
    registry.promote("v2", by="op", reason="r")
    registry.rollback(by="op", reason="r")
    messages = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and len(messages) < 8:
        if (m := pubsub.get_message(timeout=0.1)) is not None:
            messages.append(json.loads(m["data"]))
    pubsub.close()
    live_changes = [m["version"] for m in messages if m["alias"] == "live"]
    assert live_changes == ["v1", "v2", "v1"]
    assert {"alias": "candidate", "version": "v2"} in messages
    assert {"alias": "candidate", "version": None} in messages


def test_prune_keeps_the_last_n_and_every_alias(registry: Registry, tiny_model: Path) -> None:
    registry.ensure_live(tiny_model)  # v1, the SFT reference
    for n in range(2, 9):
        passed(registry, registry.register(tiny_model, "ppo", f"v{n - 1}", {}))
    registry.promote("v3", by="op", reason="r")  # previous = v1
    registry.promote("v4", by="op", reason="r")  # previous = v3
    registry.set_candidate("v5")
    for _ in range(4):
        registry.register(tiny_model, "reward", None, {})
    deleted = registry.prune(keep=2)
    assert sorted(deleted) == ["rm-1", "rm-2", "v2", "v6"]
    kept = [m["version"] for m in registry.versions()]
    assert kept == ["v1", "v3", "v4", "v5", "v7", "v8", "rm-3", "rm-4"]
    assert not (Path(registry.root) / "v2").exists() and (Path(registry.root) / "v3").exists()
    assert registry.get("v2") is None
    assert registry.rollback(by="op", reason="r") == "v3"


def test_a_registry_with_keep_prunes_after_every_registration(
    client: redis.Redis, tiny_model: Path, tmp_path: Path
) -> None:
    registry = Registry(client, str(tmp_path / "store"), tmp_path / "cache", keep=2)
    registry.ensure_live(tiny_model)
    for _ in range(4):  # v2..v5
        registry.register(tiny_model, "ppo", "v1", {})
    assert [m["version"] for m in registry.versions()] == ["v1", "v4", "v5"]
    assert sorted(p.name for p in Path(registry.root).iterdir()) == ["v1", "v4", "v5"]


def test_a_remote_store_is_fetched_once_into_the_local_cache(
    client: redis.Redis, tiny_model: Path, tmp_path: Path
) -> None:
    registry = Registry(client, "memory://loopchat-test/store", cache_dir=tmp_path / "cache")
    assert not registry.is_local
    version = registry.register(tiny_model, "sft", None, {})
    local = registry.local_path(version)
    assert local == tmp_path / "cache" / version
    assert json.loads((local / METADATA_FILE).read_text())["version"] == version
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (local / name).read_bytes() == (tiny_model / name).read_bytes()
    mtime = (local / "model.safetensors").stat().st_mtime_ns
    assert registry.local_path(version) == local
    assert (local / "model.safetensors").stat().st_mtime_ns == mtime
    registry.fs.rm(registry.root, recursive=True)


def test_processes_starting_together_bootstrap_one_live_version(
    redis_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    results: list[tuple[str, Path]] = []

    def start() -> None:
        registry = Registry(sync_client(redis_url), str(tmp_path / "store"), tmp_path / "cache")
        results.append(registry.ensure_live(tiny_model))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {version for version, _ in results} == {"v1"}
    registry = Registry(sync_client(redis_url), str(tmp_path / "store"), tmp_path / "cache")
    assert [m["version"] for m in registry.versions()] == ["v1"]
