"""The statistics of online A/B inside the ranking, as small pure functions (numpy only).

Three questions are answered from the users' rankings of *mixed slates* (answers of two
versions shown together, blind):

1. **Which answers beat which**: :func:`version_pairs` turns one ranking into the cross-version
   pair counts it implies — a tie group gives a tie, answers of one version give nothing.
2. **How strong is each version** (the leaderboard): :func:`bradley_terry` is the maximum-
   likelihood Bradley–Terry fit, ``P(i beats j) = σ(θ_i − θ_j)``, ties counted as half a win
   each way, with a pseudo-count of half a win each way in every compared pair so a version that
   won every comparison still has a finite strength; :func:`bootstrap_intervals` gives its 95%
   intervals by resampling whole *rankings* (Poisson weights), because the pairs of one ranking
   share their answers and are not independent.
3. **Is the candidate better than live** (promotion): each mixed ranking gives the candidate a
   score in [0, 1], its share of the (candidate, live) pairs won (:func:`candidate_score`).
   :func:`confidence_sequence` is an *always-valid* 95% confidence sequence for the mean score
   (the win rate): Waudby-Smith & Ramdas (2023), "Estimating means of bounded random variables
   by betting", the hedged capital process with predictable plug-in bets. By Ville's
   inequality it covers the true win rate at every ranking count simultaneously with
   probability ≥ 95%, so checking it after every ranking does not inflate false promotions —
   no fixed horizon is needed. :func:`decide` promotes when the lower bound clears ½, retires
   when the upper bound falls below ½ (each only after a minimum of mixed rankings), and
   retires as inconclusive after a maximum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

PairCounts = tuple[str, str, float, float, float]
"""``(a, b, wins of a, wins of b, ties)`` between two versions, with ``a < b``."""

GRID = np.linspace(0.0, 1.0, 401)  # win rates the confidence sequence tests (0.0025 apart)


def version_pairs(groups: Sequence[Sequence[int]], versions: Sequence[str]) -> list[PairCounts]:
    """The cross-version pair counts of one best-to-worst ranking of candidates.

    ``groups`` are tie groups of candidate indices; ``versions[i]`` produced candidate ``i``.
    Two candidates in one group tie; in different groups the earlier one wins.
    """
    counts: dict[tuple[str, str], list[float]] = {}
    rank = {index: position for position, group in enumerate(groups) for index in group}
    ranked = sorted(rank)
    for x, i in enumerate(ranked):
        for j in ranked[x + 1 :]:
            vi, vj = versions[i], versions[j]
            if vi == vj:
                continue
            (a, ra), (b, rb) = sorted([(vi, rank[i]), (vj, rank[j])])
            cell = counts.setdefault((a, b), [0.0, 0.0, 0.0])
            cell[0 if ra < rb else 1 if rb < ra else 2] += 1
    return [(a, b, *cell) for (a, b), cell in sorted(counts.items())]


def candidate_score(pairs: Sequence[PairCounts], candidate: str, live: str) -> float | None:
    """The candidate's share of its pairs against live in one ranking (ties half), or None."""
    for a, b, wins_a, wins_b, ties in pairs:
        if {a, b} == {candidate, live}:
            won = wins_a if a == candidate else wins_b
            total = wins_a + wins_b + ties
            return (won + ties / 2) / total if total else None
    return None


def win_matrices(rankings: Sequence[Sequence[PairCounts]], versions: Sequence[str]) -> np.ndarray:
    """``(rankings, V, V)``: entry ``[r, i, j]`` is how often ``i`` beat ``j`` in ranking ``r``,
    a tie counting half a win each way."""
    index = {v: k for k, v in enumerate(versions)}
    out = np.zeros((len(rankings), len(versions), len(versions)))
    for r, pairs in enumerate(rankings):
        for a, b, wins_a, wins_b, ties in pairs:
            i, j = index[a], index[b]
            out[r, i, j] += wins_a + ties / 2
            out[r, j, i] += wins_b + ties / 2
    return out


