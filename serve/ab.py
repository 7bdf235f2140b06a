"""Online A/B inside the ranking: the record of mixed rankings, the leaderboard, the referee.

While a candidate that passed the offline gate exists (:func:`eligible_candidate`), a share of
ranked turns mixes its answers with live's (``serve.serving``). Every stored ranking whose
answers came from more than one version leaves a record of its cross-version pairs in the list
``loopchat:ab:rankings`` — appended by the feedback store script in the same atomic step as the
event, so the two never disagree — from which

- :func:`leaderboard` fits Bradley–Terry strengths of every version compared so far, with
  cluster-bootstrap intervals, and the win rate of each against live;
- :class:`Referee` runs the candidate's win-rate test (``serve.arena.decide``: an always-valid
  confidence sequence) and, with auto-promote on, promotes the candidate through the registry's
  own ``promote`` (so every rule it enforces still applies) or retires it (drops the
  ``candidate`` alias). Each decision, with its evidence, goes to ``loopchat:ab:decisions`` and
  into the reason kept in the registry's history.

The math is in :mod:`serve.arena`; this module only reads and writes Redis. Everything here is
blocking (sync Redis): the API process runs it in threads (:class:`RefereeTask`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis

from serve import arena
from serve.registry import Registry, RegistryError
from serve.settings import Settings
from serve.store import key

RANKINGS = key("ab", "rankings")  # JSON {"id", "time", "pairs": [[a, b, wins a, wins b, ties]]}
DECISIONS = key("ab", "decisions")  # JSON decision records, oldest first
LOCK = key("ab", "lock")  # held by the referee deciding now
KEEP_RANKINGS = 100_000  # newest mixed rankings kept (apart from the stream's retention)
TRACE_POINTS = 200  # most points of the confidence sequence the leaderboard returns

log = logging.getLogger(__name__)


def mixed_record(event_id: str, groups: list[list[int]], versions: Sequence[str]) -> str:
    """The JSON to append for one ranking, or "" when it compares no two versions."""
    pairs = arena.version_pairs(groups, versions)
    if not pairs:
        return ""
    return json.dumps({"id": event_id, "time": time.time(), "pairs": [list(p) for p in pairs]})


def read_rankings(client: redis.Redis) -> list[list[arena.PairCounts]]:
    """Every kept mixed ranking's pair counts, oldest first."""
    return [[tuple(p) for p in json.loads(raw)["pairs"]] for raw in client.lrange(RANKINGS, 0, -1)]


def eligible_candidate(registry: Registry, settings: Settings) -> str | None:
    """The candidate whose answers may enter mixed slates: A/B is on and the candidate passed
    its offline gate and is not live (a broken or over-budget checkpoint never reaches users)."""
    return registry.gated_candidate() if settings.ab_share > 0 else None


def scores_against(
    rankings: Sequence[Sequence[arena.PairCounts]], version: str, live: str
) -> list[float]:
    """``version``'s score against ``live`` in each ranking that compared them, in order."""
    found = (arena.candidate_score(pairs, version, live) for pairs in rankings)
    return [s for s in found if s is not None]


def pair_totals(
    rankings: Sequence[Sequence[arena.PairCounts]], version: str, live: str
) -> dict[str, int]:
    """``version``'s wins, losses and ties against ``live`` over all rankings."""
    totals = {"wins": 0, "losses": 0, "ties": 0}
    for pairs in rankings:
        for a, b, wins_a, wins_b, ties in pairs:
            if {a, b} == {version, live}:
                totals["wins"] += int(wins_a if a == version else wins_b)
                totals["losses"] += int(wins_b if a == version else wins_a)
                totals["ties"] += int(ties)
    return totals


