"""``loopchat bench loop``: does the served model get better from rankings, and how fast?

The whole product, measured from outside, once per *arm*: ``loopchat up`` with its learning
worker and ``LOOPCHAT_AUTO_PROMOTE=1`` on the built-in model, a learner
(``LOOPCHAT_LEARNER``), and simulated users ranking by one preference (``learn.simulate``).
Rankings are posted in batches of exactly ``round_every``, so each batch's last ranking starts
a round; the benchmark waits for it and measures:

- **time to live**: from the batch's last ranking (its ``201``) to the first chat completion
  answered by the round's new version (its ``system_fingerprint``), when the gate promoted it;
- **the gain**: the live model's preferred-answer rate on fixed held-out prompts — ``k`` sampled
  answers each (what users see) and one greedy answer — for the **final** model against the
  start, as a paired difference over prompts with its standard error and 95% interval. The
  prompts (``--eval-per-task`` per corpus task, from their own seed) are never asked by the
  simulated users, so neither the reward model, nor the learner, nor the gate (which judges on
  the users' held-out rankings) ever sees them. No "best of several evaluations" is reported:
  the curve after each round is shown, on a subset (``--curve-per-task``), as what it is.

Two controls run in the same invocation and table: **shuffled** (users rank at random: the
default learner must gain ≈ 0) and **no feedback** (best-of-n distillation that keeps a random
sample: self-distillation at the sampling temperature, what training on the model's own answers
gives without any preference). Every arm's answers are scored by every preference, so a row
also shows what one preference did to the others.

The **ceiling** is measured on the start model too: greedy (what sharpening alone reaches) and
pass@k (any of the ``k`` sampled answers right: what best-of-k selection could reach).

Evaluation requests are ordinary chat completions that nobody ranks, so they never feed the
loop. Everything is bounded by ``--rankings`` and ``--max-minutes`` per arm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learn.bench.common import (
    add_common_arguments,
    bench_redis,
    figure,
    model_dir,
    percentile,
    save_figure,
    scratch_dir,
    service,
    write_result,
)
from learn.errors import LearnError
from learn.gate import mean_with_error
from learn.learner import LEARNERS
from learn.simulate import (
    ServiceClient,
    SimulationConfig,
    judge,
    load_preference,
    run_simulation,
    sample_candidates,
    wait_for_round,
    wait_for_version,
)

NAME = "bench-loop"
TARGET_LIVE_S = 120.0
TARGET_RUN_MINUTES = 30.0
TARGET_POINTS = {"correctness": 15.0, "brevity": 20.0, "politeness": 20.0}
PREFERENCES = ("correctness", "brevity", "politeness")
# The no-feedback control: a learner that never looks at a ranking or a reward.
NO_FEEDBACK = {"learner": "bon", "bon": {"select": "random", "use_user_best": False}}
# Learners by name (learn.learner) and variants: name -> the loop config that selects it.
VARIANTS: dict[str, dict[str, Any]] = {name: {"learner": name} for name in LEARNERS} | {
    "bon-users": {"learner": "bon", "bon": {"select": "users"}},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, engine="vllm")
    parser.add_argument("--rankings", type=int, default=1024, help="Rankings to post per arm.")
    parser.add_argument(
        "--round-every", type=int, default=128, help="Rankings per round (LOOPCHAT_ROUND_EVERY)."
    )
    parser.add_argument("--users", type=int, default=8, help="Concurrent simulated users.")
    parser.add_argument("--k", type=int, default=4, help="Candidates per turn (4).")
    parser.add_argument(
        "--learners", default="dpo", help=f"Comma-separated learners ({', '.join(VARIANTS)})."
    )
    parser.add_argument(
        "--preferences", default="correctness",
        help=f"Comma-separated preferences the users rank by ({', '.join(PREFERENCES)}).",
    )  # fmt: skip
    parser.add_argument(
        "--controls", default="shuffled,none",
        help="Comma-separated controls run with the first learner: shuffled, none (or '').",
    )  # fmt: skip
    parser.add_argument(
        "--eval-per-task", type=int, default=64, help="Held-out eval prompts per corpus task."
    )
    parser.add_argument(
        "--curve-per-task", type=int, default=16,
        help="Of those, the prompts re-measured after every round for the curve.",
    )  # fmt: skip
    parser.add_argument(
        "--loop-config", default=None, help="JSON LoopConfig overrides for every arm."
    )
    parser.add_argument(
        "--max-minutes", type=float, default=45, help="Stop an arm after this long."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the simulated users.")


@dataclass
class Arm:
    """One run of the matrix: a learner, what the users rank by, and the loop's overrides."""

    name: str
    learner: str
    users: str  # the simulated users' preference
    loop_config: dict[str, Any] = field(default_factory=dict)
    control: str | None = None


