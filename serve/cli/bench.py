"""``loopchat bench NAME``: benchmarks, one per module, each writing JSON + PNG under results/.

A benchmark module provides ``add_arguments(parser)`` and ``run(args) -> int``; adding one is a
line in ``BENCHMARKS``. Only the chosen benchmark's module is imported.
"""

from __future__ import annotations

import argparse

from serve.cli.train import register_table

BENCHMARKS: dict[str, tuple[str, str]] = {
    "model": ("learn.bench.model", "quality: greedy answers to held-out prompts, % right per task"),
    "serve": ("learn.bench.serve", "generation throughput and latency, vLLM vs HF engine"),
    "ingest": ("learn.bench.ingest", "rankings stored per second, none lost"),
    "loop": ("learn.bench.loop", "does the served model improve from rankings, how fast"),
    "swap": ("learn.bench.swap", "what clients notice while versions are hot-swapped"),
    "ppo": ("learn.bench.ppo", "PPO episodes per second, loopchat's trainer vs TRL's"),
    "ab": ("learn.bench.ab", "promotion by win rate: A/A false promotions, rankings to decide"),
    "attack": ("learn.bench.attack", "one identity's adversarial rankings vs the reward model"),
}


def register(parser: argparse.ArgumentParser, command: str) -> None:
    register_table(parser, BENCHMARKS, "BENCHMARK")
