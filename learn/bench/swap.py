"""``loopchat bench swap``: what users notice while versions are hot-swapped under them.

A real ``loopchat up`` serves while clients stream chat completions back to back (the official
``openai`` client, ``stream=True``). After a quiet phase, the benchmark promotes versions
through the admin API every few seconds (``POST /admin/checkpoints/{v}/promote``, the
operator's path), then lets the service run quietly again. It reports request latency p50/p99
and time to first token before, during and after the swaps, every failed request, any response
whose chunks named two versions (the engine contract says none), and how long each promotion
took to reach users (first chunk carrying the new ``system_fingerprint``). That last figure
includes waiting for a request that starts after the promotion to produce its first token; the
engine's own switch time (``loopchat_swap_seconds`` from ``GET /metrics``: adapter switches and
weight reloads) is reported beside it.

The swapped-in versions are registered copies of the served model: the engine reloads real
weights from a new directory each time, which is the cost being measured. With ``--adapters``
(a model above ``LOOPCHAT_LORA_ABOVE``) they are LoRA adapters over the served base instead, as
the loop makes for such a model: the engine loads an adapter and switches, the base stays.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from learn.bench.common import (
    Service,
    add_common_arguments,
    bench_redis,
    figure,
    latency_stats,
    model_dir,
    save_figure,
    scratch_dir,
    service,
    write_result,
)
from learn.errors import LearnError
from learn.simulate import ServiceClient

NAME = "bench-swap"
PHASES = ("before", "during", "after")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, engine="vllm")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent streaming clients.")
    parser.add_argument("--n", type=int, default=2, help="Candidates per request (2).")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request.")
    parser.add_argument(
        "--quiet-seconds", type=float, default=20, help="Length of the before and after phases."
    )
    parser.add_argument("--swaps", type=int, default=6, help="Promotions during the run (6).")
    parser.add_argument(
        "--swap-every", type=float, default=3, help="Seconds between promotions (3)."
    )
    parser.add_argument(
        "--adapters", action="store_true",
        help="Swap LoRA adapter versions over the served base (a model above "
        "LOOPCHAT_LORA_ABOVE) instead of full copies.",
    )  # fmt: skip


@dataclass
class Request:
    """One streamed request as the client saw it."""

    start: float
    end: float = 0.0
    first_token: float | None = None
    versions: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Swap:
    version: str
    sent: float
    answered: float = 0.0
    status: int = 0


async def _stream_one(client: ServiceClient, messages: list[dict], args: Any) -> Request:
    request = Request(start=time.monotonic())
    try:
        stream = await client.complete(
            messages, args.n, "bench-swap", max_tokens=args.max_tokens, stream=True
        )
        async for chunk in stream:
            if chunk.system_fingerprint and chunk.system_fingerprint not in request.versions:
                request.versions.append(chunk.system_fingerprint)
            if request.first_token is None and any(c.delta.content for c in chunk.choices):
                request.first_token = time.monotonic()
    except Exception as exc:  # every failure is what this benchmark counts
        request.error = f"{type(exc).__name__}: {exc}"
    request.end = time.monotonic()
    return request


async def _run(svc: Service, versions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from learn.builtin.corpus import prompts as corpus_prompts

    prompts = [m for _, m in corpus_prompts(4, seed=13, split="heldout")]
    client = ServiceClient(svc.url, timeout_s=120)
    requests: list[Request] = []
    swaps: list[Swap] = []
    stop = asyncio.Event()

    async def user(number: int) -> None:
        i = number
        while not stop.is_set():
            requests.append(await _stream_one(client, prompts[i % len(prompts)], args))
            i += args.clients

    async def operator(admin: httpx.AsyncClient) -> None:
        await asyncio.sleep(args.quiet_seconds)
        for i in range(args.swaps):
            swap = Swap(versions[i % len(versions)], time.monotonic())
            response = await admin.post(  # copies of the live model: no gate ran
                f"/admin/checkpoints/{swap.version}/promote",
                json={"force": True, "reason": "bench swap: copies of the live model"},
            )
            swap.answered, swap.status = time.monotonic(), response.status_code
            swaps.append(swap)
            await asyncio.sleep(args.swap_every)
        await asyncio.sleep(args.quiet_seconds)
        stop.set()

    for messages in prompts[:2]:  # warm-up
        await _stream_one(client, messages, args)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=svc.url, headers=svc.admin_headers, timeout=120) as admin:
        await asyncio.gather(operator(admin), *(user(i) for i in range(args.clients)))
        scraped = (await admin.get("/metrics")).text
    await client.aclose()
    return _analyse(requests, swaps, started) | {"engine_swaps": engine_swaps(scraped)}


def engine_swaps(exposition: str) -> dict[str, dict[str, Any]]:
    """Per kind of switch (adapter, weights): how many, their mean seconds, and how many took
    at most 1 s — read from the ``loopchat_swap_seconds`` histogram of a ``/metrics`` page."""
    from prometheus_client.parser import text_string_to_metric_families

    kinds: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != "loopchat_swap_seconds":
            continue
        for sample in family.samples:
            row = kinds.setdefault(sample.labels["kind"], {})
            if sample.name.endswith("_count"):
                row["count"] = int(sample.value)
            elif sample.name.endswith("_sum"):
                row["sum_s"] = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 1.0:
                row["within_1s"] = int(sample.value)
    return {
        kind: {**row, "mean_s": row["sum_s"] / row["count"] if row.get("count") else None}
        for kind, row in kinds.items()
    }


def _analyse(requests: list[Request], swaps: list[Swap], started: float) -> dict[str, Any]:
    first_swap = swaps[0].sent
    # "during" lasts until the last promoted version reaches a user (or the last promote + 1 s).
    last = swaps[-1]
    seen = [r.end for r in requests if r.start >= last.answered and last.version in r.versions]
    during_end = min(seen) if seen else last.answered + 1.0

    def phase(r: Request) -> str:
        if r.end < first_swap:
            return "before"
        return "during" if r.start <= during_end else "after"

    phases: dict[str, dict[str, Any]] = {}
    for name in PHASES:
        rows = [r for r in requests if phase(r) == name]
        ok = [r for r in rows if r.error is None]
        phases[name] = {
            "requests": len(rows),
            "failed": len(rows) - len(ok),
            "latency": latency_stats([r.end - r.start for r in ok]),
            "time_to_first_token": latency_stats(
                [r.first_token - r.start for r in ok if r.first_token is not None]
            ),
        }
    swap_rows = []
    for swap in swaps:
        reached = [
            r.first_token or r.end
            for r in requests
            if r.start >= swap.answered and swap.version in r.versions
        ]
        swap_rows.append(
            {
                "version": swap.version,
                "at_s": swap.sent - started,
                "status": swap.status,
                "promote_call_s": swap.answered - swap.sent,
                "served_after_s": (min(reached) - swap.sent) if reached else None,
            }
        )
    errors = sorted({r.error for r in requests if r.error})
    return {
        "phases": phases,
        "failed_requests": sum(p["failed"] for p in phases.values()),
        "mixed_version_responses": sum(len(r.versions) > 1 for r in requests),
        "error_examples": errors[:5],
        "swaps": swap_rows,
        "timeline": [
            {
                "start_s": r.start - started,
                "latency_s": r.end - r.start,
                "version": r.versions[-1] if r.versions else None,
                "failed": r.error is not None,
            }
            for r in requests
        ],
    }


def _register_versions(svc: Service, model: Path, count: int, adapters: bool) -> list[str]:
    """New policy versions as the operator's swap targets: copies of the served model, or LoRA
    adapters over it (rank ``LOOPCHAT_LORA_RANK``, small random weights: other answers)."""
    from serve.registry import Registry
    from serve.settings import Settings
    from serve.store import sync_client

    registry = Registry(sync_client(svc.redis_url), svc.checkpoints_url, svc.data_dir / "cache")
    live = registry.alias("live")
    if not adapters:
        versions = [
            registry.register(model, "ppo", live, {"bench": "swap"}, {"source": str(model)})
            for _ in range(count)
        ]
        return _gated(registry, versions)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from learn.modeling import load_causal_lm

    settings = Settings()
    versions = []
    for seed in range(count):
        torch.manual_seed(seed)
        lora = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                          target_modules="all-linear", init_lora_weights=False)  # fmt: skip
        out = svc.data_dir / f"bench-adapter-{seed}"
        get_peft_model(load_causal_lm(model), lora).save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(model)).save_pretrained(str(out))
        versions.append(
            registry.register(out, "rloo", live, {"bench": "swap"}, {"base": live, "adapter": True})
        )
    return _gated(registry, versions)


def _gated(registry: Any, versions: list[str]) -> list[str]:
    """Record a passing gate on the bench's versions (they are the served model or a small
    random adapter over it), so that promoting them is the operator's normal path."""
    for version in versions:
        registry.record_gate(version, {"passed": True, "reasons": ["bench swap version"]})
    return versions


