"""The promotion gate on real checkpoints: NaN weights, an unchanged policy, a far-away one."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn.gate import (
    GateConfig,
    agreement_margins,
    evaluate_gate,
    mean_with_error,
    paired_difference,
    worse_beyond_noise,
)
from learn.modeling import save_model
from learn.reward import train_reward_model
from tests.learn.rlhf_helpers import REWARD_CONFIG, preference_events

CONFIG = GateConfig(prompts=4, samples_per_prompt=2, max_new_tokens=8)


@pytest.fixture(scope="module")
def rankings() -> list[dict]:
    """Held-out rankings of the users who prefer more "yes" (tests/learn/rlhf_helpers.py)."""
    return preference_events(12, seed=99)


@pytest.fixture(scope="module")
def reward_dir(models: tuple[Path, Path]) -> Path:
    """The reward model that learned that preference."""
    return models[1]


@pytest.fixture(scope="module")
def noise_reward_dir(sft: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model trained on the same kind of answers ranked at random: it learned nothing."""
    rng = random.Random(0)
    shuffled = [
        {**event, "ranking": [[i] for i in rng.sample(range(4), 4)]}
        for event in preference_events(160)
    ]
    out = tmp_path_factory.mktemp("rm-noise")
    train_reward_model(shuffled, sft, out, REWARD_CONFIG)
    return out


def changed_copy(sft: Path, out: Path, change) -> Path:
    """A copy of the tiny model with ``change`` applied to its weights in place."""
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    with torch.no_grad():
        change(model)
    return save_model(model, AutoTokenizer.from_pretrained(sft), out)


def run_gate(candidate: Path, live: Path, reward_dir: Path, rankings: list[dict]) -> dict:
    """The gate with ``live`` as the SFT reference too (the first round's situation)."""
    prompts = [event["messages"] for event in rankings]
    return evaluate_gate(candidate, live, live, reward_dir, rankings, prompts, CONFIG)


def test_a_checkpoint_with_a_nan_weight_fails(sft, reward_dir, rankings, tmp_path) -> None:
    def poison(model):
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")

    gate = run_gate(changed_copy(sft, tmp_path, poison), sft, reward_dir, rankings)
    assert gate["passed"] is False
    assert gate["finite"] is False
    assert gate["reasons"] == ["finite: weights are not finite (NaN or inf)"]


def test_an_identical_checkpoint_passes(sft, reward_dir, rankings, tmp_path) -> None:
    candidate = tmp_path / "same"
    shutil.copytree(sft, candidate)
    gate = run_gate(candidate, sft, reward_dir, rankings)
    assert gate["passed"] is True, gate["reasons"]
    assert gate["reasons"] == []
    assert gate["kl_to_sft"] == pytest.approx(0.0, abs=1e-5)
    assert gate["kl_to_live"] == pytest.approx(0.0, abs=1e-5)
    assert gate["reward_candidate"] == pytest.approx(gate["reward_live"])
    assert gate["reward_difference"]["n"] == 4
    assert gate["agreement_margin"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert 0 < gate["heldout_rankings"] <= 12 <= gate["heldout_pairs"]  # tied ones: no pair
    assert gate["rm_heldout_accuracy"]["mean"] > 0.5


def test_nothing_trained_on_a_reward_model_of_noise_goes_live(
    sft, noise_reward_dir, rankings, tmp_path
) -> None:
    candidate = tmp_path / "same"
    shutil.copytree(sft, candidate)
    gate = run_gate(candidate, sft, noise_reward_dir, rankings)
    assert gate["passed"] is False
    assert [r for r in gate["reasons"] if r.startswith("reward model:")], gate["reasons"]
    assert gate["rm_heldout_accuracy"]["low"] <= 0.5


def test_a_far_away_checkpoint_fails_the_kl_budget(sft, reward_dir, rankings, tmp_path) -> None:
    def scramble(model):
        torch.manual_seed(1)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)

    far = changed_copy(sft, tmp_path, scramble)
    gate = run_gate(far, sft, reward_dir, rankings)
    assert gate["passed"] is False
    assert gate["kl_to_sft"] > CONFIG.kl_budget
    kl = [reason for reason in gate["reasons"] if reason.startswith("KL:")]
    assert kl == [f"KL: {gate['kl_to_sft']:.3f} nats to SFT > budget {CONFIG.kl_budget}"]


def test_only_a_difference_beyond_the_noise_of_paired_samples_counts_as_worse() -> None:
    live = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    # one pair won, two lost: 12.5 points lower, within two standard errors of the differences
    mixed = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    estimate = paired_difference(mixed, live)
    assert estimate["mean"] == pytest.approx(-0.125)
    assert estimate["se"] == pytest.approx((mixed - live).std().item() / 8**0.5)
    assert estimate["low"] == pytest.approx(-0.125 - 1.96 * estimate["se"])
    assert not worse_beyond_noise(estimate, significance=2.0)
    assert worse_beyond_noise(estimate, significance=0.0)
    # every preferred answer lost: worse whatever the spread
    assert worse_beyond_noise(paired_difference(torch.zeros(8), live), significance=2.0)


def test_agreement_averages_the_pairs_of_one_ranking_before_the_error() -> None:
    candidate = torch.tensor([0.0, -1.0, -2.0, 5.0, 5.0])  # log-probs of 5 answers
    live = torch.zeros(5)
    # ranking A: answers 0 > 1 > 2 (3 pairs); ranking B: 3 > 4 (1 pair); C: tied, no pair
    margins = agreement_margins(candidate, live, [[(0, 1), (0, 2), (1, 2)], [(3, 4)], []])
    assert margins.tolist() == pytest.approx([(1 + 2 + 1) / 3, 0.0])
    estimate = mean_with_error(margins)
    assert estimate["n"] == 2  # clustered: two rankings, not four pairs
    assert estimate["mean"] == pytest.approx(2 / 3)
