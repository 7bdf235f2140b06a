"""``loopchat models import PATH`` and ``loopchat checkpoints export VERSION --out DIR``: a
user's own model into the registry, and any version out of it as a plain Hugging Face directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from serve.cli import CLIError


def register(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of ``models``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="import")
    imp = sub.add_parser(
        "import", help="register a GGUF file or Hugging Face model directory as a new version"
    )
    imp.add_argument("path", help="a .gguf file or a Hugging Face model directory")
    imp.add_argument("--name", help="a label for the model card (default: the file's name)")
    imp.add_argument("--promote", action="store_true", help="make it live at once")
    imp.set_defaults(func=_import)


def _registry():  # -> Registry; imports kept out of `loopchat --help`
    from serve.registry import Registry
    from serve.settings import Settings
    from serve.store import resolve_redis_url, sync_client

    settings = Settings()
    return Registry.from_settings(settings, sync_client(resolve_redis_url(settings)))


def _import(args: argparse.Namespace) -> int:
    from serve.cli.admin import operator
    from serve.models import ModelImportError, import_model
    from serve.registry import RegistryError

    registry = _registry()
    try:
        version = import_model(registry, Path(args.path), args.name)
        if args.promote:
            registry.promote(version, by=operator(), reason=f"imported {args.path}")
    except (ModelImportError, RegistryError) as exc:
        raise CLIError(str(exc)) from None
    meta = registry.get(version) or {}
    card = meta.get("info", {}).get("import", {})
    print(
        f"imported {args.path} as {version} ({card.get('architecture')}, "
        f"{card.get('parameters', 0) / 1e6:.0f}M parameters)"
    )
    print("live now" if args.promote else f"make it live: loopchat promote {version}")
    return 0


def export(args: argparse.Namespace) -> int:
    """``loopchat checkpoints export VERSION --out DIR``."""
    from serve.models import ModelImportError, export_version
    from serve.registry import RegistryError

    if not args.version or not args.out:
        raise CLIError("checkpoints export needs VERSION and --out DIR")
    try:
        out = export_version(_registry(), args.version, Path(args.out))
    except (ModelImportError, RegistryError) as exc:
        raise CLIError(str(exc)) from None
    print(f"{args.version} written to {out} (loads in transformers and vLLM as it is)")
    return 0