def plan(args: argparse.Namespace) -> list[Arm]:
    """Every learner on the first preference, then the controls (with the first learner), then
    every learner on the other preferences: a run cut short still has the controls."""
    learners = [name for name in args.learners.split(",") if name]
    preferences = [name for name in args.preferences.split(",") if name]
    controls = [name for name in args.controls.split(",") if name]
    unknown = (
        [n for n in learners if n not in VARIANTS]
        + [n for n in preferences if n not in PREFERENCES]
        + [n for n in controls if n not in ("shuffled", "none")]
    )
    if unknown or not learners or not preferences:
        raise LearnError(f"--learners/--preferences/--controls: unknown or empty {unknown}")

    def on(preference: str) -> list[Arm]:
        return [Arm(f"{lr}/{preference}", lr, preference, VARIANTS[lr]) for lr in learners]

    arms = on(preferences[0])
    if "shuffled" in controls:
        arms.append(Arm(f"{learners[0]}/shuffled", learners[0], "shuffled",
                        VARIANTS[learners[0]], control="shuffled"))  # fmt: skip
    if "none" in controls:  # the users rank as usual; the learner never looks
        arms.append(Arm("no feedback", "bon", preferences[0], NO_FEEDBACK, control="none"))
    return arms + [arm for preference in preferences[1:] for arm in on(preference)]


class Deadline:
    """An arm's time budget; every wait is cut to what is left of it."""

    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def eval_prompts(per_task: int) -> list[list[dict]]:
    """Fixed held-out prompts (a seed of their own; the users' chats leave their questions
    out), task by task in the same order for every ``per_task``: the first ``n`` of each task
    are the same prompts whatever ``per_task`` is, so the curve's subset is part of the whole."""
    from learn.builtin.corpus import prompts

    by_task: dict[str, list[list[dict]]] = {}
    for task, messages in prompts(per_task, seed=1234, split="heldout"):
        by_task.setdefault(task, []).append(messages)
    return [messages for task in sorted(by_task) for messages in by_task[task]]


def curve_subset(prompts: list[list[dict]], per_task: int, subset: int) -> list[int]:
    """Indices of the first ``subset`` prompts of every task in ``eval_prompts(per_task)``."""
    return [i for i in range(len(prompts)) if i % per_task < subset]


@dataclass
class Scores:
    """Per-prompt mean score of the sampled answers (and whether any was right: pass@k), per
    preference, and which version answered."""

    version: str
    mean: dict[str, list[float]]
    best: dict[str, list[float]]


async def evaluate(
    client: ServiceClient, prompts: list[list[dict]], k: int, greedy: bool = False
) -> Scores:
    """The live model's answers to ``prompts`` scored by every preference: ``k`` sampled
    answers each (what users get), or one greedy answer (``greedy``)."""
    sampling: dict[str, Any] = {"temperature": 0.0} if greedy else {}
    answered = await sample_candidates(client, prompts, 1 if greedy else k, **sampling)
    versions = [version for version, _ in answered]
    mean: dict[str, list[float]] = {}
    best: dict[str, list[float]] = {}
    for name in PREFERENCES:
        preference = load_preference(name)
        scored = [judge(preference, p, c) for p, (_, c) in zip(prompts, answered, strict=True)]
        mean[name] = [sum(s) / len(s) for s in scored]
        best[name] = [max(s) for s in scored]
    return Scores(max(set(versions), key=versions.count), mean, best)


def gain(start: list[float], end: list[float]) -> dict[str, float]:
    """The final-minus-start rate in points, paired by prompt: mean, SE, 95% interval."""
    estimate = mean_with_error(100 * (torch.tensor(end) - torch.tensor(start)))
    return {"start": 100 * sum(start) / len(start), "end": 100 * sum(end) / len(end), **estimate}


