"""``loopchat bench loop``: does the served model get better from rankings, and how fast?

The whole product, measured from outside: ``loopchat up`` with its learning worker and
``LOOPCHAT_AUTO_PROMOTE=1`` on the built-in model, simulated users ranking with the
``correctness`` preference (``learn.simulate``). Rankings are posted in batches of exactly
``round_every``, so each batch's last ranking is the one that starts a round; then the benchmark
waits for that round and measures:

- **time to live**: from the batch's last ranking (its ``201``) to the first chat completion
  answered by the round's new version (its ``system_fingerprint``), when the gate promoted it;
- **the learning curve**: the live model's preferred-answer rate (the share of right answers
  among ``k`` sampled candidates) on a fixed set of held-out prompts whose questions no
  simulated user asks (so the curve shows answers to new questions), measured before any
  ranking and after each round, against the number of rankings collected so far — with the
  round's KL to the SFT reference next to the gate's KL budget.

Evaluation requests are ordinary chat completions that nobody ranks, so they never feed the
loop. Everything is bounded by ``--rankings`` and ``--max-minutes``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

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
from learn.simulate import (
    ServiceClient,
    SimulationConfig,
    load_preference,
    measure_rate,
    run_simulation,
    wait_for_round,
    wait_for_version,
)

NAME = "bench-loop"
TARGET_LIVE_S = 120.0
TARGET_GAIN = 0.20
TARGET_WITHIN = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, engine="vllm")
    parser.add_argument("--rankings", type=int, default=1024, help="Rankings to post in all.")
    parser.add_argument(
        "--round-every", type=int, default=128, help="Rankings per round (LOOPCHAT_ROUND_EVERY)."
    )
    parser.add_argument("--users", type=int, default=8, help="Concurrent simulated users.")
    parser.add_argument("--k", type=int, default=4, help="Candidates per turn (4).")
    parser.add_argument(
        "--eval-per-task", type=int, default=8, help="Held-out eval prompts per corpus task."
    )
    parser.add_argument(
        "--preference", default="correctness", help="The simulated users' preference."
    )
    parser.add_argument(
        "--loop-config", default=None, help="JSON LoopConfig overrides (LOOPCHAT_LOOP_CONFIG)."
    )
    parser.add_argument(
        "--max-minutes", type=float, default=45, help="Stop after this long, whatever is left."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the simulated users.")


class Deadline:
    """The run's time budget; every wait is cut to what is left of it."""

    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def eval_prompts(per_task: int) -> list[list[dict]]:
    """Fixed held-out prompts (a seed of their own; the users' chats leave their questions out)."""
    from learn.builtin.corpus import prompts

    return [messages for _, messages in prompts(per_task, seed=1234, split="heldout")]


async def _evaluate(
    client: ServiceClient, prompts: list[list[dict]], args: argparse.Namespace, greedy: bool = False
) -> dict[str, Any]:
    """The live model's rate on ``prompts``: ``k`` sampled answers each (what users get), or
    one greedy answer (``greedy``: the most likely answer, what sharpening alone could reach)."""
    k, sampling = (1, {"temperature": 0.0}) if greedy else (args.k, {})
    stats = await measure_rate(client, prompts, load_preference(args.preference), k, **sampling)
    version, best = max(stats.items(), key=lambda kv: kv[1].answers)
    return {"version": version, "rate": best.rate, "answers": best.answers}