def bradley_terry(
    wins: np.ndarray, anchor: int = 0, prior: float = 0.5, iterations: int = 10_000
) -> np.ndarray:
    """Bradley–Terry log-strengths θ (``θ[anchor] = 0``) maximising
    ``Σ_ij w_ij log σ(θ_i − θ_j)`` for ``wins[..., i, j] = w_ij`` (leading axes are a batch).

    ``prior`` wins are added each way to every pair compared somewhere in the batch (0 turns it
    off: then a version that never lost has no finite MLE). Solved by Hunter's (2004) MM
    iteration ``p_i ← W_i / Σ_j n_ij / (p_i + p_j)``, which increases the likelihood every step.
    Versions not connected to ``anchor`` by comparisons get NaN.
    """
    wins = np.asarray(wins, dtype=float)
    games = wins + np.swapaxes(wins, -1, -2)
    compared = games.reshape(-1, *games.shape[-2:]).sum(axis=0) > 0
    wins = wins + prior * compared
    games = wins + np.swapaxes(wins, -1, -2)
    reach = connected_to(compared, anchor)
    total = wins.sum(axis=-1)
    p = np.ones(wins.shape[:-1])
    for _ in range(iterations):
        denominator = (games / (p[..., :, None] + p[..., None, :])).sum(axis=-1)
        new = np.where(reach, total / np.where(denominator > 0, denominator, 1.0), 1.0)
        new = new / new[..., anchor : anchor + 1]
        if np.max(np.abs(np.log(new) - np.log(p))) < 1e-10:
            p = new
            break
        p = new
    return np.where(reach, np.log(p), np.nan)


def connected_to(compared: np.ndarray, anchor: int) -> np.ndarray:
    """Which versions a chain of comparisons links to ``anchor`` (the anchor itself included)."""
    reach = np.zeros(len(compared), dtype=bool)
    reach[anchor] = True
    while True:
        grown = reach | compared[reach].any(axis=0)
        if (grown == reach).all():
            return reach
        reach = grown