async def run_arm(svc: Any, arm: Arm, args: argparse.Namespace, deadline: Deadline) -> dict:
    """Start → rounds → final for one arm; the numbers, not yet the verdict."""
    client = ServiceClient(svc.url, timeout_s=300)
    prompts = eval_prompts(args.eval_per_task)
    subset = curve_subset(prompts, args.eval_per_task, args.curve_per_task)
    asked = frozenset(m[-1]["content"] for m in prompts)  # the users never ask these
    start = await evaluate(client, prompts, args.k)
    start_greedy = await evaluate(client, prompts, args.k, greedy=True)
    curve = [curve_point(0, start, start, subset)]
    rounds: list[dict[str, Any]] = []
    posted, batch, known = 0, 0, set()
    while posted + args.round_every <= args.rankings and deadline.left() > 0:
        config = SimulationConfig(
            url=svc.url, users=args.users, rankings=args.round_every, preference=arm.users,
            k=args.k, seed=args.seed * 1000 + batch, avoid=asked,
        )  # fmt: skip
        summary = await run_simulation(config)
        batch += 1
        posted += summary.rankings
        if summary.rankings < args.round_every:
            print(f"bench loop: {arm.name}: batch stopped early: {summary.report()}", flush=True)
            break
        record = await wait_for_round(svc.url, svc.admin_headers, known, deadline.left())
        if record is None:
            print(f"bench loop: {arm.name}: no round finished in time", flush=True)
            break
        known.add(record["round"])
        row = round_row(record, summary.last_ranking_at, posted)
        if record.get("promoted"):
            live_at = await wait_for_version(client, record["candidate"], deadline.left())
            if live_at is not None:
                row["last_ranking_to_live_s"] = live_at - summary.last_ranking_at
        rounds.append(row)
        now = await evaluate(client, [prompts[i] for i in subset], args.k)
        curve.append(curve_point(posted, start, now, subset, already_subset=True))
        print(
            f"bench loop: {arm.name}: {posted} rankings, round {row['status']} "
            f"promoted={row['promoted']} live {now.version} "
            f"{arm_focus(arm)} {curve[-1]['gain'][arm_focus(arm)]['mean']:+.1f} points",
            flush=True,
        )
    final = await evaluate(client, prompts, args.k)
    final_greedy = await evaluate(client, prompts, args.k, greedy=True)
    await client.aclose()
    return {
        "arm": arm.name, "learner": arm.learner, "users": arm.users, "control": arm.control,
        "loop_config": arm.loop_config, "posted": posted, "prompts": len(prompts),
        "start_version": start.version, "final_version": final.version,
        "sampled": {p: gain(start.mean[p], final.mean[p]) for p in PREFERENCES},
        "greedy": {p: gain(start_greedy.mean[p], final_greedy.mean[p]) for p in PREFERENCES},
        "ceiling": {p: ceiling(start, start_greedy, p, args.k) for p in PREFERENCES},
        "curve": curve, "rounds": rounds,
    }  # fmt: skip


def ceiling(start: Scores, greedy: Scores, preference: str, k: int) -> dict[str, float]:
    """What the start model could reach without new skills: its greedy rate (sharpening) and
    pass@k (best of its ``k`` samples, the rate a perfect selector of its answers gets)."""
    return {
        "sampled": 100 * sum(start.mean[preference]) / len(start.mean[preference]),
        "greedy": 100 * sum(greedy.mean[preference]) / len(greedy.mean[preference]),
        f"pass@{k}": 100 * sum(start.best[preference]) / len(start.best[preference]),
    }


def arm_focus(arm: Arm) -> str:
    """The preference an arm is judged by (a control: correctness, the hardest)."""
    return arm.users if arm.users in PREFERENCES else "correctness"


def curve_point(
    rankings: int, start: Scores, now: Scores, subset: list[int], already_subset: bool = False
) -> dict[str, Any]:
    """The gain so far on the curve's subset of prompts, every preference."""
    pick = (lambda xs: xs) if already_subset else (lambda xs: [xs[i] for i in subset])
    return {
        "rankings": rankings,
        "version": now.version,
        "gain": {
            p: gain([start.mean[p][i] for i in subset], pick(now.mean[p])) for p in PREFERENCES
        },
    }


