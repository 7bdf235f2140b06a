"""``loopchat bench serve``: generation throughput and latency, vLLM engine against HF engine.

Each engine is a real ``loopchat up`` process (one after the other, same model, same machine);
clients are the official ``openai`` client asking for ``n`` candidates per request, as the chat
page does, with held-out corpus prompts. At each concurrency level, that many clients send
requests back to back until the level's request budget (or time budget) is spent. Throughput
is completion tokens per second of wall time; latency is per request. The headline is the
ratio of vLLM's tokens/s to HF's at concurrency >= 8 (continuous batching is what vLLM adds).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from learn.bench.common import (
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

NAME = "bench-serve"
TARGET_RATIO = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, engine="")
    parser.add_argument(
        "--engines", default="vllm,hf", help="Engines to compare, in order (vllm,hf)."
    )
    parser.add_argument(
        "--concurrency", default="1,8,32", help="Concurrent clients per level (1,8,32)."
    )
    parser.add_argument("--n", type=int, default=4, help="Candidates per request (4).")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request.")
    parser.add_argument(
        "--requests", type=int, default=16, help="Requests per client at each level (16)."
    )
    parser.add_argument(
        "--seconds", type=float, default=90, help="Time budget of one level (90 s)."
    )


def _int_list(raw: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise LearnError(f"{flag} must be comma-separated integers, not {raw!r}") from None
    if not values or min(values) < 1:
        raise LearnError(f"{flag} must list positive integers")
    return values


async def _level(
    client: ServiceClient,
    prompts: list[list[dict]],
    concurrency: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """``concurrency`` clients, each sending up to ``args.requests`` requests in turn."""
    latencies: list[float] = []
    tokens = 0
    errors = 0
    deadline = time.monotonic() + args.seconds

    async def one_client(number: int) -> None:
        nonlocal tokens, errors
        for i in range(args.requests):
            if time.monotonic() > deadline:
                return
            messages = prompts[(number * args.requests + i) % len(prompts)]
            sent = time.perf_counter()
            try:
                reply = await client.complete(
                    messages, args.n, f"bench-{number}", max_tokens=args.max_tokens
                )
            except Exception:  # a failed request is a result, counted, not a crash
                errors += 1
                continue
            latencies.append(time.perf_counter() - sent)
            tokens += reply.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "completion_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "requests_per_s": len(latencies) / seconds,
        "latency": latency_stats(latencies),
    }


async def _measure(url: str, levels: list[int], args: argparse.Namespace) -> list[dict]:
    from learn.builtin.corpus import prompts as corpus_prompts

    prompts = [messages for _, messages in corpus_prompts(8, seed=11, split="heldout")]
    client = ServiceClient(url, timeout_s=600)
    try:
        for messages in prompts[:2]:  # warm-up: first-request costs are not throughput
            await client.complete(messages, args.n, "bench-warmup", max_tokens=args.max_tokens)
        return [await _level(client, prompts, c, args) for c in levels]
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - {"vllm", "hf"}:
        raise LearnError(f"--engines must list vllm and/or hf, not {args.engines!r}")
    levels = _int_list(args.concurrency, "--concurrency")
    if args.n < 1 or args.max_tokens < 1 or args.requests < 1 or args.seconds <= 0:
        raise LearnError("--n, --max-tokens, --requests and --seconds must be positive")
    model = model_dir(args.model)

    results: dict[str, list[dict]] = {}
    memory: dict[str, dict[str, float] | None] = {}
    with scratch_dir("bench-serve") as work:
        for engine in engines:
            print(f"bench serve: starting loopchat up --engine {engine}", flush=True)
            with bench_redis(args.redis_url, work / engine) as redis_url:
                env = {"LOOPCHAT_ROUND_EVERY": str(1 << 30), "LOOPCHAT_MAX_N": str(args.n)}
                with service(model, work, redis_url, engine, env=env) as svc:
                    results[engine] = asyncio.run(_measure(svc.url, levels, args))
                    memory[engine] = svc.memory.peak if svc.memory else None
            for row in results[engine]:
                print(f"  {engine} {_line(row)}", flush=True)

    ratios = _ratios(results)
    result = {
        "model": str(model),
        "n": args.n,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "engines": results,
        "peak_memory_mb": memory,
        "vllm_over_hf_tokens_per_s": ratios,
        "target": f"vLLM >= {TARGET_RATIO:g}x HF tokens/s at concurrency >= 8",
        "target_met": bool(ratios) and all(r >= TARGET_RATIO for r in ratios.values()),
    }
    path = write_result(args.out, NAME, result)
    plot = _plot(results, args.out)
    print(f"bench serve: ratios vLLM/HF {ratios}; wrote {path} and {plot}")
    return 0


def _line(row: dict[str, Any]) -> str:
    lat = row["latency"]
    p50, p99 = (f"{v:.3f} s" if v is not None else "-" for v in (lat["p50_s"], lat["p99_s"]))
    return (
        f"c={row['concurrency']:>3}: {row['tokens_per_s']:8.1f} tok/s, p50 {p50}, p99 {p99}, "
        f"{row['errors']} errors"
    )


def _ratios(results: dict[str, list[dict]]) -> dict[str, float]:
    """vLLM tokens/s over HF tokens/s at each shared concurrency level >= 8."""
    if not {"vllm", "hf"} <= results.keys():
        return {}
    hf = {row["concurrency"]: row["tokens_per_s"] for row in results["hf"]}
    return {
        str(row["concurrency"]): row["tokens_per_s"] / hf[row["concurrency"]]
        for row in results["vllm"]
        if row["concurrency"] >= 8 and hf.get(row["concurrency"])
    }


def _plot(results: dict[str, list[dict]], out: str) -> Path:
    fig, axes = figure(1, 2)
    throughput, latency = axes[0]
    for engine, rows in results.items():
        levels = [r["concurrency"] for r in rows]
        throughput.plot(levels, [r["tokens_per_s"] for r in rows], marker="o", label=engine)
        latency.plot(
            levels, [r["latency"]["p50_s"] for r in rows], marker="o", label=f"{engine} p50"
        )
        latency.plot(
            levels, [r["latency"]["p99_s"] for r in rows], marker="x", ls="--",
            label=f"{engine} p99",
        )  # fmt: skip
    throughput.set(xscale="log", xlabel="concurrent clients", ylabel="completion tokens/s")
    throughput.set_title("throughput (n candidates per request)")
    latency.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds")
    latency.set_title("request latency")
    for ax in (throughput, latency):
        ax.legend()
        ax.grid(alpha=0.3)
    return save_figure(fig, out, NAME)