def bootstrap_intervals(
    per_ranking: np.ndarray,
    anchor: int = 0,
    resamples: int = 500,
    level: float = 0.95,
    seed: int = 0,
    counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile intervals of the Bradley–Terry strengths over ``resamples`` cluster bootstrap
    replicates: each ranking (a row of ``per_ranking``, from :func:`win_matrices`) is drawn a
    Poisson(1) number of times, so a ranking's correlated pairs stay together.

    ``counts[r]`` says row ``r`` stands for that many identical rankings (a sum of ``c``
    Poisson(1) draws is one Poisson(``c``) draw), so the cost grows with the distinct rankings,
    not with all of them.
    """
    rng = np.random.default_rng(seed)
    rate = np.ones(len(per_ranking)) if counts is None else np.asarray(counts, dtype=float)
    weights = rng.poisson(rate, size=(resamples, len(per_ranking)))
    replicates = bradley_terry(np.einsum("br,rij->bij", weights, per_ranking), anchor)
    tail = (1 - level) / 2 * 100
    low, high = np.full(replicates.shape[-1], np.nan), np.full(replicates.shape[-1], np.nan)
    linked = np.isfinite(replicates).any(axis=0)  # versions never linked to the anchor: NaN
    low[linked], high[linked] = np.nanpercentile(replicates[:, linked], [tail, 100 - tail], axis=0)
    return low, high


@dataclass(frozen=True)
class ConfidenceSequence:
    """A confidence sequence after each observation: ``low[t - 1]``, ``high[t - 1]`` hold the
    bounds after ``t`` observations (running intersection: ``low`` never falls, ``high`` never
    rises)."""

    low: np.ndarray
    high: np.ndarray
    mean: np.ndarray


def hedged_log_capital(
    x: np.ndarray, means: np.ndarray, alpha: float, bet_cap: float = 0.5
) -> np.ndarray:
    """``log((K⁺_t(m) + K⁻_t(m)) / 2)`` for every ``t`` (rows) and candidate mean ``m`` (columns)
    — the capital of :func:`confidence_sequence`'s two bettors."""
    t = np.arange(1, len(x) + 1)
    running_mean = (0.5 + np.cumsum(x)) / (t + 1)
    variance = (0.25 + np.cumsum((x - running_mean) ** 2)) / (t + 1)
    previous_variance = np.concatenate([[0.25], variance[:-1]])  # predictable: known before x_t
    bet = np.sqrt(2 * math.log(2 / alpha) / (previous_variance * t * np.log1p(t)))
    m = np.asarray(means, dtype=float)[None, :]
    with np.errstate(divide="ignore"):
        up = np.minimum(bet[:, None], bet_cap / m)
        down = np.minimum(bet[:, None], bet_cap / (1 - m))
    gap = x[:, None] - m
    log_up = np.cumsum(np.log1p(up * gap), axis=0)
    log_down = np.cumsum(np.log1p(-down * gap), axis=0)
    return np.logaddexp(log_up, log_down) - math.log(2)


def confidence_sequence(
    scores: Sequence[float], alpha: float = 0.05, bet_cap: float = 0.5
) -> ConfidenceSequence:
    """Always-valid ``1 − alpha`` bounds on the mean of scores in [0, 1] (Waudby-Smith & Ramdas,
    hedged capital with predictable plug-in bets).

    For each candidate mean ``m`` on :data:`GRID`, two bettors stake on the next score being
    above (resp. below) ``m``: ``K⁺_t = Π (1 + λ⁺_i (x_i − m))``, ``K⁻_t = Π (1 − λ⁻_i (x_i −
    m))``, with bets ``λ_i = √(2 log(2/α) / (σ̂²_{i−1} i log(1 + i)))`` fixed before ``x_i`` is
    seen and capped at ``bet_cap / m`` (resp. ``/ (1 − m)``) so wealth stays positive. If ``m``
    is the true mean, ``(K⁺ + K⁻)/2`` is a nonnegative martingale starting at 1, so by Ville's
    inequality it ever reaches ``1/α`` with probability ≤ ``α``: every ``m`` whose capital has
    reached it is rejected for good. The bounds are the grid points just outside the
    non-rejected set (conservative by at most one grid step).
    """
    x = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    n = len(x)
    if n == 0:
        return ConfidenceSequence(np.zeros(0), np.zeros(0), np.zeros(0))
    log_capital = hedged_log_capital(x, GRID, alpha, bet_cap)
    rejected = np.maximum.accumulate(log_capital >= math.log(1 / alpha), axis=0)
    kept = ~rejected
    first = kept.argmax(axis=1)
    last = len(GRID) - 1 - kept[:, ::-1].argmax(axis=1)
    low = GRID[np.maximum(first - 1, 0)]
    high = GRID[np.minimum(last + 1, len(GRID) - 1)]
    # Every mean rejected (probability ≤ α): keep the last bounds that held something.
    held = np.maximum.accumulate(np.where(kept.any(axis=1), np.arange(n), -1))
    low = np.where(held >= 0, low[np.maximum(held, 0)], 0.0)
    high = np.where(held >= 0, high[np.maximum(held, 0)], 1.0)
    return ConfidenceSequence(low, high, np.cumsum(x) / np.arange(1, n + 1))


Action = Literal["promote", "retire", "wait"]


@dataclass(frozen=True)
class Verdict:
    """What the win-rate test says about a candidate after ``rankings`` mixed rankings."""

    action: Action
    rankings: int  # mixed rankings (with both versions) seen
    decided_at: int | None  # the ranking count at which the bound crossed ½ (None: not yet)
    win_rate: float | None  # mean score: the candidate's share of pairs against live
    interval: tuple[float, float]  # the confidence sequence now
    reason: str


def decide(scores: Sequence[float], alpha: float, min_rankings: int, max_rankings: int) -> Verdict:
    """Promote once the lower bound clears ½, retire once the upper bound is below ½ — each
    only from ``min_rankings`` mixed rankings on, whichever happens first — and retire as
    inconclusive after ``max_rankings`` with neither."""
    n = len(scores)
    if n == 0:
        return Verdict("wait", 0, None, None, (0.0, 1.0), "no mixed rankings yet")
    bounds = confidence_sequence(scores, alpha)
    start = max(min_rankings, 1) - 1
    above = np.flatnonzero(bounds.low[start:] >= 0.5)
    below = np.flatnonzero(bounds.high[start:] <= 0.5)
    first_above = start + above[0] if len(above) else n
    first_below = start + below[0] if len(below) else n
    interval = (float(bounds.low[-1]), float(bounds.high[-1]))
    win_rate = float(bounds.mean[-1])
    level = f"{1 - alpha:.0%}"
    if first_above < first_below:
        at = int(first_above) + 1
        reason = (
            f"lower {level} bound of the win rate cleared 50% after {at} mixed rankings "
            f"(always-valid confidence sequence)"
        )
        return Verdict("promote", n, at, win_rate, interval, reason)
    if first_below < n:
        at = int(first_below) + 1
        reason = f"upper {level} bound of the win rate fell below 50% after {at} mixed rankings"
        return Verdict("retire", n, at, win_rate, interval, reason)
    if n >= max_rankings:
        reason = f"no difference measured in {max_rankings} mixed rankings (inconclusive)"
        return Verdict("retire", n, max_rankings, win_rate, interval, reason)
    needed = max(min_rankings - n, 0)
    reason = f"{level} bounds straddle 50%" + (f"; {needed} more rankings needed" if needed else "")
    return Verdict("wait", n, None, win_rate, interval, reason)


def split_slate(n: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Which of ``n ≥ 2`` answer slots live and the candidate fill: half each (a random one of
    them takes the odd slot), at least one each, in a random order so position tells nothing."""
    order = rng.permutation(n).tolist()
    k = n // 2 + (int(rng.integers(2)) if n % 2 else 0)
    candidate = max(1, min(n - 1, k))
    return sorted(order[candidate:]), sorted(order[:candidate])
