"""The RLHF formulas of learn/rlhf.py against values worked out by hand on toy tensors."""

from __future__ import annotations

import math

import pytest
import torch

from learn import rlhf
from serve.events import normalise_ranking, ranking_pairs

LOG_HALF = math.log(0.5)


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- rankings -> pairs ---------------------------------------------------------------------------


def test_ranking_without_ties_gives_all_k_choose_2_pairs_best_first() -> None:
    assert list(ranking_pairs(normalise_ranking([2, 0, 1]))) == [(2, 0), (2, 1), (0, 1)]
    assert len(list(ranking_pairs(normalise_ranking([3, 1, 0, 2])))) == math.comb(4, 2)


def test_tie_group_gives_no_pair_between_its_members() -> None:
    pairs = list(ranking_pairs(normalise_ranking([[2], [0, 1], [3]])))
    assert pairs == [(2, 0), (2, 1), (2, 3), (0, 3), (1, 3)]
    assert list(ranking_pairs([[0, 1, 2]])) == []
    assert list(ranking_pairs([])) == []


def test_all_pairs_of_each_ranking_land_in_one_batch_with_offsets() -> None:
    # ranking 0 ranks answers 0..2 (flat, no ties); ranking 1 ranks answers 3..6 with a tie
    pairs, owner = rlhf.batch_pairs([[1, 0, 2], [[3], [0, 1], [2]]], sizes=[3, 4])
    assert pairs.tolist() == [
        [1, 0], [1, 2], [0, 2],  # C(3, 2) = 3
        [6, 3], [6, 4], [6, 5], [3, 5], [4, 5],  # 3 and 4 tied: no pair between them
    ]  # fmt: skip
    assert owner.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_all_tied_ranking_adds_no_pair_but_shifts_offsets() -> None:
    pairs, owner = rlhf.batch_pairs([[[0, 1]], [0, 1]], sizes=[2, 2])
    assert pairs.tolist() == [[2, 3]]
    assert owner.tolist() == [1]


# --- reward-model loss ---------------------------------------------------------------------------


def test_pairwise_loss_is_averaged_per_ranking_then_over_rankings() -> None:
    rewards = t([1.0, 0.0, 2.0])
    # ranking A: one pair (0 beats 1); ranking B: two pairs (2 beats 0, 2 beats 1)
    pairs = torch.tensor([[0, 1], [2, 0], [2, 1]])
    which = torch.tensor([0, 1, 1])
    loss_a = math.log(1 + math.exp(-1))  # −log σ(1)
    loss_b = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    got = rlhf.pairwise_ranking_loss(rewards, pairs, which)
    assert got.item() == pytest.approx((loss_a + loss_b) / 2, abs=1e-12)
    assert got.item() == pytest.approx(0.2666782684, abs=1e-9)


def test_ranking_with_only_ties_does_not_count_in_the_loss() -> None:
    rewards = t([1.0, 0.0, 5.0, 5.0])
    got = rlhf.pairwise_ranking_loss(rewards, torch.tensor([[0, 1]]), torch.tensor([1]))
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_pairwise_loss_gradient_pushes_winner_up_and_loser_down() -> None:
    rewards = t([0.0, 0.0]).requires_grad_()
    rlhf.pairwise_ranking_loss(rewards, torch.tensor([[0, 1]]), torch.tensor([0])).backward()
    # d/dr_w of −log σ(r_w − r_l) at 0 is −σ(0) = −0.5
    assert rewards.grad.tolist() == pytest.approx([-0.5, 0.5])


def test_pairwise_accuracy_counts_strict_wins() -> None:
    rewards = t([1.0, 0.0, 2.0, 2.0])
    assert rlhf.pairwise_accuracy(rewards, torch.tensor([[0, 1], [1, 2], [2, 3]])) == pytest.approx(
        1 / 3
    )


# --- statistics ----------------------------------------------------------------------------------


def test_whiten_uses_masked_unbiased_statistics() -> None:
    x, mask = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    # mean 2, unbiased variance ((−1)² + 0² + 1²) / 2 = 1
    assert rlhf.whiten(x, mask)[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert rlhf.whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx(
        [1.0, 2.0, 3.0, 0.0], abs=1e-6
    )


def test_logprobs_and_entropy_from_logits() -> None:
    logits = t([[[0.0, math.log(3.0)]]])  # probabilities 1/4, 3/4
    assert rlhf.logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(
        math.log(0.75)
    )
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert rlhf.entropy_from_logits(logits).item() == pytest.approx(entropy)
    assert rlhf.entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))


# --- KL penalty ----------------------------------------------------------------------------------


def test_kl_k1_and_k3_estimators() -> None:
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert rlhf.kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # k3: ρ = π_ref/π = 0.5 -> (ρ − 1) − log ρ = −0.5 + log 2
    assert rlhf.kl_per_token(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    # k3 is never negative, k1 is when π < π_ref
    assert rlhf.kl_per_token(ref, logp, "k1").item() < 0 < rlhf.kl_per_token(ref, logp, "k3")
    with pytest.raises(ValueError, match="k2"):
        rlhf.kl_per_token(logp, ref, "k2")  # type: ignore[arg-type]


def test_token_rewards_penalise_kl_per_token_and_add_score_at_the_last_token() -> None:
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    got = rlhf.token_rewards(t([1.0, 2.0]), kl, mask, kl_coef=0.5)
    assert got.flatten().tolist() == pytest.approx([-0.05, -0.1, 0.85, -0.25, 2.0, 0.0])


def test_adaptive_kl_controller_moves_beta_toward_the_target() -> None:
    ctl = rlhf.AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=9.0, n_steps=8)  # error 0.5 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 8 / 10_000))
    ctl.update(current_kl=3.0, n_steps=100)  # error −0.5 clipped to −0.2
    assert ctl.value == pytest.approx(0.1 * 1.00016 * (1 - 0.2 * 100 / 10_000))
    ctl.update(current_kl=6.6, n_steps=1000)  # error 0.1, inside the clip
    assert ctl.value == pytest.approx(0.1 * 1.00016 * 0.998 * 1.01)