def round_row(record: dict[str, Any], last_ranking_at: float | None, posted: int) -> dict:
    gate = record.get("gate") or {}
    return {
        "round": record["round"],
        "status": record["status"],
        "error": record.get("error"),
        "rankings": posted,
        "candidate": record.get("candidate"),
        "promoted": bool(record.get("promoted")),
        "gate_passed": gate.get("passed"),
        "gate_reason": gate.get("reason"),
        "kl_to_sft": gate.get("kl_to_sft"),
        "kl_to_live": gate.get("kl_to_live"),
        "gate_kl_budget": gate.get("kl_budget"),
        "rm_heldout_accuracy": (record.get("rm") or {}).get("heldout_accuracy"),
        "round_seconds": (record.get("timings") or {}).get("total"),
        "timings": record.get("timings"),
        "last_ranking_to_live_s": None,
    }


def verdict(run: dict[str, Any], kl_budget: float, minutes: float) -> dict[str, Any]:
    """An arm's targets, read off its final-vs-start gain, its rounds and its wall time."""
    focus = run["users"] if run["users"] in PREFERENCES else "correctness"
    measured = run["sampled"][focus]
    live_times = [r["last_ranking_to_live_s"] for r in run["rounds"] if r["last_ranking_to_live_s"]]
    kl = [r["kl_to_sft"] for r in run["rounds"] if r["promoted"] and r["kl_to_sft"] is not None]
    round_s = [r["round_seconds"] for r in run["rounds"] if r["round_seconds"]]
    if run["control"] == "shuffled":
        gain_ok: bool | None = measured["low"] <= 0 <= measured["high"]  # must show nothing
    elif run["control"]:
        gain_ok = None  # no feedback: what it gains is the measurement, not a target
    else:
        gain_ok = measured["mean"] >= TARGET_POINTS[focus] and measured["low"] > 0
    return {
        "judged_by": focus,
        "gain_points": measured["mean"],
        "gain_interval": [measured["low"], measured["high"]],
        "rounds_promoted": sum(r["promoted"] for r in run["rounds"]),
        "round_seconds_median": percentile(round_s, 50),
        "last_ranking_to_live_s": {
            "max": max(live_times, default=None),
            "median": percentile(live_times, 50),
        },  # fmt: skip
        "kl_to_sft_max_promoted": max(kl, default=None),
        "wall_minutes": minutes,
        "targets": {
            "gain": gain_ok,
            "live_within_120s": bool(live_times) and max(live_times) <= TARGET_LIVE_S,
            "kl_within_budget": all(k <= kl_budget for k in kl),
            "run_within_30_min": minutes <= TARGET_RUN_MINUTES,
        },
    }


def run(args: argparse.Namespace) -> int:
    if args.round_every < 1 or args.rankings < args.round_every:
        raise LearnError("--round-every must be at least 1 and at most --rankings")
    if args.users < 1 or not 2 <= args.k <= 4 or args.max_minutes <= 0:
        raise LearnError("--users must be >= 1, --k 2..4, --max-minutes positive")
    if not 1 <= args.curve_per_task <= args.eval_per_task:
        raise LearnError("--curve-per-task must be between 1 and --eval-per-task")
    arms = plan(args)
    try:
        shared = json.loads(args.loop_config) if args.loop_config else {}
    except json.JSONDecodeError as exc:
        raise LearnError(f"--loop-config: {exc}") from None
    from learn.loop import LoopConfig  # what the worker will run: defaults + these overrides

    try:
        kl_budget = LoopConfig().with_overrides(shared).gate.kl_budget
        for arm in arms:
            LoopConfig().with_overrides({**shared, **arm.loop_config})
    except (TypeError, ValueError) as exc:
        raise LearnError(f"--loop-config: {exc}") from None
    model = model_dir(args.model)
    started = time.time()
    result = {
        "model": str(model), "engine": args.engine, "round_every": args.round_every,
        "rankings": args.rankings, "users": args.users, "k": args.k,
        "eval_per_task": args.eval_per_task, "curve_per_task": args.curve_per_task,
        "loop_config": shared, "kl_budget": kl_budget, "runs": [],
    }  # fmt: skip
    for arm in arms:
        arm_started = time.time()
        env = {
            "LOOPCHAT_AUTO_PROMOTE": "1",
            "LOOPCHAT_AB_SHARE": "0",  # each round's gate decides (`bench ab`: the A/B rule)
            "LOOPCHAT_ROUND_EVERY": str(args.round_every),
            "LOOPCHAT_MAX_N": str(args.k),
            "LOOPCHAT_LOOP_CONFIG": json.dumps({**shared, **arm.loop_config}),
        }
        with scratch_dir("bench-loop") as work, bench_redis(args.redis_url, work) as redis_url:
            with service(model, work, redis_url, args.engine, worker=True, env=env) as svc:
                measured = asyncio.run(run_arm(svc, arm, args, Deadline(args.max_minutes)))
                measured["peak_memory_mb"] = svc.memory.peak if svc.memory else None
        minutes = (time.time() - arm_started) / 60
        result["runs"].append({**measured, **verdict(measured, kl_budget, minutes)})
        result["wall_minutes"] = (time.time() - started) / 60
        path = write_result(args.out, NAME, result)  # after every arm: a long run keeps its part
        plot = _plot(result, args.out)
        (Path(args.out) / f"{NAME}.md").write_text(markdown_table(result))
        print(f"bench loop: {arm.name}: {summary_line(result['runs'][-1])}", flush=True)
    print(f"bench loop: wrote {path} and {plot}")
    return 0


