"""``loopchat train STAGE ...``: offline training, one subcommand per stage.

The trainers (``learn.pretrain``, ``learn.sft``, ``learn.reward``, ``learn.ppo``) know nothing
of argparse; their command lines are here, each an ``add_arguments(parser)`` and a
``run(args) -> int`` listed in ``STAGES`` (the convention ``loopchat bench`` uses too). A
stage's trainer (and torch) is imported only when that stage runs.

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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from serve.cli import CLIError

STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("serve.cli.train:Pretrain", "stage 1: a tokenizer and a causal LM on plain text"),
    "sft": ("serve.cli.train:SFT", "stage 2: supervised fine-tuning on conversations"),
    "reward": ("serve.cli.train:Reward", "stage 3a: reward model from K-wise rankings (JSONL)"),
    "ppo": ("serve.cli.train:PPO", "stage 3b: PPO with per-token KL to the SFT model and PPO-ptx"),
}


def register(parser: argparse.ArgumentParser, command: str) -> None:
    """``loopchat train``: dispatch to the stage named first."""
    # Before torch loads: OpenMP threads that sleep instead of spinning while they wait for
    # each other keep training fast when the cores are shared (see learn.bootstrap).
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
    """Import the chosen entry (``module`` or ``module:attribute``) and run it on the rest."""
    target, help_ = table[args.name]
    module_name, _, attribute = target.partition(":")
    entry = importlib.import_module(module_name)
    if attribute:
        entry = getattr(entry, attribute)
    parser = argparse.ArgumentParser(prog=f"{prog} {args.name}", description=help_)
    entry.add_arguments(parser)
    return int(entry.run(parser.parse_args(args.args)) or 0)


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


def run_stage(train: Callable[..., dict], *args: Any, out: str | Path) -> int:
    """Run a trainer; print its metrics and where it wrote; bad data becomes a CLI error."""
    try:
        metrics = train(*args)
    except (ValueError, OSError) as exc:  # LearnError is a ValueError
        raise CLIError(str(exc)) from None
    print(json.dumps(metrics))
    print(f"written to {out}")
    return 0


# --- the stages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigStage:
    """A stage whose flags are exactly the fields of its config dataclass (pretrain, sft)."""

    module: str
    config: str  # the config dataclass's name in ``module``
    train: str  # the entry point's name: config -> metrics

    def _get(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module), name)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, self._get(self.config))

    def run(self, args: argparse.Namespace) -> int:
        config = config_from_args(args, self._get(self.config))
        return run_stage(self._get(self.train), config, out=config.output_dir)


Pretrain = ConfigStage("learn.pretrain", "PretrainConfig", "pretrain")
SFT = ConfigStage("learn.sft", "SFTConfig", "sft")


class Reward:
    """``loopchat train reward``: rankings JSONL in, reward model out."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from learn.reward import RewardConfig

        parser.add_argument(
            "--data", required=True, metavar="FILE",
            help="Rankings JSONL: feedback events (`loopchat feedback export --format rankings`).",
        )  # fmt: skip
        parser.add_argument(
            "--init", required=True, metavar="DIR",
            help="SFT policy to start from, or a previous reward model to refresh (warm start).",
        )  # fmt: skip
        parser.add_argument(
            "--out", required=True, metavar="DIR", help="Reward model written here."
        )
        parser.add_argument(
            "--heldout", metavar="FILE",
            help="Held-out rankings JSONL (default: the most recent --heldout-fraction of --data).",
        )  # fmt: skip
        add_config_arguments(parser, RewardConfig)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from learn.data import read_jsonl
        from learn.reward import RewardConfig, train_reward_model

        config = config_from_args(args, RewardConfig)
        try:
            events = read_jsonl(args.data, "--data")
            heldout = read_jsonl(args.heldout, "--heldout") if args.heldout else None
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        return run_stage(train_reward_model, events, args.init, args.out, config, heldout,
                         out=args.out)  # fmt: skip


class PPO:
    """``loopchat train ppo``: a policy, its reference, a reward model and prompts in."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from learn.ppo import PPOConfig

        parser.add_argument("--policy", required=True, metavar="DIR", help="Policy to improve.")
        parser.add_argument(
            "--ref", metavar="DIR",
            help="Frozen SFT reference of the KL penalty (default: --policy).",
        )  # fmt: skip
        parser.add_argument(
            "--reward", required=True, metavar="DIR", help="Reward model directory."
        )
        parser.add_argument(
            "--prompts", required=True, metavar="FILE",
            help="JSONL rows with 'messages' (e.g. a rankings export): the prompts to answer.",
        )  # fmt: skip
        parser.add_argument(
            "--ptx", nargs="+", metavar="FILE",
            help="Pre-training text for PPO-ptx (.txt or JSONL 'text'); default: no ptx term.",
        )  # fmt: skip
        parser.add_argument("--out", required=True, metavar="DIR", help="Policy written here.")
        add_config_arguments(parser, PPOConfig)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from learn.data import read_prompts, read_texts
        from learn.ppo import PPOConfig, train_ppo

        config = config_from_args(args, PPOConfig)
        try:
            prompts = read_prompts(args.prompts)
            ptx_texts = read_texts(args.ptx) if args.ptx else None
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        policy, reference = args.policy, args.ref or args.policy
        return run_stage(train_ppo, policy, reference, args.reward, prompts, ptx_texts, args.out,
                         config, out=args.out)  # fmt: skip
