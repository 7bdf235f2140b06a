"""``loopchat train STAGE ...``: offline training, one subcommand per stage.

Each stage lives in its own module, listed in ``STAGES``, which provides
``add_arguments(parser)`` and ``run(args) -> int`` (the convention ``loopchat bench`` uses too).
A stage's module (and torch) is imported only when that stage runs.

Stage configs are TRL-style dataclasses; ``add_config_arguments`` turns one into flags
(``max_steps`` -> ``--max-steps``, help from the field's metadata) plus ``--config FILE``
(JSON or YAML), whose values the flags override.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import types
import typing
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from serve.cli import CLIError

STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("learn.pretrain", "stage 1: a tokenizer and a causal LM on plain text"),
    "sft": ("learn.sft", "stage 2: supervised fine-tuning on conversations"),
    "reward": ("learn.reward", "stage 3a: reward model from K-wise rankings (JSONL)"),
    "ppo": ("learn.ppo", "stage 3b: PPO with per-token KL to the SFT model and PPO-ptx"),
}


def register(parser: argparse.ArgumentParser, command: str) -> None:
    """``loopchat train``: dispatch to the stage named first."""
    # Before torch loads: OpenMP threads that sleep instead of spinning while they wait for
    # each other keep training fast when the cores are shared (see learn.builtin).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    register_table(parser, STAGES, "STAGE")


def register_table(
    parser: argparse.ArgumentParser, table: dict[str, tuple[str, str]], metavar: str
) -> None:
    """A command whose first argument picks an entry of ``table`` (name -> (module, help)); the
    rest of the line is parsed by that module's own ``add_arguments`` parser."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = f"{metavar.lower()}s (each has its own --help):\n" + "\n".join(
        f"  {name:<10} {help_}" for name, (_, help_) in table.items()
    )
    parser.add_argument("name", choices=list(table), metavar=metavar)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=f"flags of the {metavar.lower()}")
    parser.set_defaults(func=partial(_run_entry, parser.prog, table))


def _run_entry(prog: str, table: dict[str, tuple[str, str]], args: argparse.Namespace) -> int:
    module_name, help_ = table[args.name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"{prog} {args.name}", description=help_)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.args)) or 0)


# --- dataclass configs as flags -------------------------------------------------------------


def _field_type(hint: Any) -> tuple[type, bool]:
    """(element type, is a list) of a field annotation such as ``int``, ``str | None`` or
    ``list[str]``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per field of ``config_cls`` and ``--config FILE``."""
    parser.add_argument(
        "--config", metavar="FILE", help="JSON or YAML file of these settings (flags override)."
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind, is_list = _field_type(hints[f.name])
        default = f.default_factory() if callable(f.default_factory) else f.default
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_)  # fmt: skip
        else:
            parser.add_argument(flag, dest=f.name, type=kind, nargs="+" if is_list else None,
                                default=argparse.SUPPRESS, help=help_)  # fmt: skip


def _read_config_file(path: str, config_cls: type) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(Path(path).expanduser().read_text())  # YAML reads JSON too
    except OSError as exc:
        raise CLIError(f"--config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CLIError(f"--config {path}: not JSON or YAML ({exc})") from None
    if not isinstance(values, dict):
        raise CLIError(f"--config {path}: expected a mapping of settings")
    hints = typing.get_type_hints(config_cls)
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            raise CLIError(f"--config {path}: unknown setting {key!r} "
                           f"(known: {', '.join(sorted(hints))})")  # fmt: skip
        out[name] = _checked(f"--config {path}: {key}", value, hints[name])
    return out


def _checked(where: str, value: Any, hint: Any) -> Any:
    kind, is_list = _field_type(hint)
    if value is None and type(None) in typing.get_args(hint):
        return None
    items = value if is_list else [value]
    if is_list and not isinstance(value, list):
        raise CLIError(f"{where}: expected a list")
    if not all(_matches(v, kind) for v in items):
        raise CLIError(f"{where}: expected {kind.__name__}{' list' if is_list else ''}")
    return [kind(v) for v in items] if is_list else kind(value)


def _matches(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # a bool is an int to isinstance, not to a config
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def config_from_args(args: argparse.Namespace, config_cls: type) -> Any:
    """Defaults, then ``--config``, then flags; invalid values become a CLI error."""
    values = _read_config_file(args.config, config_cls) if args.config else {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return config_cls(**values)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def run_stage(train: Callable[[Any], dict], config: Any) -> int:
    """Run a stage's entry point; print its metrics; bad data it finds becomes a CLI error."""
    try:
        metrics = train(config)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps(metrics))
    print(f"model written to {config.output_dir}")
    return 0
