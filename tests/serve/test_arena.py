"""The A/B statistics on toy inputs, checked against their formulas (``serve/arena.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serve import arena


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def test_version_pairs_count_cross_version_wins_and_ties_only() -> None:
    # candidates 0, 2 by "a"; 1, 3 by "b"; 1 and 2 tie
    pairs = arena.version_pairs([[0], [1, 2], [3]], ["a", "b", "a", "b"])
    # a beats b: 0>1, 0>3, 2>3; tie: 1~2; same-version pairs (0,2), (1,3) give nothing
    assert pairs == [("a", "b", 3.0, 0.0, 1.0)]
    assert arena.version_pairs([[1], [0]], ["v", "v"]) == []
    # pairs are named in version order whichever answer won
    assert arena.version_pairs([[0], [1]], ["z", "a"]) == [("a", "z", 0.0, 1.0, 0.0)]


def test_candidate_score_is_the_share_of_pairs_won_with_ties_half() -> None:
    pairs = [("a", "b", 3.0, 0.0, 1.0)]
    assert arena.candidate_score(pairs, "a", "b") == pytest.approx(3.5 / 4)
    assert arena.candidate_score(pairs, "b", "a") == pytest.approx(0.5 / 4)
    assert arena.candidate_score(pairs, "a", "c") is None


def test_bradley_terry_of_two_versions_is_the_log_odds_of_their_record() -> None:
    won, lost, tied, prior = 30.0, 10.0, 6.0, 0.5
    wins = arena.win_matrices([[("a", "b", won, lost, tied)]], ["a", "b"]).sum(axis=0)
    theta = arena.bradley_terry(wins, anchor=1, prior=prior)
    expected = math.log((won + tied / 2 + prior) / (lost + tied / 2 + prior))
    assert theta[1] == 0.0
    assert theta[0] == pytest.approx(expected, abs=1e-8)


def test_bradley_terry_solves_the_score_equations_and_recovers_strengths() -> None:
    rng = np.random.default_rng(1)
    truth = np.array([0.0, 0.8, -0.5, 1.5])
    wins = np.zeros((4, 4))
    for _ in range(20_000):
        i, j = rng.choice(4, size=2, replace=False)
        if rng.random() < sigmoid(truth[i] - truth[j]):
            wins[i, j] += 1
        else:
            wins[j, i] += 1
    theta = arena.bradley_terry(wins, anchor=0, prior=0.0)
    games = wins + wins.T
    # the MLE's score equations: expected wins equal observed wins for every version
    expected = (games * sigmoid(theta[:, None] - theta[None, :])).sum(axis=1)
    assert expected == pytest.approx(wins.sum(axis=1), rel=1e-6)
    assert theta == pytest.approx(truth, abs=0.1)


def test_bradley_terry_gives_nan_to_versions_not_linked_to_the_anchor() -> None:
    rankings = [[("a", "b", 2.0, 1.0, 0.0)], [("c", "d", 1.0, 1.0, 0.0)]]
    theta = arena.bradley_terry(arena.win_matrices(rankings, ["a", "b", "c", "d"]).sum(0), 0)
    assert np.isfinite(theta[:2]).all() and np.isnan(theta[2:]).all()


def test_bootstrap_intervals_cover_the_estimate_and_narrow_with_more_rankings() -> None:
    def interval(n: int) -> tuple[float, float, float]:
        rankings = [[("a", "b", 3.0, 1.0, 0.0)], [("a", "b", 1.0, 3.0, 0.0)]] * n
        rankings += [[("a", "b", 4.0, 0.0, 0.0)]] * n
        per = arena.win_matrices(rankings, ["a", "b"])
        theta = arena.bradley_terry(per.sum(axis=0), anchor=1)
        low, high = arena.bootstrap_intervals(per, anchor=1, resamples=300)
        return low[0], theta[0], high[0]

    low, mid, high = interval(20)
    assert low < mid < high
    low_big, _, high_big = interval(500)
    assert high_big - low_big < (high - low) / 3  # ~1/sqrt(25) as wide


def test_bootstrap_counts_stand_for_repeated_rankings() -> None:
    rankings = [[("a", "b", 3.0, 1.0, 0.0)]] * 40 + [[("a", "b", 0.0, 4.0, 0.0)]] * 20
    per = arena.win_matrices(rankings, ["a", "b"])
    patterns, counts = np.unique(per.reshape(len(per), -1), axis=0, return_counts=True)
    full = arena.bootstrap_intervals(per, anchor=1, resamples=2000, seed=3)
    grouped = arena.bootstrap_intervals(
        patterns.reshape(-1, 2, 2), anchor=1, resamples=2000, seed=4, counts=counts
    )
    assert grouped[0][0] == pytest.approx(full[0][0], abs=0.1)
    assert grouped[1][0] == pytest.approx(full[1][0], abs=0.1)


def test_hedged_capital_is_the_two_bettors_products() -> None:
    x = np.array([1.0, 0.25, 0.75, 0.5, 1.0])
    alpha, cap = 0.05, 0.5
    for m in (0.3, 0.5, 0.9):
        up = down = 1.0
        mean_sum, square_sum = 0.5, 0.25  # the running estimates' priors
        variance = 0.25
        for i, xi in enumerate(x, 1):
            bet = math.sqrt(2 * math.log(2 / alpha) / (variance * i * math.log(1 + i)))
            up *= 1 + min(bet, cap / m) * (xi - m)
            down *= 1 - min(bet, cap / (1 - m)) * (xi - m)
            mean_sum += xi
            square_sum += (xi - mean_sum / (i + 1)) ** 2
            variance = square_sum / (i + 1)
        got = arena.hedged_log_capital(x, np.array([m]), alpha, cap)[-1, 0]
        assert got == pytest.approx(math.log((up + down) / 2))


def test_confidence_sequence_holds_at_every_ranking_count_for_a_fair_coin() -> None:
    rng = np.random.default_rng(0)
    runs, missed = 400, 0
    for _ in range(runs):
        bounds = arena.confidence_sequence(rng.integers(0, 2, 300).astype(float), 0.05)
        missed += bool((bounds.low > 0.5).any() or (bounds.high < 0.5).any())
        assert (np.diff(bounds.low) >= 0).all() and (np.diff(bounds.high) <= 0).all()
    # Ville: P(ever excluding the true mean) <= alpha; allow two standard errors of sampling
    assert missed / runs <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / runs)


def test_confidence_sequence_shrinks_around_the_mean() -> None:
    scores = np.tile([1.0, 1.0, 0.0, 1.0, 0.0], 400)  # mean 0.6
    bounds = arena.confidence_sequence(scores, 0.05)
    assert bounds.low[-1] < 0.6 < bounds.high[-1]
    assert bounds.high[-1] - bounds.low[-1] < 0.1
    assert bounds.mean[-1] == pytest.approx(0.6)


def test_decide_promotes_a_winner_retires_a_loser_and_waits_in_between() -> None:
    promote = arena.decide([1.0] * 30, 0.05, min_rankings=20, max_rankings=100)
    assert promote.action == "promote" and promote.decided_at == 20  # not before the minimum
    assert promote.interval[0] >= 0.5
    early = arena.decide([1.0] * 30, 0.05, min_rankings=1, max_rankings=100)
    assert early.action == "promote" and 1 < early.decided_at < 20
    retire = arena.decide([0.0] * 30, 0.05, min_rankings=5, max_rankings=100)
    assert retire.action == "retire" and retire.interval[1] <= 0.5
    wait = arena.decide([1.0, 0.0] * 20, 0.05, min_rankings=5, max_rankings=100)
    assert wait.action == "wait" and wait.interval[0] < 0.5 < wait.interval[1]
    assert wait.win_rate == pytest.approx(0.5)
    tired = arena.decide([1.0, 0.0] * 50, 0.05, min_rankings=5, max_rankings=100)
    assert tired.action == "retire" and "inconclusive" in tired.reason
    assert arena.decide([], 0.05, 5, 100).action == "wait"


def test_decide_takes_the_first_crossing() -> None:
    # wins early, then loses: the bound cleared 50% first, so the verdict is promote
    scores = [1.0] * 40 + [0.0] * 200
    verdict = arena.decide(scores, 0.05, min_rankings=10, max_rankings=1000)
    assert verdict.action == "promote" and verdict.decided_at <= 40


@pytest.mark.parametrize("n", [2, 3, 4, 5, 16])
def test_split_slate_gives_each_version_at_least_one_slot_and_about_half(n: int) -> None:
    rng = np.random.default_rng(n)
    seen_first = set()
    for _ in range(50):
        live, candidate = arena.split_slate(n, rng)
        assert sorted(live + candidate) == list(range(n))
        assert live and candidate and abs(len(live) - len(candidate)) <= 1
        seen_first.add(0 in candidate)
    assert seen_first == {True, False}  # slot 0 goes to either: position tells nothing
