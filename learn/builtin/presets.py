"""Model sizes for from-scratch Llama models, and building one with a given tokenizer.

Presets are the only place sizes are chosen: ``nano`` trains in seconds for tests, ``small``
is the built-in model (~1M parameters, the size that learned arithmetic in minutes on two
cores), ``bench`` is the ~30M model the PPO benchmark uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Preset:
    """Shape of a Llama model; head_dim = hidden / heads must be one vLLM's CPU kernels take."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 512
    vocab_size: int = 1024


PRESETS: dict[str, Preset] = {
    "nano": Preset(hidden=64, layers=2, heads=2, intermediate=192, vocab_size=512),
    "small": Preset(hidden=128, layers=4, heads=4, intermediate=384),
    "bench": Preset(hidden=512, layers=8, heads=8, intermediate=1536),
}


def llama_config(preset: str | Preset, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """A Llama config sized by ``preset`` whose special-token ids match ``tokenizer``."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,
        intermediate_size=p.intermediate,
        max_position_embeddings=p.max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )


def new_model(
    preset: str | Preset, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> LlamaForCausalLM:
    """A freshly initialised causal LM (deterministic for a given seed)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(preset, tokenizer))
