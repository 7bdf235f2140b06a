"""Online A/B's state on a real Redis and registry: the mixed-ranking record the feedback
script appends, the leaderboard, and the referee's promote / retire (``serve/ab.py``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from serve.ab import (
    DECISIONS,
    LOCK,
    RANKINGS,
    Referee,
    eligible_candidate,
    leaderboard,
    mixed_record,
)
from serve.cli import main as loopchat
from serve.feedback import FeedbackService
from serve.protocol import ErrorResponse, FeedbackRequest
from serve.registry import Registry
from serve.settings import Settings
from serve.store import Completion, CompletionStore, async_client, sync_client
from tests.serve.checkpoint_helpers import variant


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        auto_promote=True,
        ab_min_rankings=10,
        ab_max_rankings=500,
    )


@pytest.fixture
def registry(settings: Settings, redis_url: str, tiny_model: Path, tmp_path: Path) -> Registry:
    """``v1`` live, ``v2`` (another seed) the candidate with a passed gate."""
    registry = Registry.from_settings(settings, sync_client(redis_url))
    registry.ensure_live(tiny_model)
    v2 = registry.register(variant(tiny_model, 2, tmp_path / "v2"), "rloo", "v1", {})
    registry.record_gate(v2, {"passed": True, "reasons": []})
    registry.set_candidate(v2)  # the candidate alias names gated versions only
    return registry


def record(registry: Registry, ranking: list[list[int]], versions: list[str]) -> None:
    registry.client.rpush(RANKINGS, mixed_record("fb-x", ranking, versions))


def test_only_a_candidate_that_passed_its_gate_enters_mixed_slates(
    registry: Registry, settings: Settings, tiny_model: Path, tmp_path: Path
) -> None:
    assert eligible_candidate(registry, settings) == "v2"
    assert eligible_candidate(registry, settings.model_copy(update={"ab_share": 0.0})) is None
    v3 = registry.register(variant(tiny_model, 3, tmp_path / "v3"), "rloo", "v1", {})
    registry.record_gate(v3, {"passed": False, "reasons": ["KL over budget"]})
    registry.set_candidate(v3)
    assert eligible_candidate(registry, settings) is None
    assert Referee(registry, settings).step() is None


def test_a_ranking_of_a_mixed_slate_leaves_its_pairs_beside_the_event(
    registry: Registry, settings: Settings, redis_url: str
) -> None:
    async def run() -> tuple[object, object]:
        client = async_client(redis_url)
        try:
            completion = Completion(
                id="chatcmpl-ab",
                messages=[{"role": "user", "content": "hi"}],
                candidates=["a", "b", "c", "d"],
                version="v1",
                versions=["v2", "v1", "v1", "v2"],
            )
            await CompletionStore(client, 60).save(completion)
            service = FeedbackService(client, settings, on_mixed_ranking=lambda: None)
            request = FeedbackRequest(completion_id="chatcmpl-ab", ranking=[0, [1, 3], 2], user="u")
            return await service.submit(request, "key:u"), await service.submit(request, "key:u")
        finally:
            await client.aclose()

    first, again = asyncio.run(run())
    assert not isinstance(first, ErrorResponse)
    assert isinstance(again, ErrorResponse) and again.status_code == 409
    [raw] = registry.client.lrange(RANKINGS, 0, -1)  # the duplicate left nothing
    stored = json.loads(raw)
    assert stored["id"] == first.id
    # v2 (0) beat v1 (1, 2); v2 (3) tied v1 (1) and beat v1 (2)
    assert stored["pairs"] == [["v1", "v2", 0.0, 3.0, 1.0]]


def test_leaderboard_ranks_versions_with_intervals_and_win_rates_against_live(
    registry: Registry, settings: Settings
) -> None:
    for _ in range(30):
        record(registry, [[0], [1], [2], [3]], ["v2", "v1", "v2", "v1"])  # v2 wins 3 of 4
        record(registry, [[0], [1]], ["v1", "v2"])  # v1 wins
    board = leaderboard(registry, settings, resamples=200)
    assert board["live"] == "v1" and board["candidate"] == "v2" and board["mixed_rankings"] == 60
    rows = {row["version"]: row for row in board["versions"]}
    assert [row["version"] for row in board["versions"]] == ["v2", "v1"]  # strongest first
    assert rows["v1"]["strength"] == 0.0 and rows["v1"]["win_rate_vs_live"] is None
    v2 = rows["v2"]
    assert v2["comparisons"] == 150 and rows["v1"]["comparisons"] == 150
    assert v2["interval"][0] < v2["strength"] < v2["interval"][1]
    # the pair record is 90-60; ranking scores average (0.75 + 0) / 2
    assert v2["win_rate_vs_live"]["pairs"] == {"wins": 90, "losses": 60, "ties": 0}
    assert v2["win_rate_vs_live"]["estimate"] == pytest.approx(0.375)
    low, high = v2["win_rate_vs_live"]["interval"]
    assert low < 0.375 < high
    test = board["test"]
    assert test["candidate"] == "v2" and test["rankings"] == 60 and test["action"] == "wait"
    assert test["trace"]["rankings"][-1] == 60


def test_referee_promotes_a_preferred_candidate_and_history_keeps_the_evidence(
    registry: Registry, settings: Settings
) -> None:
    referee = Referee(registry, settings)
    for _ in range(5):
        record(registry, [[0], [1]], ["v2", "v1"])
    assert referee.step() is None  # fewer than ab_min_rankings
    for _ in range(30):
        record(registry, [[0], [1]], ["v2", "v1"])
    with registry.client.lock(LOCK, timeout=10):  # another replica's referee is deciding
        assert referee.step() is None and registry.alias("live") == "v1"
    decision = referee.step()
    assert decision is not None and decision["action"] == "promote"
    assert decision["decided_at"] >= 10 and decision["interval"][0] >= 0.5
    assert registry.aliases()["live"] == "v2" and registry.alias("candidate") is None
    last = registry.history()[-1]
    assert (last["action"], last["version"], last["by"]) == ("promote", "v2", "ab")
    assert "win rate 1.000" in last["reason"] and "35 mixed rankings" in last["reason"]
    assert json.loads(registry.client.lindex(DECISIONS, -1))["pairs"]["wins"] == 35
    assert referee.step() is None  # nothing left to test


def test_referee_retires_a_worse_candidate_and_live_stays(
    registry: Registry, settings: Settings
) -> None:
    for _ in range(30):
        record(registry, [[0], [1]], ["v1", "v2"])
    decision = Referee(registry, settings).step()
    assert decision is not None and decision["action"] == "retire"
    assert registry.alias("live") == "v1" and registry.alias("candidate") is None
    assert registry.history()[-1]["action"] == "bootstrap"  # live never changed


def test_referee_only_reports_while_auto_promote_is_off(
    registry: Registry, settings: Settings
) -> None:
    for _ in range(30):
        record(registry, [[0], [1]], ["v2", "v1"])
    manual = settings.model_copy(update={"auto_promote": False})
    assert Referee(registry, manual).step() is None
    assert registry.alias("live") == "v1"
    _, _, verdict = Referee(registry, manual).verdict()
    assert verdict.action == "promote"  # what the operator sees on the leaderboard


def test_cli_prints_the_leaderboard_and_its_json(
    registry: Registry,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LOOPCHAT_REDIS_URL", str(settings.redis_url))  # the CLI reads the env
    monkeypatch.setenv("LOOPCHAT_DATA_DIR", str(settings.data_dir))
    for _ in range(12):
        record(registry, [[0], [1]], ["v2", "v1"])
    assert loopchat(["leaderboard"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("12 mixed rankings") and "live (v1)" in lines[0]
    assert lines[2].split()[0] == "v2" and lines[3].split()[:2] == ["v1", "+0.000"]
    assert "1.000 [" in lines[2] and "over 12 rankings" in lines[2]
    assert lines[4].startswith("test v2 vs v1:")
    assert loopchat(["leaderboard", "--json"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert [row["version"] for row in board["versions"]] == ["v2", "v1"]


def test_strengths_stay_relative_to_a_compared_version_when_live_has_no_pairs(
    registry: Registry, settings: Settings, tiny_model: Path, tmp_path: Path
) -> None:
    for _ in range(10):
        record(registry, [[0], [1]], ["v2", "v1"])
    v3 = registry.register(variant(tiny_model, 3, tmp_path / "v3"), "rloo", "v1", {})
    registry.record_gate(v3, {"passed": True, "reasons": []})
    registry.promote(v3, by="test", reason="an operator's choice, never compared")
    board = leaderboard(registry, settings, resamples=50)
    assert board["live"] == "v3" and board["anchor"] in {"v1", "v2"}
    assert [row["version"] for row in board["versions"]] == ["v2", "v1", "v3"]
    last = board["versions"][-1]
    assert last["strength"] is None and last["comparisons"] == 0
    assert board["versions"][0]["win_rate_vs_live"] is None  # never met live
