"""``loopchat bench ab``'s simulated users and its result files (a short run)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from learn.bench import ab


def test_users_rank_by_utility_and_tie_answers_closer_than_the_margin() -> None:
    assert ab.user_ranking(np.array([0.2, 1.0, 0.95, -1.0]), 0.1) == [[1, 2], [0], [3]]
    assert ab.user_ranking(np.array([0.0, 1.0]), 0.0) == [[1], [0]]


def test_a_60_40_candidate_wins_60_percent_of_untied_pairs() -> None:
    gap = math.sqrt(2) * NormalDist().inv_cdf(0.6)
    rng = np.random.default_rng(0)
    scores = ab.simulate_scores(gap, 4000, 2, 0.0, rng)  # one pair per ranking, no ties
    assert np.mean(scores) == pytest.approx(0.6, abs=0.02)
    aa = ab.simulate_scores(0.0, 4000, 4, 0.1, rng)
    assert np.mean(aa) == pytest.approx(0.5, abs=0.02)


def test_peeking_at_a_fixed_interval_promotes_what_a_steady_winner_would() -> None:
    assert ab.naive_promotes([1.0, 0.0, 1.0, 1.0] * 50, 10)
    assert not ab.naive_promotes([1.0, 0.0] * 100, 10)


def test_a_short_run_writes_json_and_png(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    ab.add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), "--aa-runs", "4", "--runs", "3", "--max-rankings", "300"]
    )
    assert ab.run(args) == 0
    result = json.loads((tmp_path / "bench-ab.json").read_text())
    kinds = {k["kind"]: k for k in result["kinds"]}
    assert kinds["A/A"]["runs"] == 4 and kinds["better (60/40)"]["runs"] == 3
    assert kinds["worse (40/60)"]["promoted"] == 0
    assert result["settings"]["min_rankings"] == 100  # the service's default
    assert (tmp_path / "bench-ab.png").stat().st_size > 0
