"""``loopchat simulate``: simulated users chatting and ranking through a running service.

The users themselves (their chats, preferences and the HTTP client) are ``learn.simulate``;
this is only their command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx

from serve.cli import CLIError


def register(parser: argparse.ArgumentParser, command: str) -> None:
    from learn.simulate import BUILTIN_NAMES

    parser.add_argument("--url", default="http://127.0.0.1:8000", help="The service's base URL.")
    parser.add_argument("--users", type=int, default=4, help="Concurrent simulated users.")
    parser.add_argument("--rankings", type=int, default=100, help="Rankings to post in all.")
    parser.add_argument(
        "--preference",
        default="correctness",
        help=f"How users rank: {', '.join(BUILTIN_NAMES)}, or module:function taking "
        "(messages, candidates) and returning one score per candidate (higher is better).",
    )
    parser.add_argument("--k", type=int, default=4, help="Candidates per turn to rank (2..4).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the users' chats.")
    parser.add_argument("--api-key", default=None, help="Client API key, if the service needs one.")
    parser.add_argument("--turns", type=int, default=3, help="Most turns per chat.")
    parser.add_argument(
        "--topics",
        type=int,
        default=1,
        help="Held-out chats (a question, maybe its follow-up) strung into one conversation: "
        "users who change the subject. 1: a new chat per question, like the bench's prompts.",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request.")
    parser.add_argument("--temperature", type=float, default=None, help="Sampling temperature.")
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    parser.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    from learn.simulate import (
        PreferenceError,
        SimulationConfig,
        load_preference,
        run_simulation,
    )

    config = SimulationConfig(
        url=args.url,
        users=args.users,
        rankings=args.rankings,
        preference=args.preference,
        k=args.k,
        seed=args.seed,
        api_key=args.api_key,
        turns=args.turns,
        topics=args.topics,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    problems = config.problems()
    if problems:
        raise CLIError("; ".join(problems))
    try:
        preference = load_preference(config.preference)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    try:
        httpx.get(f"{config.url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise CLIError(f"no loopchat service answers at {config.url}: {exc}") from None
    try:
        summary = asyncio.run(run_simulation(config, preference))
    except PreferenceError as exc:
        raise CLIError(f"--preference {config.preference}: {exc}") from None
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.report())
    return 0 if summary.rankings == config.rankings else 1
