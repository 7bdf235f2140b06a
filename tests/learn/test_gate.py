"""The promotion gate on real checkpoints: NaN weights, an unchanged policy, a far-away one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn.gate import GateConfig, evaluate_gate, worse_beyond_noise
from learn.modeling import save_model
from learn.reward import RewardConfig, train_reward_model
from tests.learn.loop_helpers import arithmetic_prompts, sample_completions, shorter_first

CONFIG = GateConfig(prompts=4, max_new_tokens=8)


@pytest.fixture(scope="module")
def rankings(tiny_model: Path) -> list[dict]:
    """Feedback events: the tiny model's sampled answers, ranked shortest first."""
    completions = sample_completions(tiny_model, arithmetic_prompts(16, seed=1), n=3)
    return [
        {
            "id": c.id,
            "messages": c.messages,
            "candidates": c.candidates,
            "ranking": shorter_first(c.candidates),
            "all_bad": False,
        }
        for c in completions
    ]


@pytest.fixture(scope="module")
def reward_dir(tiny_model: Path, rankings: list[dict], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm")
    config = RewardConfig(epochs=1, rankings_per_batch=4, warmup_steps=1)
    train_reward_model(rankings[:12], tiny_model, out, config, heldout_events=rankings[12:])
    return out


def changed_copy(tiny_model: Path, out: Path, change) -> Path:
    """A copy of the tiny model with ``change`` applied to its weights in place."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        change(model)
    return save_model(model, AutoTokenizer.from_pretrained(tiny_model), out)


def run_gate(candidate: Path, live: Path, reward_dir: Path, rankings: list[dict]) -> dict:
    prompts = [event["messages"] for event in rankings[12:]]
    return evaluate_gate(candidate, live, reward_dir, rankings[12:], prompts, CONFIG)


def test_a_checkpoint_with_a_nan_weight_fails(tiny_model, reward_dir, rankings, tmp_path) -> None:
    def poison(model):
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")

    gate = run_gate(changed_copy(tiny_model, tmp_path, poison), tiny_model, reward_dir, rankings)
    assert gate["passed"] is False
    assert gate["finite"] is False
    assert "not finite" in gate["reason"]


def test_an_identical_checkpoint_passes(tiny_model, reward_dir, rankings, tmp_path) -> None:
    candidate = tmp_path / "same"
    shutil.copytree(tiny_model, candidate)
    gate = run_gate(candidate, tiny_model, reward_dir, rankings)
    assert gate["passed"] is True, gate["reasons"]
    assert gate["reasons"] == []
    assert gate["kl"] == pytest.approx(0.0, abs=1e-5)
    assert gate["reward_candidate"] == pytest.approx(gate["reward_live"])
    assert gate["agreement_candidate"] == gate["agreement_live"]
    assert gate["heldout_pairs"] > 0


def test_a_far_away_checkpoint_fails_the_kl_budget(
    tiny_model, reward_dir, rankings, tmp_path
) -> None:
    def scramble(model):
        torch.manual_seed(1)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)

    far = changed_copy(tiny_model, tmp_path, scramble)
    gate = run_gate(far, tiny_model, reward_dir, rankings)
    assert gate["passed"] is False
    assert gate["kl"] > CONFIG.kl_budget
    assert any(reason.startswith("KL to live") for reason in gate["reasons"])


def test_only_a_difference_beyond_the_noise_of_paired_samples_counts_as_worse() -> None:
    live = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    # one pair won, two lost: 12.5 points lower, within one standard error of the differences
    mixed = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert not worse_beyond_noise(mixed, live, tolerance=0.0, significance=1.0)
    assert worse_beyond_noise(mixed, live, tolerance=0.0, significance=0.0)
    # every preferred answer lost: worse whatever the spread
    assert worse_beyond_noise(torch.zeros(8), live, tolerance=0.0, significance=1.0)
    # a single measurement has no spread: the tolerance alone decides
    assert worse_beyond_noise(torch.tensor([0.5]), torch.tensor([1.0]), 0.1, 1.0)
    assert not worse_beyond_noise(torch.tensor([0.95]), torch.tensor([1.0]), 0.1, 1.0)
