"""What loopchat adds to vLLM's worker (``worker_extension_cls``): a weight reload that also
refreshes the tied output head.

vLLM's in-place ``reload_weights`` re-processes only the layers whose weights it loaded. A model
with tied embeddings (the built-in one) has no ``lm_head.weight`` in its checkpoint, so the head
shares the new embedding tensor but keeps the kernel that vLLM's CPU backend packed from the old
one at start-up: after a swap the new body spoke through the old unembedding (seen as 4 of 40
greedy answers differing from the same checkpoint served fresh, and PPO's gains lost). Re-running
the head's weight processing after the reload packs it again from the shared tensor.

This module is imported inside vLLM's engine-core process, by name; it must stay importable
there (vLLM and torch only).
"""

from __future__ import annotations

from typing import Any


class WeightReloadExtension:
    """Mixed into vLLM's worker class; its methods are callable through ``collective_rpc``."""

    def reload_weights_and_head(self: Any, weights_path: str) -> None:
        """``reload_weights`` from ``weights_path``, then the tied head re-processed."""
        self.reload_weights(weights_path=weights_path)
        refresh_tied_head(self.get_model())


def refresh_tied_head(model: Any) -> None:
    """Re-pack a tied output head from the embedding it shares (an untied head was loaded, and
    so re-processed, by ``reload_weights`` itself)."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)  # vLLM's decoder layout
    if head is not None and embed is not None and getattr(head, "weight", None) is embed.weight:
        head.quant_method.process_weights_after_loading(head)