def _trace(bounds: arena.ConfidenceSequence) -> dict[str, list]:
    """The confidence sequence at no more than :data:`TRACE_POINTS` ranking counts."""
    n = len(bounds.low)
    at = np.unique(np.linspace(1, n, min(n, TRACE_POINTS)).round().astype(int)) if n else []
    return {
        "rankings": [int(t) for t in at],
        "low": [float(bounds.low[t - 1]) for t in at],
        "high": [float(bounds.high[t - 1]) for t in at],
        "win_rate": [float(bounds.mean[t - 1]) for t in at],
    }


class Referee:
    """The candidate's win-rate test against live, and what auto-promote does with it."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry, self.settings = registry, settings

    def verdict(
        self, rankings: Sequence[Sequence[arena.PairCounts]] | None = None
    ) -> tuple[str, str, arena.Verdict] | None:
        """(candidate, live, verdict) for the candidate in mixed slates, or None if none is."""
        candidate = eligible_candidate(self.registry, self.settings)
        live = self.registry.alias("live")
        if candidate is None or live is None:
            return None
        if rankings is None:
            rankings = read_rankings(self.registry.client)
        s = self.settings
        scores = scores_against(rankings, candidate, live)
        return (
            candidate,
            live,
            arena.decide(scores, s.ab_alpha, s.ab_min_rankings, s.ab_max_rankings),
        )

    def evidence(
        self, candidate: str, live: str, verdict: arena.Verdict, rankings: Sequence
    ) -> dict[str, Any]:
        """What a decision rests on, as kept in ``loopchat:ab:decisions``."""
        return {
            "candidate": candidate,
            "live": live,
            "action": verdict.action,
            "rankings": verdict.rankings,
            "decided_at": verdict.decided_at,
            "win_rate": verdict.win_rate,
            "interval": list(verdict.interval),
            "pairs": pair_totals(rankings, candidate, live),
            "alpha": self.settings.ab_alpha,
            "min_rankings": self.settings.ab_min_rankings,
            "max_rankings": self.settings.ab_max_rankings,
            "reason": verdict.reason,
        }

    def step(self) -> dict[str, Any] | None:
        """With auto-promote on, act on the verdict (promote or retire); returns the decision
        record when one was made. The registry's refusal (e.g. an operator's pin) is logged and
        leaves the test running."""
        if not self.settings.auto_promote:
            return None
        # One referee at a time across replicas (no double promotion or decision record); one
        # that finds the lock taken skips, and the next mixed ranking's check catches up.
        lock = self.registry.client.lock(LOCK, timeout=60, blocking_timeout=0)
        if not lock.acquire():
            return None
        try:
            return self._decide()
        finally:
            lock.release()

    def _decide(self) -> dict[str, Any] | None:
        rankings = read_rankings(self.registry.client)
        found = self.verdict(rankings)
        if found is None or found[2].action == "wait":
            return None
        candidate, live, verdict = found
        record = {"time": time.time(), **self.evidence(candidate, live, verdict, rankings)}
        pairs = record["pairs"]
        summary = (
            f"A/B win rate {verdict.win_rate:.3f} (95% [{verdict.interval[0]:.3f}, "
            f"{verdict.interval[1]:.3f}]) against {live} over {verdict.rankings} mixed rankings "
            f"({pairs['wins']} won, {pairs['losses']} lost, {pairs['ties']} tied pairs): "
            f"{verdict.reason}"
        )
        if verdict.action == "promote":
            try:
                self.registry.promote(candidate, by="ab", reason=summary, automatic=True)
            except RegistryError as exc:
                log.warning("A/B would promote %s but the registry refused: %s", candidate, exc)
                return None
        elif not self.registry.clear_candidate(candidate):
            return None  # another candidate took its place meanwhile
        record["summary"] = summary
        self.registry.client.rpush(DECISIONS, json.dumps(record))
        log.info("A/B %s %s: %s", verdict.action, candidate, summary)
        return record


def strength_rows(
    rankings: Sequence[Sequence[arena.PairCounts]],
    live: str | None,
    alpha: float,
    resamples: int = 500,
) -> tuple[list[dict[str, Any]], str | None]:
    """One leaderboard row per version, strongest first, and the version strengths are
    relative to: live, or the most compared version while live has no pairs."""
    names = sorted({v for pairs in rankings for p in pairs for v in p[:2]} | ({live} - {None}))
    if not rankings:
        return [], live
    per_ranking = arena.win_matrices(rankings, names)
    games = (per_ranking + np.swapaxes(per_ranking, 1, 2)).sum(axis=(0, 2))
    anchor = names.index(live) if live in names and games[names.index(live)] else games.argmax()
    strength = arena.bradley_terry(per_ranking.sum(axis=0), anchor)
    patterns, counts = np.unique(per_ranking.reshape(len(rankings), -1), axis=0, return_counts=True)
    low, high = arena.bootstrap_intervals(
        patterns.reshape(-1, len(names), len(names)), anchor, resamples, counts=counts
    )
    rows = []
    for k, version in enumerate(names):
        finite = bool(np.isfinite(strength[k])) and games[k] > 0
        rows.append(
            {
                "version": version,
                "strength": float(strength[k]) if finite else None,
                "interval": [float(low[k]), float(high[k])] if finite else None,
                "comparisons": int(round(games[k])),
                "win_rate_vs_live": _win_rate(rankings, version, live, alpha),
            }
        )
    rows.sort(key=lambda r: np.inf if r["strength"] is None else -r["strength"])
    return rows, names[anchor]


def leaderboard(registry: Registry, settings: Settings, resamples: int = 500) -> dict[str, Any]:
    """Bradley–Terry strengths (log-odds against the ``anchor``, live: ``σ(strength)`` is the
    modelled win rate against it) of every version compared in mixed slates, with 95%
    cluster-bootstrap intervals; each version's direct win rate against live with its
    always-valid 95% interval; the candidate's running test; the recent decisions."""
    client = registry.client
    rankings = read_rankings(client)
    live = registry.alias("live")
    rows, anchor = strength_rows(rankings, live, settings.ab_alpha, resamples)
    referee = Referee(registry, settings)
    found = referee.verdict(rankings)
    test = None
    if found is not None:
        candidate, against, verdict = found
        scores = scores_against(rankings, candidate, against)
        test = {
            **referee.evidence(candidate, against, verdict, rankings),
            "auto_promote": settings.auto_promote,
            "trace": _trace(arena.confidence_sequence(scores, settings.ab_alpha)),
        }
    return {
        "live": live,
        "candidate": registry.alias("candidate"),
        "anchor": anchor,
        "level": 0.95,
        "mixed_rankings": len(rankings),
        "versions": rows,
        "test": test,
        "decisions": [json.loads(raw) for raw in client.lrange(DECISIONS, -20, -1)],
    }


