"""The ops page's leaderboard panel, drawn from a real leaderboard (real Redis and registry)."""

from __future__ import annotations

from pathlib import Path

from serve.ab import RANKINGS, leaderboard, mixed_record
from serve.registry import Registry
from serve.settings import Settings
from serve.store import sync_client
from ui.ops import leaderboard_figure, leaderboard_summary


def test_leaderboard_panel_shows_strengths_and_the_candidates_test(
    tiny_model: Path, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, ab_min_rankings=50)
    registry = Registry.from_settings(settings, sync_client(redis_url))
    registry.ensure_live(tiny_model)
    v2 = registry.register(tiny_model, "rloo", "v1", {})
    registry.record_gate(v2, {"passed": True, "reasons": []})
    registry.set_candidate(v2)
    empty = leaderboard(registry, settings)
    assert "Mixed rankings:** 0" in leaderboard_summary(empty)
    leaderboard_figure(empty)  # no comparisons yet: empty panels, no error
    for ranking in ([[0], [1]], [[1], [0]], [[0], [1]]):
        registry.client.rpush(RANKINGS, mixed_record("fb", ranking, ["v2", "v1"]))
    board = leaderboard(registry, settings, resamples=50)
    text = leaderboard_summary(board)
    assert "v2 vs v1: win rate 0.667" in text and "over 3 mixed rankings" in text
    assert "47 more rankings needed" in text
    strengths, test = leaderboard_figure(board).axes
    assert [t.get_text() for t in strengths.get_yticklabels()] == ["v1", "v2"]
    assert "v2 vs live" in test.get_title()
    assert len(test.lines[0].get_xdata()) == 3  # one point per mixed ranking
