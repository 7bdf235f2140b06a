"""Token-level helpers: a loss that couples answers is backpropagated in micro-batches with the
whole batch's gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from learn.tokens import answer_logprobs, backward_answer_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEQUENCES = [([1, 5, 6, 11, 2], 3), ([1, 7, 13], 2), ([1, 5, 6, 11, 12, 2], 3),
             ([1, 8, 9, 10, 14, 15], 4), ([1, 7, 18, 19, 2], 2)]  # fmt: skip


def pair_objective(logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """A DPO-like loss over pairs (0>1, 2>3, 4>1): nonlinear and coupling the answers."""
    chosen, rejected = logprobs[[0, 2, 4]], logprobs[[1, 3, 1]]
    loss = -torch.nn.functional.logsigmoid(0.3 * (chosen - rejected)).mean()
    return loss, {"loss": loss.item()}


@pytest.mark.parametrize("size", [2, 5])
def test_micro_batched_backward_gives_the_whole_batchs_gradient(sft: Path, size: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(sft)
    loss, _ = pair_objective(answer_logprobs(model, SEQUENCES, pad_id=0))
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    stats = backward_answer_logprobs(model, SEQUENCES, 0, size, pair_objective)

    assert stats["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for param, grad in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(param.grad, grad, atol=1e-6)
