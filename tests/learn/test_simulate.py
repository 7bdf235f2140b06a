"""Simulated users: their preferences, the rankings they derive, and a run against a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from learn.builtin.grader import solve
from learn.simulate import (
    PreferenceError,
    Simulation,
    SimulationConfig,
    chat_scripts,
    feedback_body,
    judge,
    load_preference,
    ranking_from_scores,
    run_simulation,
)
from serve.cli import main as loopchat
from tests.conftest import start_server

SUM = [{"role": "user", "content": "What is 12 + 30?"}]


def longest_first(messages: list[dict], candidates: list[str]) -> list[int]:
    """A custom preference, loaded by the tests as ``tests.learn.test_simulate:longest_first``."""
    return [len(c) for c in candidates]


def test_equal_scores_share_a_tie_group_ordered_best_first() -> None:
    assert ranking_from_scores([0.2, 1.0, 0.2, 0.5]) == [[1], [3], [0, 2]]
    assert ranking_from_scores([1.0, 1.0, 1.0]) == [[0, 1, 2]]
    assert ranking_from_scores([0.0, 3.0]) == [[1], [0]]


def test_correctness_ranks_right_answers_above_wrong_ones_with_ties() -> None:
    candidates = ["42", "41", "12 + 30 = 42.", "I don't know."]
    scores = judge(load_preference("correctness"), SUM, candidates)
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert ranking_from_scores(scores) == [[0, 2], [1, 3]]


def test_correctness_judges_a_follow_up_by_the_earlier_turns() -> None:
    chat = [
        *SUM,
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And plus 5?"},
    ]
    scores = judge(load_preference("correctness"), chat, ["47", "35", "42"])
    assert ranking_from_scores(scores) == [[0], [1, 2]]


def test_brevity_prefers_fewer_words_and_ties_equal_lengths() -> None:
    candidates = ["The sum of 12 and 30 is 42.", "42", "It is 42.", "Is 42."]
    scores = judge(load_preference("brevity"), SUM, candidates)
    assert ranking_from_scores(scores) == [[1], [3], [2], [0]]
    assert all(0 < s <= 1 for s in scores)
    assert ranking_from_scores(judge(load_preference("brevity"), SUM, ["a b", "c d"])) == [[0, 1]]


def test_politeness_prefers_polite_phrasing() -> None:
    candidates = ["42", "Sure! It is 42. I hope that helps!", "Of course, 42."]
    scores = judge(load_preference("politeness"), SUM, candidates)
    assert ranking_from_scores(scores) == [[1], [2], [0]]


def test_a_turn_where_nothing_pleases_is_posted_as_all_bad() -> None:
    assert feedback_body("c1", [0.0, 0.0], "u") == {
        "completion_id": "c1",
        "ranking": [],
        "all_bad": True,
        "user": "u",
    }
    assert feedback_body("c1", [0.0, 1.0], "u")["ranking"] == [[1], [0]]


def test_a_custom_preference_is_loaded_from_module_and_function() -> None:
    preference = load_preference("tests.learn.test_simulate:longest_first")
    assert ranking_from_scores(judge(preference, SUM, ["ab", "abcd", "a"])) == [[1], [0], [2]]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kindness", "unknown preference"),
        ("no_such_module_xyz:f", "cannot import"),
        ("tests.learn.test_simulate:missing", "has no function"),
    ],
)
def test_an_unknown_preference_is_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_preference(spec)


def test_a_preference_must_return_one_finite_score_per_candidate() -> None:
    with pytest.raises(PreferenceError, match="one finite score per candidate"):
        judge(lambda messages, candidates: [1.0], SUM, ["a", "b"])
    with pytest.raises(PreferenceError, match="one finite score per candidate"):
        judge(lambda messages, candidates: [float("nan"), 1.0], SUM, ["a", "b"])
    with pytest.raises(PreferenceError, match="ZeroDivisionError"):
        judge(lambda messages, candidates: [1 / 0], SUM, ["a"])


def test_chats_are_held_out_questions_with_follow_ups_after_their_base_question() -> None:
    scripts = chat_scripts(40, seed=3)
    assert len(scripts) >= 40
    assert any(len(turns) == 2 for turns in scripts)
    for turns in scripts:
        messages = [{"role": "user", "content": text} for text in turns]
        assert solve(messages) is not None, turns  # the checker understands every turn


def test_users_draw_about_one_chat_per_ranking_and_never_ask_an_avoided_question() -> None:
    correctness = load_preference("correctness")
    few = Simulation(SimulationConfig(rankings=10), correctness, client=None)
    avoid = frozenset(turn for turns in few.scripts[:10] for turn in turns)
    many = Simulation(SimulationConfig(rankings=600, avoid=avoid), correctness, client=None)
    assert len(few.scripts) < 100 < 400 < len(many.scripts)
    assert all(avoid.isdisjoint(turns) for turns in many.scripts)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k", "5"], "--k must be 2, 3 or 4"),
        (["--users", "0"], "--users must be at least 1"),
        (["--topics", "0"], "--topics must be at least 1"),
        (["--url", "127.0.0.1:8000"], "--url must be an http(s) URL"),
        (["--preference", "nope"], "unknown preference"),
    ],
)
def test_bad_flags_are_one_line_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loopchat(["simulate", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_simulation_posts_exactly_the_rankings_it_reports(
    tiny_model: Path, redis_url: str, tmp_path: Path
) -> None:
    server = start_server(tiny_model, tmp_path / "data", redis_url, engine="hf")
    try:
        config = SimulationConfig(
            url=server.url, users=3, rankings=12, preference="brevity", k=3, max_tokens=8,
            topics=2,
        )  # fmt: skip
        summary = asyncio.run(run_simulation(config))
        assert summary.rankings == 12 and not summary.errors
        assert summary.versions["v1"].answers == 3 * summary.completions

        stream = redis.Redis.from_url(redis_url, decode_responses=True)
        events = [json.loads(f["event"]) for _, f in stream.xrange("loopchat:feedback")]
        assert sorted(e["id"] for e in events) == sorted(summary.feedback_ids)
        assert {e["user"] for e in events} <= {f"sim-0-{i}" for i in range(3)}
        assert all(len(e["candidates"]) == 3 and e["version"] == "v1" for e in events)
        assert sum(len(e["messages"]) > 1 for e in events) > 0  # two topics: multi-turn chats

        cli = subprocess.run(
            [sys.executable, "-m", "serve.cli", "simulate", "--url", server.url, "--users", "2",
             "--rankings", "5", "--k", "2", "--seed", "1", "--max-tokens", "8", "--json"],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        reported = json.loads(cli.stdout)
        assert reported["rankings"] == 5 and reported["errors"] == {}
        assert stream.xlen("loopchat:feedback") == 12 + 5
    finally:
        server.stop()
