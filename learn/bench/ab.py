"""``loopchat bench ab``: does promotion by measured win rate promote the right candidates?

An in-process simulation of the decision rule the service runs (``serve.arena``), with the
production functions end to end: each simulated ranked turn is a mixed slate of ``K`` answers
split between live and the candidate (``split_slate``); a simulated user ranks them by a latent
utility (the version's quality plus standard normal noise per answer; answers within
``--tie-margin`` of each other are put in one tie group); the ranking becomes cross-version
pairs (``version_pairs``) and the candidate's score (``candidate_score``); after every ranking
the always-valid test (``decide``, with the service's default settings) may promote or retire.

Three kinds of candidate:

- **A/A** — a copy of live (equal quality): every promotion is a false one; target ≤ 5%;
- **better** — preferred 60/40: a candidate answer beats a live answer in 60% of untied pairs
  (quality gap ``√2 Φ⁻¹(0.6)``); reported: rankings until promotion, median and 90th percentile;
- **worse** — preferred 40/60: must be retired, never promoted.

Beside the rule, the A/A runs are also judged by a *naive* rule — a fixed-sample 95% normal
interval recomputed after every ranking — to show what checking after every ranking costs
without a sequential test.
"""

from __future__ import annotations

import argparse
import math
import time
from statistics import NormalDist
from typing import Any

import numpy as np

import serve.arena as arena
from learn.bench.common import figure, percentile, save_figure, write_result
from serve.settings import Settings

NAME = "bench-ab"
LIVE, CANDIDATE = "live", "candidate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings.model_fields
    parser.add_argument("--out", default="results", help="Folder for the JSON and PNG.")
    parser.add_argument("--aa-runs", type=int, default=1000, help="A/A runs (1000).")
    parser.add_argument("--runs", type=int, default=200, help="Runs of each other kind (200).")
    parser.add_argument("--k", type=int, default=4, help="Answers per ranked turn (4).")
    parser.add_argument("--tie-margin", type=float, default=0.1, help="Ties below this gap.")
    parser.add_argument("--alpha", type=float, default=defaults["ab_alpha"].default)
    parser.add_argument("--min-rankings", type=int, default=defaults["ab_min_rankings"].default)
    parser.add_argument("--max-rankings", type=int, default=defaults["ab_max_rankings"].default)
    parser.add_argument("--seed", type=int, default=0)


def user_ranking(utilities: np.ndarray, tie_margin: float) -> list[list[int]]:
    """Best-to-worst tie groups: sorted by utility, a new group wherever the gap reaches
    ``tie_margin``."""
    order = np.argsort(-utilities)
    groups = [[int(order[0])]]
    for previous, index in zip(order[:-1], order[1:], strict=True):
        if utilities[previous] - utilities[index] < tie_margin:
            groups[-1].append(int(index))
        else:
            groups.append([int(index)])
    return groups


def simulate_scores(
    gap: float, rankings: int, k: int, tie_margin: float, rng: np.random.Generator
) -> list[float]:
    """The candidate's score in each of ``rankings`` mixed slates (candidate quality ``gap``
    above live's)."""
    scores = []
    for _ in range(rankings):
        live_slots, candidate_slots = arena.split_slate(k, rng)
        versions = [LIVE] * k
        for slot in candidate_slots:
            versions[slot] = CANDIDATE
        quality = np.where(np.array(versions) == CANDIDATE, gap, 0.0)
        groups = user_ranking(quality + rng.normal(size=k), tie_margin)
        score = arena.candidate_score(arena.version_pairs(groups, versions), CANDIDATE, LIVE)
        scores.append(float(score))
    return scores


def naive_promotes(scores: list[float], min_rankings: int) -> bool:
    """Whether a fixed-sample 95% interval (mean ± 1.96 s/√t), looked at after every ranking,
    ever clears ½ from ``min_rankings`` on — the rule the sequential test replaces."""
    x = np.asarray(scores)
    t = np.arange(1, len(x) + 1)
    mean = np.cumsum(x) / t
    variance = np.maximum(np.cumsum(x**2) / t - mean**2, 1e-12)
    low = mean - 1.96 * np.sqrt(variance / t)
    return bool((low[min_rankings - 1 :] > 0.5).any())