def _win_rate(
    rankings: Sequence[Sequence[arena.PairCounts]], version: str, live: str | None, alpha: float
) -> dict[str, Any] | None:
    """``version``'s mean score against live over the rankings comparing them, with the
    always-valid interval; None for live itself or a version never compared with it."""
    if live is None or version == live:
        return None
    scores = scores_against(rankings, version, live)
    if not scores:
        return None
    bounds = arena.confidence_sequence(scores, alpha)
    return {
        "estimate": float(bounds.mean[-1]),
        "interval": [float(bounds.low[-1]), float(bounds.high[-1])],
        "rankings": len(scores),
        "pairs": pair_totals(rankings, version, live),
    }


class RefereeTask:
    """Runs :meth:`Referee.step` in a thread after mixed rankings, one run at a time; rankings
    that arrive during a run cause exactly one more, so no ranking goes unexamined and a burst
    costs two runs, not one per ranking."""

    def __init__(self, referee: Referee) -> None:
        self.referee = referee
        self._task: asyncio.Task | None = None
        self._again = False

    def poke(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._run(), name="ab-referee")

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await asyncio.to_thread(self.referee.step)
            except Exception:
                log.exception("the A/B referee failed; it runs again after the next ranking")
            if not self._again:
                return

    async def aclose(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
