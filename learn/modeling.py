"""Loading and saving models the same way in every stage.

A saved directory must load unchanged in transformers and vLLM (safetensors, the tokenizer with
its chat template, generation settings that stop at the tokenizer's end-of-turn), because the
registry serves exactly what a stage wrote. Training runs in float32 (bf16 only under autocast),
so every load asks for float32 whatever the checkpoint's own dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``enabled`` (a no-op context otherwise)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def load_causal_lm(model_dir: str | Path, frozen: bool = False) -> PreTrainedModel:
    """A causal LM in float32 and eval mode; ``frozen`` also turns its gradients off (a
    reference model, or one that is only scored)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if frozen:
        model.requires_grad_(False)
    return model


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path
) -> Path:
    """Save a directory that transformers and vLLM both load as it is (safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