def test_fixed_kl_controller_keeps_beta() -> None:
    ctl = rlhf.FixedKLController(0.02)
    ctl.update(current_kl=100.0, n_steps=64)
    assert ctl.value == 0.02


# --- GAE -----------------------------------------------------------------------------------------


def test_gae_against_a_hand_rollout() -> None:
    rewards, values, mask = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]])
    adv, ret = rlhf.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # δ2 = 1 − 0.7 = 0.3; δ1 = 0.7 − 0.6 = 0.1; δ0 = 0.6 − 0.5 = 0.1
    # A2 = 0.3; A1 = 0.1 + 0.5·0.3 = 0.25; A0 = 0.1 + 0.5·0.25 = 0.225
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0])


def test_gae_discounts_and_does_not_bootstrap_past_the_last_token() -> None:
    rewards = t([[0.0, 2.0, 5.0]])  # 5.0 and 7.0 sit on padding and must not count
    values = t([[1.0, 1.0, 7.0]])
    adv, ret = rlhf.gae(rewards, values, t([[1, 1, 0]]), gamma=0.9, lam=0.8)
    # δ1 = 2 + 0.9·0 − 1 = 1; δ0 = 0 + 0.9·1 − 1 = −0.1; A0 = −0.1 + 0.72·1 = 0.62
    assert adv[0].tolist() == pytest.approx([0.62, 1.0, 0.0])
    assert ret[0].tolist() == pytest.approx([1.62, 2.0, 0.0])


# --- PPO losses ----------------------------------------------------------------------------------


def ppo_toy() -> dict[str, torch.Tensor]:
    ratios = [1.5, 0.5, 1.1]
    return {
        "logprobs": t([[LOG_HALF + math.log(r) for r in ratios]]),
        "old_logprobs": t([[LOG_HALF] * 3]),
        "advantages": t([[1.0, 1.0, -2.0]]),
        "mask": t([[1, 1, 1]]),
    }


def test_clipped_policy_loss_takes_the_pessimistic_term() -> None:
    toy = ppo_toy()
    # token 0: A=1, ρ=1.5: max(−1.5, −1.2) = −1.2 (clipped)
    # token 1: A=1, ρ=0.5: max(−0.5, −0.8) = −0.5 (unclipped)
    # token 2: A=−2, ρ=1.1: max(2.2, 2.2) = 2.2
    loss = rlhf.policy_loss(**toy, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)


def test_clipped_token_gets_no_policy_gradient() -> None:
    toy = ppo_toy()
    toy["logprobs"].requires_grad_()
    rlhf.policy_loss(**toy, clip=0.2).backward()
    grad = toy["logprobs"].grad[0]
    assert grad[0].item() == 0.0  # ratio past 1 + ε with a positive advantage
    assert grad[1].item() == pytest.approx(-1.0 * 0.5 / 3)  # −A·ρ/3
    assert grad[2].item() == pytest.approx(2.0 * 1.1 / 3)


def test_clip_fraction_and_approx_kl() -> None:
    toy = ppo_toy()
    assert rlhf.clip_fraction(**toy, clip=0.2) == pytest.approx(1 / 3)
    expected = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert rlhf.approx_kl(toy["logprobs"], toy["old_logprobs"], toy["mask"]) == pytest.approx(
        expected
    )


def test_masked_tokens_do_not_enter_the_policy_loss() -> None:
    toy = ppo_toy()
    toy["mask"] = t([[1, 1, 0]])
    assert rlhf.policy_loss(**toy, clip=0.2).item() == pytest.approx((-1.2 - 0.5) / 2)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_errors() -> None:
    old, returns, mask = t([[0.0, 0.0, 0.0]]), t([[0.5, 1.0, -2.0]]), t([[1, 1, 1]])
    values = t([[1.0, 0.1, -1.0]])
    # token 0: (1 − 0.5)² = 0.25 vs clipped 0.2: 0.09 -> 0.25
    # token 1: inside the clip: (0.1 − 1)² = 0.81
    # token 2: (−1 + 2)² = 1 vs clipped −0.2: 1.8² = 3.24 -> 3.24
    got = rlhf.value_loss(values, old, returns, mask, clip=0.2)
    assert got.item() == pytest.approx(0.5 * (0.25 + 0.81 + 3.24) / 3)


def test_ptx_loss_is_minus_gamma_times_mean_pretraining_log_likelihood() -> None:
    logprobs = t([[math.log(0.5), math.log(0.25), -50.0]])
    got = rlhf.ptx_loss(logprobs, t([[1, 1, 0]]), coef=2.0)
    assert got.item() == pytest.approx(-2.0 * (math.log(0.5) + math.log(0.25)) / 2)
