"""LoRA adapter versions: what they are on disk, when a model learns through them, and how one
becomes a plain model.

A user's pretrained model is large next to what one round of rankings can teach it, and a full
copy of its weights per version makes every swap a reload. Above ``LOOPCHAT_LORA_ABOVE``
parameters a round therefore trains LoRA adapters (peft) on the frozen base, and a policy
version is just its adapter directory (``adapter_config.json``, ``adapter_model.safetensors``,
the tokenizer) plus ``info.base`` in its metadata, naming the registered version it adapts. vLLM
serves the base once with runtime LoRA and switches adapters per request, so promoting a new
version loads megabytes instead of the whole model, and a rollback to any earlier version is
exact (its adapter file never changes). The built-in ~1M model stays below the threshold:
full-weight updates remain its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(model_dir: str | Path) -> bool:
    """Whether the directory holds a LoRA adapter rather than full weights."""
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def adapter_rank(model_dir: str | Path) -> int:
    return int(json.loads((Path(model_dir) / ADAPTER_CONFIG).read_text())["r"])


def parameter_count(model_dir: str | Path) -> int:
    """Parameters in the directory's safetensors files, read from their headers only."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def learns_with_lora(base_dir: str | Path, lora_above: int) -> bool:
    """Whether policies over this base are trained (and served) as adapters."""
    return is_adapter(base_dir) or parameter_count(base_dir) > lora_above


def load_merged(adapter_dir: str | Path, base_dir: str | Path, dtype: Any = None) -> Any:
    """The base with the adapter merged in: a plain transformers model (float32 by default),
    for the HF engine, the gate and exports."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype or torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
