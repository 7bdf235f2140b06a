"""RLOO: leave-one-out advantages and sequence rewards by their formulas; a round moves the
policy toward what the reward model prefers within a KL bound of the SFT reference; the next
round continues its optimizer and β."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from learn.learner import RoundData, learner, load_state
from learn.rlhf import logprobs_from_logits
from learn.rloo import (
    RLOOConfig,
    accumulate_gradient,
    answer_logits,
    rloo_advantages,
    rloo_loss,
    rollout_logprobs,
    sequence_rewards,
    train_round,
)
from learn.tokens import make_rollout
from tests.learn.rlhf_helpers import (
    PROMPTS,
    assert_learned_the_preference,
    prompt_messages,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KL_BOUND = 3.0
CONFIG = RLOOConfig(
    k=4, prompts_per_step=8, steps=16, response_length=12, learning_rate=3e-4,
    kl_coef=0.05, adaptive_kl=True, kl_target=KL_BOUND, device="cpu",
)  # fmt: skip


# --- the formulas on toy tensors -----------------------------------------------------------------

REWARDS = torch.tensor([[1.0, 2.0, 4.0, 7.0], [0.0, 0.5, 3.0, -1.0]])


def explicit_leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    k = rewards.shape[1]
    out = torch.empty_like(rewards)
    for p in range(rewards.shape[0]):
        for i in range(k):
            others = [rewards[p, j] for j in range(k) if j != i]
            out[p, i] = rewards[p, i] - sum(others) / (k - 1)
    return out


def test_advantages_are_each_reward_minus_the_mean_of_the_others_and_sum_to_zero() -> None:
    advantages = rloo_advantages(REWARDS)
    assert advantages.shape == REWARDS.shape
    assert torch.allclose(advantages, explicit_leave_one_out(REWARDS))
    assert torch.allclose(advantages.sum(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(rloo_advantages(REWARDS + 5.0), advantages)  # a shift is baselined


def test_normalised_advantages_divide_each_group_by_its_reward_std() -> None:
    advantages = rloo_advantages(REWARDS, normalize=True)
    expected = explicit_leave_one_out(REWARDS) / REWARDS.std(1, keepdim=True)
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(rloo_advantages(REWARDS * 10.0, normalize=True), advantages, atol=1e-6)
    tied = rloo_advantages(torch.full((1, 4), 2.5), normalize=True)
    assert torch.equal(tied, torch.zeros(1, 4))  # equal rewards: no push, no division by zero


def test_advantages_need_two_samples_per_group() -> None:
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="k must be >= 2"):
        RLOOConfig(k=1)


def test_sequence_reward_is_score_minus_eos_penalty_if_cut_minus_beta_kl() -> None:
    scores = torch.tensor([1.0, 1.0, 0.5, -0.2])
    kl = torch.tensor([0.0, 2.0, 1.0, -0.5])
    ended = torch.tensor([True, False, True, False])
    rewards = sequence_rewards(scores, kl, ended, beta=0.1, missing_eos_penalty=1.0)
    assert torch.allclose(rewards, torch.tensor([1.0, 1.0 - 1.0 - 0.2, 0.5 - 0.1, -1.2 + 0.05]))
    no_penalty = sequence_rewards(scores, kl, ended, beta=0.0, missing_eos_penalty=0.0)
    assert torch.equal(no_penalty, scores)


def test_loss_weights_each_answers_total_logprob_by_its_advantage_per_batch_token() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # padding's log-prob never counts
    advantages = torch.tensor([2.0, -1.0])
    loss = rloo_loss(logprobs, advantages, mask)
    assert loss.item() == pytest.approx(-(2.0 * -3.0 + -1.0 * -1.5) / 5)
    loss.backward()
    assert torch.allclose(logprobs.grad, -advantages[:, None] * mask / 5)


def test_micro_batches_give_the_whole_batchs_logprobs_loss_and_gradient(
    models: tuple[Path, Path],
) -> None:
    """The memory bound changes nothing computed: 5 answers of mixed lengths in passes of 2
    (the last one short) against one pass over all 5."""
    policy = AutoModelForCausalLM.from_pretrained(models[0])
    prompts = [[1, 5, 6], [1, 7], [1, 5, 6], [1, 8, 9, 10], [1, 7]]
    answers = [[11, 12, 2], [13], [11, 2], [14, 15, 16, 17], [18, 19]]
    rollout = make_rollout(prompts, answers, pad_id=0, eos_id=2)
    advantages = torch.tensor([0.7, -1.2, 0.3, 0.9, -0.4])

    whole = logprobs_from_logits(answer_logits(policy, rollout, 0.8), rollout.responses)
    loss = rloo_loss(whole, advantages, rollout.response_mask)
    loss.backward()
    expected = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)

    logprobs, _ = rollout_logprobs(policy, rollout, 0.8, size=2)
    assert torch.allclose(logprobs, whole.detach(), atol=1e-5)
    assert accumulate_gradient(policy, rollout, advantages, 0.8, size=2) == pytest.approx(
        loss.item(), abs=1e-5
    )
    for param, grad in zip(policy.parameters(), expected, strict=True):
        assert torch.allclose(param.grad, grad, atol=1e-5)


# --- a round on the tiny yes/no models -----------------------------------------------------------


def round_data(
    policy: Path, sft: Path, rm: Path, out: Path, state: dict | None = None, seed: int = 0
) -> RoundData:
    prompts = [prompt_messages(i) for i in range(len(PROMPTS))]
    return RoundData(policy, sft, rm, [], prompts, None, state, out, seed)


@pytest.fixture(scope="module")
def trained(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    sft, rm = models
    out = tmp_path_factory.mktemp("rloo")
    return out, train_round(round_data(sft, sft, rm, out), CONFIG)


def test_rloo_raises_the_reward_of_fresh_samples_with_kl_within_bound(
    models: tuple[Path, Path], trained: tuple[Path, dict]
) -> None:
    sft, rm = models
    out, metrics = trained
    assert_learned_the_preference(sft, rm, out, KL_BOUND)
    assert metrics["reward_mean"] > metrics["reward_start"]
    assert 0.0 <= metrics["kl"] <= KL_BOUND


def test_round_metrics_are_json_with_a_history_of_every_step(trained: tuple[Path, dict]) -> None:
    out, metrics = trained
    assert metrics["learner"] == "rloo" and metrics["steps"] == CONFIG.steps
    assert metrics["episodes"] == CONFIG.steps * CONFIG.prompts_per_step * CONFIG.k
    assert 0.0 <= metrics["ended"] <= 1.0 and metrics["seconds"] > 0
    assert not metrics["resumed"]
    for step in metrics["history"]:
        for name in ("reward", "sequence_reward", "kl", "kl_coef", "ended", "entropy", "loss"):
            assert isinstance(step[name], float), name
    json.dumps(metrics)  # registered as checkpoint metrics as it is
    assert (out / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_the_learner_registry_finds_rloo() -> None:
    module = learner("rloo")
    assert module.CONFIG is RLOOConfig and module.train_round is train_round


def test_next_round_restores_beta_and_optimizer_state_from_the_saved_state(
    models: tuple[Path, Path], trained: tuple[Path, dict], tmp_path: Path
) -> None:
    sft, rm = models
    first_out, first = trained
    state = load_state(first_out)
    assert state["learner"] == "rloo" and state["kl_coef"] == first["kl_coef"]
    assert state["kl_coef"] != CONFIG.kl_coef  # the adaptive β moved during round one
    config = replace(CONFIG, steps=2)
    second = train_round(round_data(first_out, sft, rm, tmp_path, state, seed=1), config)
    assert second["resumed"]
    assert second["history"][0]["kl_coef"] == state["kl_coef"]  # β continues, not restarts
    after = load_state(tmp_path)
    # AdamW's step count continues from round one's (a fresh optimizer would be at 2)
    steps = {float(s["step"]) for s in after["optimizer"]["state"].values()}
    assert steps == {float(CONFIG.steps + 2)}
    assert after["steps"] == CONFIG.steps + 2 and after["rounds"] == 2


def test_a_state_written_by_another_learner_is_not_restored(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    sft, rm = models
    config = replace(CONFIG, steps=1, prompts_per_step=2)
    metrics = train_round(
        round_data(sft, sft, rm, tmp_path, {"learner": "ppo", "kl_coef": 9.0}), config
    )
    assert not metrics["resumed"]
    assert metrics["history"][0]["kl_coef"] == config.kl_coef
    assert load_state(tmp_path)["rounds"] == 1
