"""Reading what the stages train on: text files, JSONL rows, prompts, and the PPO-ptx source.

Every reader raises :class:`learn.errors.LearnError` naming the file (and line) it could not
use, so the CLI answers a bad file with one line, never a traceback.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from learn.errors import LearnError

log = logging.getLogger("loopchat.learn")

Messages = list[dict[str, str]]


def read_texts(files: Iterable[str], text_field: str = "text") -> list[str]:
    """Documents from .txt files (split at blank lines) and .jsonl files (``text_field``)."""
    paths: list[Path] = []
    for name in files:
        path = Path(name).expanduser()
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".json"))
        elif path.is_file():
            paths.append(path)
        else:
            raise LearnError(f"{name}: no such file or folder")
    docs: list[str] = []
    for path in paths:
        if path.suffix == ".txt":
            docs += [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LearnError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise LearnError(f"{path}:{number}: no string field {text_field!r}")
            docs.append(row[text_field])
    if not docs:
        raise LearnError("no documents found in the training files")
    return docs


def read_jsonl(path: str, flag: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing file or a bad line is an error naming ``flag`` and line."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise LearnError(f"{flag} {path}: {exc.strerror or exc}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LearnError(f"{flag} {path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise LearnError(f"{flag} {path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def read_prompts(path: str) -> list[Messages]:
    """Distinct prompts from JSONL rows with ``messages`` (rankings exports, chat logs, SFT
    conversations); a conversation that ends with answers is cut back to its last user turn."""
    prompts, seen = [], set()
    for number, row in enumerate(read_jsonl(path, "--prompts"), 1):
        messages = row.get("messages")
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        )
        while ok and messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not ok or not messages:
            raise LearnError(f"--prompts {path}: row {number} has no 'messages' conversation")
        fingerprint = json.dumps(messages, sort_keys=True)
        if fingerprint not in seen:
            seen.add(fingerprint)
            prompts.append(messages)
    if not prompts:
        raise LearnError(f"--prompts {path}: no prompts")
    return prompts


def is_builtin_model(model_dir: Path) -> bool:
    """Whether ``model_dir`` (or the version registered from it) is the built-in model, which
    ``learn.bootstrap`` marks with its recipe in ``builtin.json``."""
    return (Path(model_dir) / "builtin.json").is_file()


def ptx_texts(source: str, reference_dir: Path, n: int, seed: int) -> list[str] | None:
    """Up to ``n`` pre-training texts for the PPO-ptx term (None: no ptx term).

    The ptx term keeps the policy's language close to what it was pre-trained on, so its text
    must be the served model's kind of text: the built-in corpus suits only the built-in model.
    ``source`` (``LOOPCHAT_PTX``) is ``auto`` (the built-in corpus when the SFT reference is the
    built-in model, else off with a log line saying how to turn it on), ``builtin``, ``off``,
    or a path of the user's own text (.txt, .jsonl with ``text``, or a folder of them).
    """
    if n <= 0 or source == "off":
        return None
    if source == "auto" and not is_builtin_model(reference_dir):
        log.info(
            "PPO-ptx off: the reference model %s is not the built-in one, whose corpus would "
            "pull it toward the toy tasks' style; set LOOPCHAT_PTX to a file of its kind of "
            "text to turn ptx on",
            reference_dir,
        )
        return None
    if source in ("auto", "builtin"):
        from learn.builtin.corpus import pretrain_texts

        return pretrain_texts(n, seed)
    texts = read_texts([source])
    return random.Random(seed).sample(texts, min(n, len(texts)))
