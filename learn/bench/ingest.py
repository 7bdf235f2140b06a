"""``loopchat bench ingest``: rankings stored per second by the service, and none lost.

Against a real ``loopchat up`` process and a real redis-server: completions are first created
through the chat API (their ids are what rankings name), then many users post rankings of them
concurrently for a bounded time. Each (completion, user) pair is ranked once, so every post is
a new ranking that must be stored. The proof of no loss reads the feedback stream afterwards:
its entries must be exactly the rankings answered ``201`` (same count, same event ids).

The per-user rate limit is raised for the run (it would cap each simulated user at 120 a
minute); everything else — validation, the dedupe-and-append script, the loop trigger — is the
production path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections import Counter
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

NAME = "bench-ingest"
TARGET_PER_S = 1000
STREAM = "loopchat:feedback"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, engine="hf")
    parser.add_argument("--seconds", type=float, default=15, help="How long to post (15 s).")
    parser.add_argument(
        "--connections", type=int, default=64, help="Concurrent HTTP connections posting (64)."
    )
    parser.add_argument(
        "--completions", type=int, default=256, help="Completions created first (256)."
    )
    parser.add_argument("--k", type=int, default=4, help="Candidates per completion (4).")
    parser.add_argument(
        "--max-rankings", type=int, default=100_000, help="Upper bound on rankings posted."
    )
    parser.add_argument(
        "--redis-fsync",
        choices=["everysec", "always"],
        default="everysec",
        help="appendfsync of the private embedded redis-server (LOOPCHAT_REDIS_FSYNC): "
        "`always` measures what a 201 that survives power loss costs. Results of `always` go "
        "to bench-ingest-fsync-always.*",
    )


async def _create_completions(url: str, count: int, k: int) -> list[str]:
    from learn.builtin.corpus import prompts as corpus_prompts

    prompts = [m for _, m in corpus_prompts(max(1, count // 11 + 1), seed=5, split="heldout")]
    client = ServiceClient(url, timeout_s=600)
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> str:
        async with gate:
            reply = await client.complete(prompts[i % len(prompts)], k, "ingest", max_tokens=4)
        return reply.id

    try:
        return list(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        await client.aclose()


async def _post_rankings(
    url: str, completion_ids: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Post rankings from ``--connections`` concurrent loops until time or pairs run out.

    The load comes from aiohttp: at these rates httpx's connection pool, not the service,
    would be what is measured (it managed a fifth of aiohttp's rate against the same server).
    """
    import aiohttp

    users = math.ceil(args.max_rankings / len(completion_ids))
    pairs = ((cid, f"ingest-{u}") for u in range(users) for cid in completion_ids)
    rng = random.Random(0)
    statuses: Counter = Counter()
    stored_ids: list[str] = []
    latencies: list[float] = []
    per_second: Counter = Counter()
    connector = aiohttp.TCPConnector(limit=args.connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:
        started = time.perf_counter()
        deadline = started + args.seconds

        async def poster() -> None:
            for cid, user in pairs:
                if time.perf_counter() > deadline:
                    return
                order = list(range(args.k))
                rng.shuffle(order)
                body = {"completion_id": cid, "ranking": order, "user": user}
                sent = time.perf_counter()
                try:
                    async with http.post("/v1/feedback", json=body) as response:
                        status = response.status
                        reply = await response.json() if status == 201 else None
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                done = time.perf_counter()
                statuses[str(status)] += 1
                if reply is not None:
                    stored_ids.append(reply["id"])
                    latencies.append(done - sent)
                    per_second[int(done - started)] += 1

        await asyncio.gather(*(poster() for _ in range(args.connections)))
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "statuses": dict(statuses),
        "stored_ids": stored_ids,
        "latency": latency_stats(latencies),
        "per_second": [per_second[s] for s in range(int(seconds) + 1)],
    }


