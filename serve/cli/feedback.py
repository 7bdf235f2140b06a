"""``loopchat feedback export|stats``: the stored rankings as files and as numbers.

``export --format rankings`` writes the stream's events as JSONL, exactly as stored (the input of
``loopchat train reward``). The other formats write one line per (better, worse) pair a ranking
implies (none between tied answers), for people who train elsewhere:

- ``trl-dpo`` (alias ``pairs``): the conversational preference format with an explicit prompt
  that TRL's DPO/reward trainers, ``datasets.load_dataset("json", ...)`` and OpenRLHF
  (``--prompt_key prompt``) read::

      {"prompt": [...messages...], "chosen": [{"role": "assistant", ...}],
       "rejected": [{"role": "assistant", ...}]}

- ``openai-dpo``: OpenAI's preference fine-tuning JSONL::

      {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
       "non_preferred_output": [{"role": "assistant", ...}]}

Both read the rankings the stream keeps (the newest ``LOOPCHAT_FEEDBACK_RETENTION``); ``stats``
also says how many older ones were trimmed (``trimmed``), so its totals are never silently short.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from serve.cli import CLIError


def register(parser: argparse.ArgumentParser, command: str) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write the rankings to a JSONL file")
    export.add_argument(
        "--format",
        choices=["rankings", "trl-dpo", "pairs", "openai-dpo"],
        default="rankings",
        help="rankings: the stored events; trl-dpo (or pairs): prompt/chosen/rejected chat "
        "messages (TRL, datasets, OpenRLHF); openai-dpo: OpenAI preference fine-tuning JSONL",
    )
    export.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    export.set_defaults(func=_export)
    stats = actions.add_parser("stats", help="counts per version and per user, ties, all-bad")
    stats.add_argument("--json", action="store_true", help="print the numbers as JSON")
    stats.set_defaults(func=_stats)


def preference_pairs(event: dict[str, Any]) -> Iterator[dict[str, list[dict[str, str]]]]:
    """The chosen/rejected records one ranking event yields (none between tied candidates)."""
    from serve.events import ranking_pairs

    def answer(index: int) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": event["candidates"][index]}]

    for better, worse in ranking_pairs(event["ranking"]):
        yield {"prompt": event["messages"], "chosen": answer(better), "rejected": answer(worse)}


def openai_preference_pairs(event: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The same pairs in OpenAI's preference fine-tuning (DPO) format."""
    for pair in preference_pairs(event):
        yield {
            "input": {"messages": pair["prompt"]},
            "preferred_output": pair["chosen"],
            "non_preferred_output": pair["rejected"],
        }


EXPORTS = {
    "rankings": lambda event: [event],
    "trl-dpo": preference_pairs,
    "pairs": preference_pairs,
    "openai-dpo": openai_preference_pairs,
}


_TOTALS = ("rankings", "pairs", "with_ties", "all_bad", "with_comment", "unusable")
_PRINTED = (*_TOTALS, "trimmed")  # trimmed: rankings dropped beyond the stream's retention


def summarise(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Rankings, pairs, ties and all-bad counts, overall and per version and user; and the
    rankings no pairwise learner can use (all tied, or all bad with nothing ordered), by
    reason: stored and counted, never silently dropped."""
    from serve.events import count_pairs, unusable_reason

    totals: Counter[str] = Counter()
    per_version: Counter[str] = Counter()
    per_user: Counter[str] = Counter()
    per_k: Counter[int] = Counter()
    unusable: Counter[str] = Counter()
    for event in events:
        if reason := unusable_reason(event):
            unusable[reason] += 1
        totals["rankings"] += 1
        totals["pairs"] += count_pairs(event["ranking"])
        totals["with_ties"] += any(len(group) > 1 for group in event["ranking"])
        totals["all_bad"] += bool(event["all_bad"])
        totals["with_comment"] += bool(event["comment"])
        per_version[event["version"]] += 1
        per_user[event["user"] or "(anonymous)"] += 1
        per_k[len(event["candidates"])] += 1
    totals["unusable"] = sum(unusable.values())
    return {
        **{name: totals[name] for name in _TOTALS},
        "per_version": dict(sorted(per_version.items())),
        "per_user": dict(per_user.most_common()),
        "per_candidates": {str(k): n for k, n in sorted(per_k.items())},
        "unusable_by_reason": dict(sorted(unusable.items())),
    }


def _log():
    from serve.events import FeedbackLog
    from serve.settings import Settings
    from serve.store import resolve_redis_url, sync_client

    return FeedbackLog(sync_client(resolve_redis_url(Settings())))


def _export(args: argparse.Namespace) -> int:
    if args.out.is_dir():
        raise CLIError(f"--out {args.out} is a directory; give a file name")
    if not args.out.parent.is_dir():
        raise CLIError(f"--out {args.out}: directory {args.out.parent} does not exist")
    # Written beside the target and renamed, so a crash never leaves a half file under its name.
    partial = args.out.with_name(f".{args.out.name}.partial")
    lines = 0
    with open(partial, "w", encoding="utf-8") as fh:
        for _, event in _log().iter_events():
            for record in EXPORTS[args.format](event):
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                lines += 1
    os.replace(partial, args.out)
    print(f"wrote {lines} {args.format} to {args.out}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    log = _log()
    numbers = {**summarise(event for _, event in log.iter_events()), "trimmed": log.trimmed_count()}
    if args.json:
        print(json.dumps(numbers, indent=2))
        return 0
    print("  ".join(f"{name.replace('_', ' ')} {numbers[name]}" for name in _PRINTED))
    for title in ("per_version", "per_user", "per_candidates", "unusable_by_reason"):
        print(f"{title.replace('_', ' ')}:")
        for name, n in numbers[title].items():
            print(f"  {name:<24} {n}")
    return 0