def run(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.swaps < 1 or args.n < 1 or args.max_tokens < 1:
        raise LearnError("--clients, --swaps, --n and --max-tokens must be at least 1")
    if args.quiet_seconds <= 0 or args.swap_every <= 0:
        raise LearnError("--quiet-seconds and --swap-every must be positive")
    model = model_dir(args.model)
    env = {"LOOPCHAT_ROUND_EVERY": str(1 << 30), "LOOPCHAT_MAX_N": str(max(args.n, 1))}
    with scratch_dir("bench-swap") as work, bench_redis(args.redis_url, work) as redis_url:
        with service(model, work, redis_url, args.engine, env=env) as svc:
            versions = _register_versions(svc, model, 2, args.adapters)
            print(f"bench swap: {args.engine}, promoting {versions} {args.swaps}x", flush=True)
            measured = asyncio.run(_run(svc, versions, args))
    result = {
        "model": str(model),
        "engine": args.engine,
        "clients": args.clients,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "adapters": args.adapters,
        **measured,
    }
    path = write_result(args.out, NAME, result)
    plot = _plot(result, args.out)
    summary = ", ".join(
        f"{name} p50 {_s(p['latency']['p50_s'])} p99 {_s(p['latency']['p99_s'])}"
        for name, p in result["phases"].items()
    )
    switches = ", ".join(
        f"{kind} switches {row.get('count', 0)} (mean {_s(row['mean_s'])}, "
        f"{row.get('within_1s', 0)} within 1 s)"
        for kind, row in result["engine_swaps"].items()
    )
    print(
        f"bench swap: {summary}; failed {result['failed_requests']}, mixed "
        f"{result['mixed_version_responses']}; engine: {switches or 'no switches'}; "
        f"wrote {path} and {plot}"
    )
    return 0


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _plot(result: dict[str, Any], out: str) -> Path:
    fig, axes = figure(1, 2, width=12)
    timeline, bars = axes[0]
    versions = sorted({row["version"] for row in result["timeline"] if row["version"]})
    for version in versions:
        rows = [row for row in result["timeline"] if row["version"] == version]
        timeline.scatter(
            [r["start_s"] for r in rows], [r["latency_s"] for r in rows], s=8, label=version
        )
    failed = [row for row in result["timeline"] if row["failed"]]
    if failed:
        timeline.scatter(
            [r["start_s"] for r in failed], [r["latency_s"] for r in failed], marker="x",
            color="red", label="failed",
        )  # fmt: skip
    for i, swap in enumerate(result["swaps"]):
        timeline.axvline(swap["at_s"], color="grey", ls=":", label="promote" if i == 0 else None)
    timeline.set(xlabel="request start (s)", ylabel="request latency (s)")
    timeline.set_title("latency of each streamed request, by version that served it")
    timeline.legend(fontsize=8)
    names = list(result["phases"])
    x = range(len(names))
    p50 = [result["phases"][n]["latency"]["p50_s"] or 0 for n in names]
    p99 = [result["phases"][n]["latency"]["p99_s"] or 0 for n in names]
    bars.bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
    bars.bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
    bars.set_xticks(list(x), names)
    bars.set(ylabel="seconds")
    bars.set_title(f"latency by phase ({result['failed_requests']} failed requests)")
    bars.legend()
    for ax in (timeline, bars):
        ax.grid(alpha=0.3)
    return save_figure(fig, out, NAME)
