"""Loading and saving models the same way in every stage.

A saved directory must load unchanged in transformers and vLLM (safetensors, the tokenizer with
its chat template, generation settings that stop at the tokenizer's end-of-turn), because the
registry serves exactly what a stage wrote. Training runs in float32 (bf16 only under autocast),
so every load asks for float32 whatever the checkpoint's own dtype.

Large models learn as LoRA adapters (``serve.adapters``): :func:`load_policy` gives a learner the
trainable policy either way (full weights, or peft's LoRA over the frozen SFT reference), and
:func:`save_policy` writes what the registry stores (a model directory, or an adapter directory
with the tokenizer), so the learners need no LoRA code of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from serve.adapters import ADAPTER_CONFIG, is_adapter, load_merged

log = logging.getLogger(__name__)


@dataclass
class LoraOptions:
    """How a policy over a large base is trained as a LoRA adapter (peft)."""

    rank: int = field(default=16, metadata={"help": "LoRA rank r (LOOPCHAT_LORA_RANK)."})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha (LOOPCHAT_LORA_ALPHA)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    target_modules: str = field(
        default="all-linear", metadata={"help": "peft target modules: every linear layer."}
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``enabled`` (a no-op context otherwise)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


Forward = Callable[[slice], tuple[torch.Tensor, ...]]
Objective = Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, dict[str, Any]]]


def backward_in_micro_batches(
    rows: int, size: int, forward: Forward, objective: Objective
) -> dict[str, Any]:
    """Backpropagate ``objective(forward(all rows))`` with only ``size`` rows' graph alive at a
    time; returns the objective's statistics.

    A loss that couples rows (DPO's pairs, PPO's token means over a minibatch) cannot be split
    into micro-batch losses, but its gradient can: the forward's outputs are computed once
    without a graph, the loss's gradient with respect to them is taken on those leaves, and
    each micro-batch's forward is then backpropagated with its slice of it — the chain rule, so
    the full batch's gradient for one more forward (exact when the forward is deterministic:
    no dropout). At most ``size`` rows take the direct path. ``forward(rows)`` returns tensors
    whose first dimension is the rows; parameters the objective uses itself (a reward model's
    likelihood weight) get their gradients too.
    """
    if rows <= size:
        loss, stats = objective(forward(slice(0, rows)))
        loss.backward()
        return stats
    chunks = [slice(first, min(first + size, rows)) for first in range(0, rows, size)]
    with torch.no_grad():
        parts = [forward(chunk) for chunk in chunks]
    leaves = tuple(torch.cat(outputs).requires_grad_(True) for outputs in zip(*parts, strict=True))
    with torch.enable_grad():
        loss, stats = objective(leaves)
        loss.backward()  # the leaves' gradients, and those of parameters the objective uses
    used = [i for i, leaf in enumerate(leaves) if leaf.grad is not None]
    for chunk in chunks:
        outputs = forward(chunk)
        torch.autograd.backward(
            [outputs[i] for i in used], [leaves[i].grad[chunk].to(outputs[i].dtype) for i in used]
        )
    return stats


def adapter_base(adapter_dir: str | Path) -> str:
    """Where the base of an adapter directory this process trained lies (peft records it)."""
    import json

    return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def load_causal_lm(model_dir: str | Path, frozen: bool = False) -> PreTrainedModel:
    """A causal LM in float32 and eval mode (an adapter directory: merged into its base);
    ``frozen`` also turns its gradients off (a reference model, or one that is only scored)."""
    if is_adapter(model_dir):
        model = load_merged(model_dir, adapter_base(model_dir))
    else:
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


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The transformer under the LM head, whose hidden states learners read (under peft's
    wrapper for a LoRA policy, where ``model.base_model`` is the LoRA layer, not the body)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def load_policy(
    policy_dir: str | Path, reference_dir: str | Path, lora: LoraOptions | None
) -> PreTrainedModel:
    """The policy a learner trains: ``policy_dir``'s full weights, or with ``lora`` an adapter
    over the frozen SFT reference — the previous round's adapter when ``policy_dir`` is one
    (continuity), else a new one (its B matrices start at zero: the policy starts as the
    reference itself)."""
    if lora is None:
        return load_causal_lm(policy_dir)
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_causal_lm(reference_dir)
    if is_adapter(policy_dir):
        return PeftModel.from_pretrained(base, str(policy_dir), is_trainable=True)
    if Path(policy_dir).resolve() != Path(reference_dir).resolve():
        log.info("starting a new LoRA adapter on %s (%s holds full weights)", reference_dir,
                 policy_dir)  # fmt: skip
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(base, config)


def save_policy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path
) -> Path:
    """What the registry stores for the policy: an adapter directory (with the tokenizer) for a
    LoRA policy, else a full model directory."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return save_model(model, tokenizer, out_dir)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