def run_kind(
    name: str,
    gap: float,
    runs: int,
    min_rankings: int,
    args: argparse.Namespace,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """``runs`` simulated A/B tests of one kind of candidate."""
    started = time.time()
    verdicts, naive, traces = [], 0, []
    for run in range(runs):
        scores = simulate_scores(gap, args.max_rankings, args.k, args.tie_margin, rng)
        verdict = arena.decide(scores, args.alpha, min_rankings, args.max_rankings)
        seen = scores[: verdict.decided_at or len(scores)]
        verdicts.append(verdict)
        naive += naive_promotes(scores, min_rankings)
        if run < 5:
            bounds = arena.confidence_sequence(seen, args.alpha)
            traces.append(
                {"low": bounds.low.round(4).tolist(), "high": bounds.high.round(4).tolist()}
            )
    promoted = [v.decided_at for v in verdicts if v.action == "promote"]
    retired = [v.decided_at for v in verdicts if v.action == "retire"]
    inconclusive = sum("inconclusive" in v.reason for v in verdicts)
    return {
        "kind": name,
        "min_rankings": min_rankings,
        "quality_gap": gap,
        "pair_win_probability": NormalDist().cdf(gap / math.sqrt(2)),
        "runs": runs,
        "promoted": len(promoted),
        "retired": len(retired),
        "retired_inconclusive": inconclusive,
        "promotion_rate": len(promoted) / runs,
        "promotion_rate_95": wilson(len(promoted), runs),
        "rankings_to_promotion": summary(promoted),
        "rankings_to_retirement": summary(retired),
        "promoted_at": promoted,
        "retired_at": retired,
        "naive_peeking_promotion_rate": naive / runs,
        "seconds": time.time() - started,
        "traces": traces,
    }


def summary(values: list[int | None]) -> dict[str, float | None]:
    found = [float(v) for v in values if v is not None]
    return {
        "median": percentile(found, 50),
        "p90": percentile(found, 90),
        "min": min(found, default=None),
        "max": max(found, default=None),
    }


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson's 95% interval of a proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def plot(result: dict[str, Any], out: str) -> None:
    fig, axes = figure(1, 3, width=15, height=4)
    colours = {
        "A/A": "grey",
        "better (60/40)": "tab:green",
        "worse (40/60)": "tab:red",
        "better (60/40), no minimum": "tab:olive",
    }
    ax = axes[0][0]
    for kind in result["kinds"][:3]:
        for i, trace in enumerate(kind["traces"][:3]):
            t = np.arange(1, len(trace["low"]) + 1)
            label = kind["kind"] if i == 0 else None
            ax.fill_between(t, trace["low"], trace["high"], alpha=0.15, color=colours[kind["kind"]])
            ax.plot(t, trace["low"], color=colours[kind["kind"]], lw=0.8, label=label)
    ax.axhline(0.5, color="black", lw=0.8)
    ax.axvline(result["settings"]["min_rankings"], color="black", ls=":", lw=0.8)
    ax.set(xlabel="mixed rankings", ylabel="candidate win rate", ylim=(0, 1), xscale="log")
    ax.set_title("95% confidence sequences (3 runs each)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for kind in result["kinds"][1:]:
        key = "promoted" if kind["promoted"] else "retired"
        ax.hist(
            kind[f"{key}_at"],
            bins=30,
            alpha=0.6,
            color=colours[kind["kind"]],
            label=f"{kind['kind']}: {key}",
        )
    ax.set(xlabel="mixed rankings until the decision", ylabel="runs")
    ax.set_title("rankings to a decision", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[0][2]
    aa = result["kinds"][0]
    rates = [aa["promotion_rate"], aa["naive_peeking_promotion_rate"]]
    ax.bar(["always-valid\nsequence", "fixed 95% interval\nchecked every ranking"], rates)
    ax.axhline(0.05, color="red", ls="--", lw=0.8, label="target 5%")
    ax.set(ylabel="false promotion rate (A/A)")
    ax.set_title(f"A/A over {aa['runs']} runs", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, out, NAME)


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    gap = math.sqrt(2) * NormalDist().inv_cdf(0.6)
    kinds = []
    for name, g, runs, least in (
        ("A/A", 0.0, args.aa_runs, args.min_rankings),
        ("better (60/40)", gap, args.runs, args.min_rankings),
        ("worse (40/60)", -gap, args.runs, args.min_rankings),
        ("better (60/40), no minimum", gap, args.runs, 1),  # what the minimum costs
    ):
        kinds.append(run_kind(name, g, runs, least, args, rng))
        print(
            f"{name}: promoted {kinds[-1]['promoted']}/{runs}, retired {kinds[-1]['retired']}, "
            f"to promotion {kinds[-1]['rankings_to_promotion']}, "
            f"to retirement {kinds[-1]['rankings_to_retirement']}"
        )
    settings = {
        "alpha": args.alpha,
        "min_rankings": args.min_rankings,
        "max_rankings": args.max_rankings,
        "k": args.k,
        "tie_margin": args.tie_margin,
        "seed": args.seed,
    }
    result = {"settings": settings, "kinds": kinds}
    path = write_result(args.out, NAME, result)
    plot(result, args.out)
    print(f"wrote {path}")
    return 0
