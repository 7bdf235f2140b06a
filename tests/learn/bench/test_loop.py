"""``bench loop``'s verdict: the targets read off a measured learning curve and its rounds."""

from __future__ import annotations

from learn.bench.loop import verdict


def point(rankings: int, rate: float, version: str = "v1") -> dict:
    return {"rankings": rankings, "version": version, "rate": rate, "answers": 100}


def round_row(rankings: int, promoted: bool, kl: float, to_live: float | None) -> dict:
    return {"rankings": rankings, "promoted": promoted, "kl_to_sft": kl,
            "last_ranking_to_live_s": to_live}  # fmt: skip


def test_the_best_rate_within_1000_rankings_counts_and_later_points_do_not() -> None:
    measured = {
        "curve": [point(0, 0.5), point(512, 0.72, "v3"), point(1024, 0.9, "v5")],
        "rounds": [round_row(512, True, 1.0, 40.0), round_row(1024, True, 2.0, 130.0)],
        "greedy": {"start": point(0, 0.7), "end": point(0, 0.8, "v5")},
    }
    result = verdict(measured, kl_budget=6.0)
    assert result["best_rate_within_1000"] == 0.72 and result["best_at_rankings"] == 512
    assert round(result["gain_points_within_1000"], 6) == 22.0
    assert round(result["greedy_headroom_points"], 6) == 20.0
    assert result["final_rate"] == 0.9
    assert result["targets"] == {
        "live_within_120s": False,  # one round took 130 s
        "gain_20_points_within_1000": True,
        "kl_within_budget": True,
    }


def test_a_promoted_round_over_the_kl_budget_fails_that_target() -> None:
    measured = {
        "curve": [point(0, 0.5), point(128, 0.55, "v2")],
        "rounds": [round_row(128, True, 7.5, 30.0), round_row(256, False, 9.0, None)],
        "greedy": {"start": point(0, 0.7), "end": point(0, 0.7, "v2")},
    }
    result = verdict(measured, kl_budget=6.0)
    assert result["kl_to_sft_max_promoted"] == 7.5
    assert result["targets"]["kl_within_budget"] is False
    assert result["targets"]["gain_20_points_within_1000"] is False
    assert result["last_ranking_to_live_s"] == {"max": 30.0, "median": 30.0}
