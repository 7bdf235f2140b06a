"""Every import points down: serve's core <- learn <- ui <- the CLI (the composition root).

Read from the source (every ``import``, at module level or inside a function), so a new arrow
the wrong way fails here, not in a reviewer's reading.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What learn/ may use of serve/: the shared state and the event contract, never the app.
LEARN_MAY_USE = {
    "serve.events",
    "serve.store",
    "serve.registry",
    "serve.adapters",  # what an adapter version is on disk: part of the registry's format
    "serve.settings",
    "serve.loop_trigger",
    "serve.arena",  # the A/B statistics (pure numpy): `bench ab` simulates the service's rule
    "serve.identity",  # the identity an event carries (pure hashing): `bench attack` forges one
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_serve_core_imports_neither_ui_nor_learn() -> None:
    wrong = {
        (module_name(path), name)
        for path in sources("serve")
        if not within(module_name(path), "serve.cli")
        for name in imports(path)
        if within(name, "ui") or within(name, "learn")
    }
    assert not wrong


def test_ui_reaches_state_only_through_serves_public_interface() -> None:
    wrong = {
        (module_name(path), name)
        for path in sources("ui")
        for name in imports(path)
        if within(name, "learn") or within(name, "serve.cli") or within(name, "redis")
    }
    assert not wrong


def test_learn_uses_only_the_shared_state_of_serve() -> None:
    wrong = {
        (module_name(path), name)
        for path in sources("learn")
        for name in imports(path)
        if within(name, "ui")
        or (within(name, "serve") and not any(within(name, m) for m in LEARN_MAY_USE))
    }
    assert not wrong


@pytest.mark.parametrize("package", ["serve", "ui", "learn", "tests"])
def test_benchmarks_are_imported_only_by_benchmarks_and_the_cli(package: str) -> None:
    allowed = ("learn.bench", "serve.cli", "tests.learn.bench")
    wrong = {
        (module_name(path), name)
        for path in sources(package)
        if not any(within(module_name(path), a) for a in allowed)
        for name in imports(path)
        if within(name, "learn.bench")
    }
    assert not wrong