async def _run(svc: Any, args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    client = ServiceClient(svc.url, timeout_s=300)
    prompts = eval_prompts(args.eval_per_task)
    asked = frozenset(m[-1]["content"] for m in prompts)  # the users never ask these
    curve = [{"rankings": 0, **await _evaluate(client, prompts, args)}]
    greedy = {"start": await _evaluate(client, prompts, args, greedy=True)}
    print(
        f"bench loop: start {curve[0]['version']} rate {curve[0]['rate']:.1%} "
        f"(greedy {greedy['start']['rate']:.1%})",
        flush=True,
    )
    rounds: list[dict[str, Any]] = []
    users_view: dict[str, dict] = {}
    posted = 0
    known: set[str] = set()
    batch = 0
    while posted + args.round_every <= args.rankings and deadline.left() > 0:
        config = SimulationConfig(
            url=svc.url, users=args.users, rankings=args.round_every,
            preference=args.preference, k=args.k, seed=args.seed * 1000 + batch,
            avoid=asked,
        )  # fmt: skip
        summary = await run_simulation(config)
        batch += 1
        posted += summary.rankings
        for version, stats in summary.to_dict()["versions"].items():
            users_view.setdefault(version, {"answers": 0, "score": 0.0})
            users_view[version]["answers"] += stats["answers"]
            users_view[version]["score"] += stats["rate"] * stats["answers"]
        if summary.rankings < args.round_every:
            print(f"bench loop: batch stopped early: {summary.report()}", flush=True)
            break
        record = await wait_for_round(svc.url, svc.admin_headers, known, deadline.left())
        if record is None:
            print("bench loop: no round finished within the time budget", flush=True)
            break
        known.add(record["round"])
        row = _round_row(record, summary.last_ranking_at, posted)
        if record.get("promoted"):
            live_at = await wait_for_version(client, record["candidate"], deadline.left())
            if live_at is not None:
                row["last_ranking_to_live_s"] = live_at - summary.last_ranking_at
        rounds.append(row)
        point = {"rankings": posted, **await _evaluate(client, prompts, args)}
        point["kl_to_sft"] = row["kl_to_sft"]
        curve.append(point)
        print(
            f"bench loop: {posted} rankings, round {row['status']} promoted={row['promoted']} "
            f"live {point['version']} rate {point['rate']:.1%} "
            f"to-live {_s(row.get('last_ranking_to_live_s'))}",
            flush=True,
        )
    greedy["end"] = await _evaluate(client, prompts, args, greedy=True)
    await client.aclose()
    users_rate = {v: {"answers": u["answers"], "rate": u["score"] / u["answers"]}
                  for v, u in users_view.items() if u["answers"]}  # fmt: skip
    return {
        "curve": curve, "greedy": greedy, "rounds": rounds, "posted": posted,
        "users_view": users_rate,
    }  # fmt: skip


def _round_row(record: dict[str, Any], last_ranking_at: float | None, posted: int) -> dict:
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
        "kl_to_sft": (record.get("ppo") or {}).get("kl"),
        "kl_to_live": gate.get("kl"),
        "gate_kl_budget": gate.get("kl_budget"),
        "rm_heldout_accuracy": (record.get("rm") or {}).get("heldout_accuracy"),
        "timings": record.get("timings"),
        "last_ranking_to_round_end_s": (
            record["finished_at"] - last_ranking_at
            if last_ranking_at and "finished_at" in record
            else None
        ),
        "last_ranking_to_live_s": None,
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def verdict(measured: dict[str, Any], kl_budget: float) -> dict[str, Any]:
    """The targets, measured; ``kl_budget`` is PPO's KL-to-SFT target (nats per answer)."""
    curve, rounds = measured["curve"], measured["rounds"]
    start = curve[0]["rate"]
    within = [p for p in curve if p["rankings"] <= TARGET_WITHIN]
    best = max(within, key=lambda p: p["rate"])
    live_times = [r["last_ranking_to_live_s"] for r in rounds if r["last_ranking_to_live_s"]]
    kl = [r["kl_to_sft"] for r in rounds if r["promoted"]]
    kl_ok = all(k is not None and k <= kl_budget for k in kl)
    return {
        "start_rate": start,
        "best_rate_within_1000": best["rate"],
        "best_at_rankings": best["rankings"],
        "gain_points_within_1000": 100 * (best["rate"] - start),
        "final_rate": curve[-1]["rate"],
        # Sharpening the start model into its own most likely answers gains this much; more
        # needs the policy to learn answers the start model does not rank first.
        "greedy_headroom_points": 100 * (measured["greedy"]["start"]["rate"] - start),
        "rounds_promoted": sum(r["promoted"] for r in rounds),
        "last_ranking_to_live_s": {
            "max": max(live_times, default=None),
            "median": percentile(live_times, 50),
        },
        "kl_to_sft_budget": kl_budget,
        "kl_to_sft_max_promoted": max(kl, default=None),
        "targets": {
            "live_within_120s": bool(live_times) and max(live_times) <= TARGET_LIVE_S,
            "gain_20_points_within_1000": best["rate"] - start >= TARGET_GAIN,
            "kl_within_budget": bool(kl) and kl_ok,
        },
    }


def run(args: argparse.Namespace) -> int:
    if args.round_every < 1 or args.rankings < args.round_every:
        raise LearnError("--round-every must be at least 1 and at most --rankings")
    if args.users < 1 or not 2 <= args.k <= 4 or args.max_minutes <= 0:
        raise LearnError("--users must be >= 1, --k 2..4, --max-minutes positive")
    try:
        load_preference(args.preference)
        loop_config = json.loads(args.loop_config) if args.loop_config else None
    except (ValueError, json.JSONDecodeError) as exc:
        raise LearnError(str(exc)) from None
    from learn.loop import LoopConfig  # what the worker will run: defaults + these overrides

    try:
        kl_budget = LoopConfig().with_overrides(loop_config or {}).ppo.kl_target
    except (TypeError, ValueError) as exc:
        raise LearnError(f"--loop-config: {exc}") from None
    deadline = Deadline(args.max_minutes)
    model = model_dir(args.model)
    env = {
        "LOOPCHAT_AUTO_PROMOTE": "1",
        "LOOPCHAT_ROUND_EVERY": str(args.round_every),
        "LOOPCHAT_FEEDBACK_RATE": str(10**6),  # simulated users rank faster than people
        "LOOPCHAT_MAX_N": str(args.k),
    }
    if loop_config is not None:
        env["LOOPCHAT_LOOP_CONFIG"] = json.dumps(loop_config)
    started = time.time()
    with scratch_dir("bench-loop") as work, bench_redis(args.redis_url, work) as redis_url:
        with service(model, work, redis_url, args.engine, worker=True, env=env) as svc:
            measured = asyncio.run(_run(svc, args, deadline))
    result = {
        "model": str(model),
        "engine": args.engine,
        "round_every": args.round_every,
        "users": args.users,
        "k": args.k,
        "preference": args.preference,
        "loop_config": loop_config,
        "wall_minutes": (time.time() - started) / 60,
        **verdict(measured, kl_budget),
        **measured,
    }
    path = write_result(args.out, NAME, result)
    plot = _plot(result, args.out)
    print(
        f"bench loop: rate {result['start_rate']:.1%} -> best {result['best_rate_within_1000']:.1%}"
        f" within {TARGET_WITHIN} rankings ({result['gain_points_within_1000']:+.1f} points), "
        f"last ranking -> live {result['last_ranking_to_live_s']}; wrote {path} and {plot}"
    )
    return 0


def _plot(result: dict[str, Any], out: str) -> Path:
    fig, axes = figure(1, 2, width=12)
    learning, latency = axes[0]
    curve = result["curve"]
    learning.plot(
        [p["rankings"] for p in curve], [100 * p["rate"] for p in curve], marker="o",
        label=f"live model ({result['preference']})",
    )  # fmt: skip
    for p in curve:
        learning.annotate(p["version"], (p["rankings"], 100 * p["rate"]), fontsize=8)
    start = 100 * curve[0]["rate"]
    learning.axhline(start + 100 * TARGET_GAIN, color="red", ls="--", label="target: +20 points")
    for moment, ls in (("start", ":"), ("end", "-.")):
        point = result["greedy"][moment]
        learning.axhline(
            100 * point["rate"], color="green", ls=ls,
            label=f"{point['version']} greedy ({moment})",
        )  # fmt: skip
    learning.axvline(TARGET_WITHIN, color="grey", ls=":")
    learning.set(xlabel="rankings collected", ylabel="preferred-answer rate (%)")
    learning.set_title("learning curve (held-out prompts)")
    learning.legend()
    rounds = result["rounds"]
    x = [r["rankings"] for r in rounds]
    latency.bar(
        x, [r["last_ranking_to_live_s"] or 0 for r in rounds],
        width=0.6 * result["round_every"], label="last ranking -> new version answering",
    )  # fmt: skip
    latency.axhline(TARGET_LIVE_S, color="red", ls="--", label=f"target {TARGET_LIVE_S:.0f} s")
    latency.set(xlabel="rankings collected", ylabel="seconds")
    latency.set_title("time from a round's last ranking to its version live")
    latency.legend()
    for ax in (learning, latency):
        ax.grid(alpha=0.3)
    return save_figure(fig, out, NAME)
