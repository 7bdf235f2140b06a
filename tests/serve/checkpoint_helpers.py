"""Checkpoints for registry and hot-swap tests: same tokenizer, different (or broken) weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from learn.builtin.presets import new_model
from learn.modeling import save_model
from serve.registry import Registry

RESIDUAL_GAIN = 5.0


def variant(base_dir: Path, seed: int, out_dir: Path) -> Path:
    """``base_dir``'s ``nano`` model re-initialised with ``seed``: other greedy answers.

    A freshly initialised model with tied embeddings only echoes the prompt's last token
    (its embedding dominates the residual stream), whatever the seed. Scaling up the layers'
    output projections lets the seed-dependent layers decide, so each seed answers differently.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = new_model("nano", tokenizer, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(RESIDUAL_GAIN)
            layer.mlp.down_proj.weight.mul_(RESIDUAL_GAIN)
    return save_model(model, tokenizer, out_dir)


def poisoned(base_dir: Path, seed: int, out_dir: Path) -> Path:
    """A ``variant`` with one NaN in its weights, as a diverged training run would leave."""
    out = variant(base_dir, seed, out_dir)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = torch.nan
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def same_files(a: Path, b: Path, ignore: tuple[str, ...] = ("loopchat.json",)) -> bool:
    """Whether two directories hold the same files with the same bytes (``ignore`` aside)."""

    def names(d: Path) -> list[str]:
        found = (p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
        return sorted(n for n in found if n not in ignore)

    return names(a) == names(b) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names(a)
    )


def passed(registry: Registry, version: str) -> str:
    """Record a passing gate for ``version`` (what a round's gate writes); returns it."""
    registry.record_gate(version, {"passed": True, "reasons": []})
    return version
