"""Fixtures the learners' tests share: the tiny yes/no SFT policy and reward model, and one
torch thread for them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.learn.rlhf_helpers import shared_reward_model, shared_sft_policy


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Nano models train faster on one thread than on two cores shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SFT policy (built once per session, shared by every learner's tests)."""
    return shared_sft_policy(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def models(sft: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(SFT policy, reward model trained on its "more yes" preference)."""
    return sft, shared_reward_model(tmp_path_factory.getbasetemp())