def _stream_ids(redis_url: str) -> list[str]:
    """The event id of every entry in the feedback stream, read in pages."""
    from serve.store import sync_client

    client = sync_client(redis_url)
    ids: list[str] = []
    start = "-"
    while batch := client.xrange(STREAM, start, "+", count=5000):
        ids += [json.loads(fields["event"])["id"] for _, fields in batch]
        start = f"({batch[-1][0]}"
    client.close()
    return ids


def run(args: argparse.Namespace) -> int:
    if min(args.seconds, args.connections, args.completions, args.max_rankings) <= 0:
        raise LearnError("--seconds, --connections, --completions, --max-rankings must be positive")
    if not 2 <= args.k <= 4:
        raise LearnError(f"--k must be 2, 3 or 4, not {args.k}")
    model = model_dir(args.model)
    # No access log: at these rates one line per request is what an operator turns off first.
    env = {"LOOPCHAT_MAX_N": str(args.k), "LOOPCHAT_ACCESS_LOG": "0"}
    if args.redis_fsync != "everysec" and args.redis_url is not None:
        raise LearnError("--redis-fsync applies to the private embedded redis-server only")
    name = NAME if args.redis_fsync == "everysec" else f"{NAME}-fsync-{args.redis_fsync}"
    fsync = args.redis_fsync
    with scratch_dir("bench-ingest") as work, bench_redis(args.redis_url, work, fsync) as redis_url:
        with service(model, work, redis_url, args.engine, env=env) as svc:
            print(f"bench ingest: creating {args.completions} completions", flush=True)
            completion_ids = asyncio.run(_create_completions(svc.url, args.completions, args.k))
            before = len(_stream_ids(redis_url))
            print(f"bench ingest: posting rankings for {args.seconds:g} s", flush=True)
            posted = asyncio.run(_post_rankings(svc.url, completion_ids, args))
            in_stream = _stream_ids(redis_url)
        redis_kind = "private embedded redis-server" if args.redis_url is None else "given URL"

    stored = posted.pop("stored_ids")
    new_entries = in_stream[before:]
    lost = sorted(set(stored) - set(new_entries))
    unexpected = sorted(set(new_entries) - set(stored))
    rate = len(stored) / posted["seconds"]
    result = {
        "model": str(model),
        "engine": args.engine,
        "redis": redis_kind,
        "redis_fsync": fsync if args.redis_url is None else "as configured",
        "connections": args.connections,
        "completions": len(completion_ids),
        "k": args.k,
        **posted,
        "rankings_201": len(stored),
        "stream_entries_added": len(new_entries),
        "lost": len(lost),
        "unexpected_entries": len(unexpected),
        "duplicates_in_stream": len(new_entries) - len(set(new_entries)),
        "rankings_per_s": rate,
        "target": f">= {TARGET_PER_S} rankings/s with zero loss",
        "target_met": rate >= TARGET_PER_S and not lost and not unexpected,
    }
    path = write_result(args.out, name, result)
    plot = _plot(result, args.out, name)
    print(
        f"bench ingest: {rate:.0f} rankings/s ({len(stored)} stored in {posted['seconds']:.1f} s), "
        f"stream +{len(new_entries)}, lost {len(lost)}, statuses {posted['statuses']}; "
        f"wrote {path} and {plot}"
    )
    return 0


def _plot(result: dict[str, Any], out: str, name: str) -> Path:
    fig, axes = figure(1, 1, width=7)
    ax = axes[0][0]
    per_second = result["per_second"]
    ax.bar(range(len(per_second)), per_second, width=0.9, label="rankings stored (201)")
    ax.axhline(TARGET_PER_S, color="red", ls="--", label=f"target {TARGET_PER_S}/s")
    ax.set(xlabel="second of the run", ylabel="rankings stored per second")
    ax.set_title(
        f"{result['rankings_per_s']:.0f}/s sustained; {result['rankings_201']} stored, "
        f"{result['stream_entries_added']} in stream, {result['lost']} lost "
        f"(appendfsync {result['redis_fsync']})"
    )
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, out, name)
