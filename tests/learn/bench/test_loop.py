"""``bench loop``'s arithmetic: the arms it plans, the paired gain, the eval subset, the verdict."""

from __future__ import annotations

import argparse

import pytest

from learn.bench.loop import NO_FEEDBACK, curve_subset, gain, markdown_table, plan, verdict
from learn.errors import LearnError


def args(**overrides: str) -> argparse.Namespace:
    return argparse.Namespace(
        **{
            "learners": "dpo,bon",
            "preferences": "correctness,brevity",
            "controls": "shuffled,none",
            **overrides,
        }  # fmt: skip
    )


def test_every_learner_meets_every_preference_and_the_controls_run_once() -> None:
    arms = plan(args())
    assert [a.name for a in arms] == [
        "dpo/correctness", "bon/correctness", "dpo/shuffled", "no feedback",
        "dpo/brevity", "bon/brevity",
    ]  # fmt: skip
    shuffled, none = arms[2:4]
    assert shuffled.users == "shuffled" and shuffled.learner == "dpo"
    assert none.loop_config == NO_FEEDBACK and none.control == "none"
    assert none.users == "correctness"  # ranked as usual; the learner ignores them
    with pytest.raises(LearnError, match="unknown"):
        plan(args(learners="sgd"))
    (variant,) = plan(args(learners="bon-users", preferences="brevity", controls=""))
    assert variant.loop_config == {"learner": "bon", "bon": {"select": "users"}}


def test_the_gain_is_the_final_minus_start_paired_by_prompt_in_points() -> None:
    start = [0.0, 0.5, 1.0, 0.25]
    end = [0.5, 0.5, 1.0, 0.75]
    result = gain(start, end)
    diffs = [50.0, 0.0, 0.0, 50.0]
    mean = sum(diffs) / 4
    se = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5 / 2
    assert result["mean"] == pytest.approx(25.0) and result["se"] == pytest.approx(se)
    assert result["low"] == pytest.approx(25.0 - 1.96 * se)
    assert result["start"] == pytest.approx(43.75) and result["end"] == pytest.approx(68.75)


def test_the_curve_re_measures_the_first_prompts_of_every_task() -> None:
    # 3 tasks x 4 prompts each, in task order: the first 2 of each task
    assert curve_subset(list(range(12)), per_task=4, subset=2) == [0, 1, 4, 5, 8, 9]


def run(users: str, mean: float, low: float, high: float, control: str | None = None) -> dict:
    rounds = [
        {"promoted": True, "kl_to_sft": 2.0, "last_ranking_to_live_s": 40.0, "round_seconds": 30},
        {"promoted": False, "kl_to_sft": 9.0, "last_ranking_to_live_s": None, "round_seconds": 50},
    ]
    focus = users if users != "shuffled" else "correctness"
    return {"users": users, "control": control, "rounds": rounds,
            "sampled": {focus: {"mean": mean, "low": low, "high": high}}}  # fmt: skip


def test_a_gain_counts_only_above_target_with_its_interval_clear_of_zero() -> None:
    met = verdict(run("brevity", 22.0, 12.0, 32.0), kl_budget=6.0, minutes=20)
    assert met["targets"] == {
        "gain": True,
        "live_within_120s": True,
        "kl_within_budget": True,  # the refused round's 9 nats never went live
        "run_within_30_min": True,
    }
    assert met["round_seconds_median"] == 40.0 and met["rounds_promoted"] == 1
    assert verdict(run("brevity", 22.0, -1.0, 45.0), 6.0, 20)["targets"]["gain"] is False
    assert verdict(run("correctness", 14.0, 10.0, 18.0), 6.0, 40)["targets"] == {
        "gain": False, "live_within_120s": True, "kl_within_budget": True,
        "run_within_30_min": False,
    }  # fmt: skip


def test_the_shuffled_control_passes_only_when_its_interval_holds_zero() -> None:
    assert verdict(run("shuffled", 0.5, -2.0, 3.0, "shuffled"), 6.0, 20)["targets"]["gain"]
    assert not verdict(run("shuffled", 5.0, 2.0, 8.0, "shuffled"), 6.0, 20)["targets"]["gain"]
    assert verdict(run("shuffled", 5.0, 2.0, 8.0, "none"), 6.0, 20)["targets"]["gain"] is None


def test_the_readme_table_has_one_row_per_arm_with_every_column() -> None:
    g = {"mean": 1.0, "low": -0.5, "high": 2.5}
    arm = {
        "arm": "dpo/brevity", "users": "brevity", "judged_by": "brevity",
        "sampled": {p: g for p in ("correctness", "brevity", "politeness")},
        "greedy": {"brevity": g}, "kl_to_sft_max_promoted": 1.25, "round_seconds_median": 12.0,
        "last_ranking_to_live_s": {"max": 14.2, "median": 13.0},
    }  # fmt: skip
    lines = markdown_table({"runs": [arm]}).splitlines()
    assert len(lines) == 3
    assert {line.count("|") for line in lines} == {10}
    assert "**+1.0 [-0.5, +2.5]**" in lines[2] and "| 1.25 | 12 | 14 s |" in lines[2]
