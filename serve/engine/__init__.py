"""Inference engines behind one interface (:class:`serve.engine.base.Engine`).

``--engine vllm`` (default) or ``--engine hf``; the chosen module alone is imported, so a machine
without vLLM can still serve with transformers.
"""

from __future__ import annotations

from pathlib import Path

from serve.engine.base import Engine
from serve.settings import Settings


def make_engine(
    kind: str,
    model_dir: str | Path,
    version: str,
    settings: Settings,
    base_dir: str | Path | None = None,
) -> Engine:
    """An engine of ``kind`` (``vllm`` | ``hf``) over ``model_dir`` (an adapter version's
    ``base_dir`` beside it), not started yet."""
    if kind == "vllm":
        from serve.engine.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, version, settings, base_dir)
    if kind == "hf":
        from serve.engine.hf_engine import HFEngine

        return HFEngine(model_dir, version, settings, base_dir)
    raise ValueError(f"unknown engine {kind!r} (choose vllm or hf)")
