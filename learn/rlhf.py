"""The RLHF math of InstructGPT, as small pure functions on tensors.

Reward model (Ouyang et al. 2022, eq. 1): a ranking of K answers gives every ordered pair
(winner, loser) whose members are in different tie groups; the loss is −log σ(r_w − r_l) averaged
over the pairs of one ranking, so a ranking counts once however many pairs it yields (all pairs of
a ranking go in the same batch: K forward passes instead of 2·C(K,2), and no overfitting from
seeing the same answer in many batches).

PPO (Schulman et al. 2017; Ziegler et al. 2019; Stiennon et al. 2020): per-token reward
−β·KL(π‖π_SFT) plus the reward model's score at the last token, GAE advantages, whitened, a
clipped probability ratio and a clipped value loss; PPO-ptx adds γ·(log-likelihood of
pre-training text) to the objective so the policy keeps its language-model skills.

Tensors of per-token quantities are (batch, tokens) with a 0/1 ``mask`` marking real tokens;
responses start at index 0 of their tensor and their mask is contiguous (ones, then zeros).
Everything here is differentiable where it is a loss and is tested against hand-computed values
in ``tests/learn/test_rlhf_math.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from serve.events import normalise_ranking, ranking_pairs

Ranking = Sequence[Sequence[int] | int]


# --- reward model: rankings -> pairs -> loss -----------------------------------------------------


def batch_pairs(
    rankings: Sequence[Ranking], sizes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs of a batch of rankings, as indices into the batch's flattened answers.

    Ranking ``j`` ranks answers ``offset_j .. offset_j + sizes[j] − 1`` of the batch. Returns
    ``pairs`` (P, 2) of (winner, loser) and ``pair_ranking`` (P,), the ranking each pair came
    from. Pair expansion is the one the feedback route counts with (``serve.events``): every
    (better, worse) pair across tie groups, none inside a group; C(K, 2) pairs without ties.
    """
    pairs: list[tuple[int, int]] = []
    owner: list[int] = []
    offset = 0
    for j, (ranking, size) in enumerate(zip(rankings, sizes, strict=True)):
        for w, lo in ranking_pairs(normalise_ranking(list(ranking))):
            pairs.append((offset + w, offset + lo))
            owner.append(j)
        offset += size
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2), torch.tensor(owner, dtype=torch.long)


def pairwise_ranking_loss(
    rewards: torch.Tensor, pairs: torch.Tensor, pair_ranking: torch.Tensor
) -> torch.Tensor:
    """Mean over rankings of the per-ranking mean of −log σ(r_w − r_l).

    ``rewards`` (N,) are the scalar rewards of every answer in the batch, ``pairs`` (P, 2) index
    into it (winner, loser) and ``pair_ranking`` (P,) says which ranking each pair came from.
    Rankings without pairs (all answers tied) do not count.
    """
    per_pair = -F.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]])
    n = int(pair_ranking.max()) + 1
    sums = torch.zeros(n, dtype=per_pair.dtype, device=per_pair.device)
    sums = sums.index_add(0, pair_ranking, per_pair)
    counts = torch.bincount(pair_ranking, minlength=n).to(per_pair.dtype)
    has_pairs = counts > 0
    return (sums[has_pairs] / counts[has_pairs]).mean()


def pairwise_accuracy(rewards: torch.Tensor, pairs: torch.Tensor) -> float:
    """Fraction of pairs whose winner got the strictly higher reward."""
    return (rewards[pairs[:, 0]] > rewards[pairs[:, 1]]).float().mean().item()


# --- masked statistics ---------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise masked values to unit variance (and zero mean unless ``shift_mean`` is False).

    The variance is the unbiased one; positions outside the mask come out as 0.
    """
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# --- log-probabilities and entropy ---------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position: (B, T, V), (B, T) -> (B, T)."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, in nats: (B, T, V) -> (B, T)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# --- KL penalty and rewards ----------------------------------------------------------------------

KLEstimator = Literal["k1", "k3"]


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from log-probs of tokens sampled from π.

    k1 = log π − log π_ref (unbiased, can be negative); k3 = (ρ − 1) − log ρ with
    ρ = π_ref/π (unbiased, never negative, lower variance). See J. Schulman, "Approximating KL
    divergence" (2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: −β·KL on every response token, plus the sequence score on the last one."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long() - 1
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards


@dataclass
class FixedKLController:
    """A constant β (InstructGPT used β = 0.02)."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """β stays as it is."""


@dataclass
class AdaptiveKLController:
    """β steered toward a target KL (Ziegler et al. 2019, eq. 2).

    e = clip(KL / target − 1, −0.2, 0.2); β ← β·(1 + e·n / horizon), where n is the number of
    episodes since the last update: β grows while the policy drifts past the target and
    shrinks while it stays closer.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# --- advantages ----------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns (advantages, returns = advantages + values).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with V = 0 after the last token
    (the episode ends there, nothing to bootstrap from).
    """
    rewards = rewards * mask
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# --- PPO losses ----------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """Clipped surrogate, as a loss: mean of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), mask)


def clip_fraction(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> float:
    """Fraction of tokens where the clipped term is the active one (the gradient is cut)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean((clipped > unclipped).float(), mask).item()


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """½·E[(log π − log π_old)²]: how far one PPO epoch moved the policy from the sampler."""
    return (0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)).item()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """½·mean of max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    worst = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(worst, mask)


def ptx_loss(logprobs: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """PPO-ptx as a loss: −γ·(mean log-likelihood of pre-training tokens)."""
    return -coef * masked_mean(logprobs, mask)
