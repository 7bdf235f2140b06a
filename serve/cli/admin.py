"""``loopchat checkpoints | promote VERSION | rollback | unpin | leaderboard``: the operator's
commands.

They work on the registry in Redis directly (settings from ``LOOPCHAT_*``), so they need no
running server; every serving process follows the change through the registry's channel.
"""

from __future__ import annotations

import argparse
import getpass
import json
import time

from serve.cli import CLIError


def register(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of ``checkpoints``, ``leaderboard``, ``promote`` and ``rollback``."""
    if command == "checkpoints":
        parser.add_argument(
            "action", nargs="?", choices=["list", "export"], default="list",
            help="list (default) or export VERSION --out DIR (a Hugging Face directory)",
        )  # fmt: skip
        parser.add_argument("version", nargs="?", help="the version to export")
        parser.add_argument("--out", help="export: the directory to write")
        parser.add_argument("--json", action="store_true", help="print the raw JSON")
        parser.set_defaults(func=_checkpoints)
        return
    if command == "leaderboard":
        parser.add_argument("--json", action="store_true", help="print the raw JSON")
        parser.set_defaults(func=_leaderboard)
        return
    if command == "promote":
        parser.add_argument("version", help="policy version to make live, e.g. v3")
        parser.add_argument(
            "--force",
            action="store_true",
            help="promote although its gate failed or has not run (needs --reason; audited)",
        )
    parser.add_argument("--reason", default="", help="why (kept in the registry's history)")
    handlers = {"promote": _promote, "rollback": _rollback, "unpin": _unpin}
    parser.set_defaults(func=handlers[command])


def _admin():  # -> AdminService; imports kept out of `loopchat --help`
    from serve.admin import AdminService
    from serve.registry import Registry
    from serve.settings import Settings
    from serve.store import resolve_redis_url, sync_client

    settings = Settings()
    registry = Registry.from_settings(settings, sync_client(resolve_redis_url(settings)))
    return AdminService(registry, settings)


def operator() -> str:
    """Who runs this command, for the registry's history."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _checkpoints(args: argparse.Namespace) -> int:
    if args.action == "export":
        from serve.cli.models import export

        return export(args)
    state = _admin().checkpoints()
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    marks = {state[a]: a for a in ("previous", "candidate", "live") if state[a]}
    print(
        f"{'version':<9} {'kind':<7} {'parent':<8} {'created':<17} {'alias':<10} {'gate':<6} "
        "metrics"
    )
    for v in state["versions"]:
        gate = v["gate"]
        gate_text = "-" if gate is None else ("pass" if gate["passed"] else "FAIL")
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v["created_at"]))
        metrics = " ".join(f"{k}={_short(x)}" for k, x in sorted(v["metrics"].items()))
        print(
            f"{v['version']:<9} {v['kind']:<7} {v['parent'] or '-':<8} {created:<17} "
            f"{marks.get(v['version'], ''):<10} {gate_text:<6} {metrics}"
        )
    return 0


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _run(action: str, **kwargs: object) -> int:
    """Run an ``AdminService`` action as this operator; print the aliases after."""
    from serve.registry import RegistryError

    try:
        state = getattr(_admin(), action)(by=operator(), **kwargs)
    except RegistryError as exc:
        raise CLIError(str(exc)) from None
    pin = state["pin"]
    pinned = f"; pinned by {pin['by']}'s rollback" if pin else ""
    print(f"live: {state['live']} (previous: {state['previous']}){pinned}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    return _run("promote", version=args.version, reason=args.reason, force=args.force)


def _rollback(args: argparse.Namespace) -> int:
    return _run("rollback", reason=args.reason)


def _unpin(args: argparse.Namespace) -> int:
    return _run("unpin", reason=args.reason)


def _interval(pair: list[float] | None) -> str:
    return "-" if pair is None else f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"


def _leaderboard(args: argparse.Namespace) -> int:
    board = _admin().leaderboard()
    if args.json:
        print(json.dumps(board, indent=2))
        return 0
    print(
        f"{board['mixed_rankings']} mixed rankings; strength = Bradley-Terry log-odds against "
        f"live ({board['live']}), 95% bootstrap interval"
    )
    print(f"{'version':<9} {'strength':>9} {'interval':<18} {'pairs':>6}  win rate vs live (95%)")
    for row in board["versions"]:
        strength = "-" if row["strength"] is None else f"{row['strength']:+.3f}"
        rate = row["win_rate_vs_live"]
        rate_text = (
            "-"
            if rate is None
            else f"{rate['estimate']:.3f} [{rate['interval'][0]:.3f}, {rate['interval'][1]:.3f}]"
            f" over {rate['rankings']} rankings"
        )
        print(
            f"{row['version']:<9} {strength:>9} {_interval(row['interval']):<18} "
            f"{row['comparisons']:>6}  {rate_text}"
        )
    test = board["test"]
    if test is not None:
        print(
            f"test {test['candidate']} vs {test['live']}: {test['action']} "
            f"(auto-promote {'on' if test['auto_promote'] else 'off'}): {test['reason']}"
        )
    for decision in board["decisions"]:
        print(f"decided: {decision['action']} {decision['candidate']}: {decision['summary']}")
    return 0