def markdown_table(result: dict[str, Any]) -> str:
    """The README's table of this run: one row per arm, the final model against the start."""

    def points(g: dict[str, float]) -> str:
        return f"{g['mean']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}]"

    head = (
        "| arm | users rank by | "
        + " | ".join(f"{p} (sampled, 95%)" for p in PREFERENCES)
        + " | greedy, judged | KL to SFT (max live) | s / round | last ranking → live (max) |"
    )
    rows = [head, "|" + " --- |" * (6 + len(PREFERENCES))]
    for run in result["runs"]:
        judged = run["judged_by"]
        kl = run["kl_to_sft_max_promoted"]
        live = run["last_ranking_to_live_s"]["max"]
        rows.append(
            f"| {run['arm']} | {run['users']} | "
            + " | ".join(("**" if p == judged else "") + points(run["sampled"][p])
                         + ("**" if p == judged else "") for p in PREFERENCES)
            + f" | {run['greedy'][judged]['mean']:+.1f} | {'-' if kl is None else f'{kl:.2f}'}"
            f" | {run['round_seconds_median']:.0f} | {'-' if live is None else f'{live:.0f} s'} |"
        )  # fmt: skip
    return "\n".join(rows) + "\n"


def summary_line(run: dict[str, Any]) -> str:
    lo, hi = run["gain_interval"]
    return (
        f"{run['judged_by']} {run['gain_points']:+.1f} points (95% [{lo:+.1f}, {hi:+.1f}]), "
        f"greedy {run['greedy'][run['judged_by']]['mean']:+.1f}, "
        f"KL max {run['kl_to_sft_max_promoted']}, round {run['round_seconds_median']} s, "
        f"{run['wall_minutes']:.1f} min"
    )


def _plot(result: dict[str, Any], out: str) -> Path:
    """One panel per preference: each arm's gain so far (points, with its 95% band) against the
    rankings collected, and the final gain on all eval prompts as a marker at the end."""
    fig, axes = figure(1, len(PREFERENCES), width=6 * len(PREFERENCES))
    for ax, preference in zip(axes[0], PREFERENCES, strict=True):
        for run in result["runs"]:
            if run["users"] != preference and not run["control"]:
                continue
            x = [p["rankings"] for p in run["curve"]]
            g = [p["gain"][preference] for p in run["curve"]]
            style = ":" if run["control"] else "-"
            (line,) = ax.plot(x, [p["mean"] for p in g], style, marker="o", label=run["arm"])
            ax.fill_between(x, [p["low"] for p in g], [p["high"] for p in g],
                            color=line.get_color(), alpha=0.15)  # fmt: skip
            final = run["sampled"][preference]
            ax.errorbar([run["posted"]], [final["mean"]], yerr=[[final["mean"] - final["low"]],
                        [final["high"] - final["mean"]]], color=line.get_color(), marker="s",
                        capsize=4)  # fmt: skip
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(TARGET_POINTS[preference], color="red", ls="--", label="target")
        ax.set(xlabel="rankings collected", ylabel=f"{preference}: gain over start (points)")
        ax.set_title(f"{preference} (band: 95% interval; square: final, all eval prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out, NAME)
