"""The ``loopchat`` command: a table of subcommands, each defined in the module that owns it.

A subcommand's module is imported only when that subcommand runs, so ``loopchat --help`` and
light commands stay fast (no torch or vLLM import), and ``serve`` never imports training code
unless the user asked for a training command.

A module named here provides ``register(parser, command)``: it adds its arguments and sets
``func`` (``args -> exit code``) with ``parser.set_defaults``. Handlers raise ``CLIError`` for
bad input, learn/ code raises ``learn.errors.LearnError``; either becomes one line on stderr and
exit status 2, never a traceback.

This package is the top of the import graph: it composes serve/, ui/ and learn/ (the app with
its pages and the built-in model in ``up``, the trainers in ``train``, the worker in
``worker``), and nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from learn.errors import LearnError

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("serve.cli.up", "start the chat API and pages (and a learning worker)"),
    "worker": ("serve.cli.worker", "run a learning worker (Celery) on the configured Redis"),
    "learn": ("serve.cli.worker", "learning-loop commands: `learn round` runs one now"),
    "train": ("serve.cli.train", "offline training: pretrain | sft | reward | ppo"),
    "checkpoints": ("serve.cli.admin", "list checkpoint versions and aliases"),
    "promote": ("serve.cli.admin", "make VERSION live"),
    "rollback": ("serve.cli.admin", "make the previous version live again (pins it)"),
    "unpin": ("serve.cli.admin", "lift a rollback's pin: auto-promote may resume"),
    "models": ("serve.cli.models", "bring your own model: `models import FILE.gguf|HF_DIR`"),
    "leaderboard": ("serve.cli.admin", "versions by strength in blind A/B, the candidate's test"),
    "feedback": ("serve.cli.feedback", "rankings: `feedback export`, `feedback stats`"),
    "simulate": ("serve.cli.simulate", "simulated users chatting and ranking via the HTTP API"),
    "bench": ("serve.cli.bench", "benchmarks: serve | ingest | loop | swap | ppo | model"),
    "config": ("serve.cli", "print every setting with its environment variable"),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def register(parser: argparse.ArgumentParser, command: str) -> None:
    """``loopchat config``: the settings table (also the README's configuration section)."""
    parser.set_defaults(func=_print_config)


def _print_config(args: argparse.Namespace) -> int:
    from serve.settings import Settings

    print("| variable | default | meaning |\n| --- | --- | --- |")
    for name, field in Settings.model_fields.items():
        default = (
            "(data dir)" if name == "data_dir" else field.get_default(call_default_factory=True)
        )
        print(f"| `LOOPCHAT_{name.upper()}` | `{default}` | {field.description} |")
    return 0


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopchat",
        description="A chat service that learns from its users' rankings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.error(f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    module_name, help_ = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"loopchat {command}", description=help_)
    importlib.import_module(module_name).register(parser, command)
    args = parser.parse_args(rest)
    try:
        return int(args.func(args) or 0)
    except (CLIError, LearnError) as exc:
        print(f"loopchat {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
