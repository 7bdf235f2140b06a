"""The promotion gate: may this candidate replace the live policy?

It refuses only what must not go live — a broken checkpoint, one that drifted past its KL
budget, or one measurably *worse* than live — because a refused round's learning is not lost
(the next round continues from the candidate, ``learn.learner``): the gate decides what users
see, not what the learner remembers. Checks, cheapest first (a check that makes the later ones
meaningless stops the gate):

1. **finite** — every weight is finite (a single NaN answers garbage or crashes the engine);
2. **generates** — the checkpoint loads in transformers and samples answers whose log-probs
   are finite;
3. **KL to SFT** — on the held-out prompts, answers sampled from the candidate; the sequence
   KL estimate ``E[Σ_t log π_cand − log π_SFT]`` (nats per answer) is within ``kl_budget``:
   the constraint every learner trains under, checked on prompts none of them saw (the KL to
   live is reported beside it);
4. **reward** — the reward model scores the candidate's sampled answers against live's on the
   same held-out prompts (same seeds: common random numbers cut the noise), paired by prompt;
5. **agreement** — on the held-out rankings (which neither the reward model nor the policy
   trained on): did the candidate move toward what users preferred? Per pair (preferred w,
   other l) the margin ``[log π_c(w) − log π_live(w)] − [log π_c(l) − log π_live(l)]`` (DPO's
   implicit reward of the candidate against live); positive means it raised the preferred
   answer relative to the other.

6. **signal** — the round's reward model orders the held-out rankings better than chance (its
   per-ranking pair accuracy, lower bound of ``significance`` standard errors above ½). When
   it cannot, the rankings carried no preference it could learn (users ranking at random, or
   too few rankings), and whatever a learner made of them must not reach users: a policy
   optimised against a reward model of noise can lose a fifth of its answers while every
   other check still passes (``loopchat bench loop``'s shuffled control).

Checks 4 and 5 fail only when the candidate is worse than live by more than ``significance``
(2) standard errors: a paired one over prompts for the reward, one *clustered by completion*
for the agreement — the C(K,2) pairs of one ranking share their answers and are not
independent, so their margins are averaged per ranking first and the error is taken over
rankings.

The result is a JSON-able dict: ``passed``, ``reasons`` (each failed check with its numbers),
``reason`` (one line, for the registry and the ops page) and every number measured, with the
reward difference's standard error and 95% interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel

from learn.modeling import load_causal_lm
from learn.reward import load_reward_model, score_ids
from learn.tokens import Encoded, answer_ids, answer_logprobs, encode_prompt, generate_answers
from serve.events import FeedbackEvent, Messages, normalise_ranking, ranking_pairs
from serve.registry import weights_finite


@dataclass
class GateConfig:
    """Budgets and sample sizes of the gate."""

    prompts: int = field(
        default=32, metadata={"help": "Most held-out prompts sampled for KL and reward."}
    )
    samples_per_prompt: int = field(
        default=4, metadata={"help": "Answers sampled per prompt from each model."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Length of sampled answers."})
    max_prompt_length: int = field(
        default=192, metadata={"help": "Longest prompt in tokens; longer ones lose their start."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (as served)."})
    kl_budget: float = field(
        default=6.0, metadata={"help": "Largest KL(candidate || SFT), nats per answer."}
    )
    significance: float = field(
        default=2.0,
        metadata={
            "help": "The reward and agreement checks fail only when the candidate is worse "
            "than live by more than this many standard errors."
        },
    )
    require_signal: bool = field(
        default=True,
        metadata={
            "help": "Refuse when the round's reward model orders the held-out rankings no "
            "better than chance (check 6: the rankings carried nothing it learned)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed (the same for both models)."})


def paired_difference(candidate: torch.Tensor, live: torch.Tensor) -> dict[str, float]:
    """Mean of ``candidate − live`` with its standard error and 95% interval (normal
    approximation; a single pair has no spread, so its error is 0)."""
    return mean_with_error(candidate - live)


def mean_with_error(values: torch.Tensor) -> dict[str, float]:
    """Mean, standard error and 95% interval of independent ``values``."""
    n = len(values)
    mean = values.mean().item()
    se = values.std().item() / n**0.5 if n > 1 else 0.0
    return {"mean": mean, "se": se, "low": mean - 1.96 * se, "high": mean + 1.96 * se, "n": n}


def worse_beyond_noise(estimate: dict[str, float], significance: float) -> bool:
    """Whether an estimated difference (candidate − live) is below zero by more than
    ``significance`` standard errors."""
    return estimate["mean"] < -significance * estimate["se"]


def sample_answers(
    model: PreTrainedModel, tokenizer: Any, prompt_ids: list[list[int]], config: GateConfig
) -> list[list[int]]:
    """Sampled answers to ``prompt_ids`` (token ids, ending in end-of-turn when the model ended
    it), seeded with ``config.seed``: the same draws for both models."""
    torch.manual_seed(config.seed)
    return generate_answers(
        model, prompt_ids, tokenizer.pad_token_id, tokenizer.eos_token_id,
        config.max_new_tokens, config.temperature,
    )  # fmt: skip


def ranking_sequences(
    tokenizer: Any, events: list[FeedbackEvent], config: GateConfig
) -> tuple[list[Encoded], list[list[tuple[int, int]]]]:
    """Every candidate of every held-out ranking as (ids, answer start), and per ranking its
    (better, worse) pairs as indices into that list."""
    sequences: list[Encoded] = []
    pairs: list[list[tuple[int, int]]] = []
    for event in events:
        offset = len(sequences)
        prompt = encode_prompt(tokenizer, event["messages"], config.max_prompt_length)
        sequences += [(prompt + answer_ids(tokenizer, c), len(prompt)) for c in event["candidates"]]
        pairs.append(
            [
                (offset + b, offset + w)
                for b, w in ranking_pairs(normalise_ranking(event["ranking"]))
            ]
        )
    return sequences, pairs


def ranking_accuracies(scores: torch.Tensor, pairs: list[list[tuple[int, int]]]) -> torch.Tensor:
    """One value per ranking: the share of its pairs whose preferred answer ``scores`` higher
    (a tie counts half). Rankings with no pair are left out."""
    return torch.tensor(
        [
            sum(1.0 if scores[b] > scores[w] else 0.5 if scores[b] == scores[w] else 0.0
                for b, w in ranking) / len(ranking)
            for ranking in pairs
            if ranking
        ]
    )  # fmt: skip


def agreement_margins(
    candidate_logp: torch.Tensor, live_logp: torch.Tensor, pairs: list[list[tuple[int, int]]]
) -> torch.Tensor:
    """One value per ranking: the mean over its pairs of the candidate-vs-live implicit reward
    margin (module docstring, check 5). Rankings with no pair are left out."""
    shift = candidate_logp - live_logp
    return torch.tensor(
        [
            sum(shift[b] - shift[w] for b, w in ranking).item() / len(ranking)
            for ranking in pairs
            if ranking
        ]
    )


@torch.no_grad()
def evaluate_gate(
    candidate_dir: Path,
    live_dir: Path,
    reference_dir: Path,
    reward_dir: Path | None,
    heldout_events: list[FeedbackEvent],
    prompts: list[Messages],
    config: GateConfig,
) -> dict[str, Any]:
    """Run the checks (module docstring) and return the verdict with its numbers."""
    if not prompts:
        raise ValueError("the gate needs at least one prompt to sample answers for")
    result: dict[str, Any] = {"passed": False, "reasons": [], "kl_budget": config.kl_budget}

    def verdict() -> dict[str, Any]:
        result["passed"] = not result["reasons"]
        result["reason"] = "; ".join(result["reasons"]) or "all checks passed"
        return result

    result["finite"] = weights_finite(candidate_dir)
    if not result["finite"]:
        result["reasons"].append("finite: weights are not finite (NaN or inf)")
        return verdict()

    tokenizer = AutoTokenizer.from_pretrained(candidate_dir)
    prompt_ids = [
        encode_prompt(tokenizer, messages, config.max_prompt_length)
        for messages in prompts[: config.prompts]
        for _ in range(config.samples_per_prompt)
    ]
    result["prompts"] = len(prompt_ids) // config.samples_per_prompt
    pad = tokenizer.pad_token_id
    try:
        candidate = load_causal_lm(candidate_dir)
        cand_answers = sample_answers(candidate, tokenizer, prompt_ids, config)
        sequences = [(p + a, len(p)) for p, a in zip(prompt_ids, cand_answers, strict=True)]
        cand_logp = answer_logprobs(candidate, sequences, pad)
    except Exception as exc:  # any failure to load or run is the verdict, not a crash
        result["generates"] = False
        result["reasons"].append(
            f"generates: does not load and sample: {type(exc).__name__}: {exc}"
        )
        return verdict()
    result["generates"] = bool(torch.isfinite(cand_logp).all())
    if not result["generates"]:
        result["reasons"].append("generates: sampled answers have non-finite log-probabilities")
        return verdict()

    live = load_causal_lm(live_dir)
    result["kl_to_sft"] = float(
        (cand_logp - answer_logprobs(load_causal_lm(reference_dir), sequences, pad)).mean()
    )
    result["kl_to_live"] = float((cand_logp - answer_logprobs(live, sequences, pad)).mean())
    if result["kl_to_sft"] > config.kl_budget:
        result["reasons"].append(
            f"KL: {result['kl_to_sft']:.3f} nats to SFT > budget {config.kl_budget}"
        )

    if reward_dir is not None:
        rm = load_reward_model(reward_dir)
        live_answers = sample_answers(live, tokenizer, prompt_ids, config)
        live_sequences = [(p + a, len(p)) for p, a in zip(prompt_ids, live_answers, strict=True)]
        per_prompt = config.samples_per_prompt
        cand_rewards = score_ids(rm, sequences, pad).view(-1, per_prompt).mean(1)
        live_rewards = score_ids(rm, live_sequences, pad).view(-1, per_prompt).mean(1)
        result["reward_candidate"] = float(cand_rewards.mean())
        result["reward_live"] = float(live_rewards.mean())
        result["reward_difference"] = estimate = paired_difference(cand_rewards, live_rewards)
        if worse_beyond_noise(estimate, config.significance):
            result["reasons"].append(
                f"reward: {estimate['mean']:+.3f} ± {estimate['se']:.3f} (SE) against live "
                f"over {estimate['n']} prompts, worse by more than {config.significance} SE"
            )

    sequences, pairs = ranking_sequences(tokenizer, heldout_events, config)
    if any(pairs) and reward_dir is not None:
        result["rm_heldout_accuracy"] = estimate = mean_with_error(
            ranking_accuracies(score_ids(rm, sequences, pad), pairs)
        )
        if config.require_signal and estimate["mean"] - config.significance * estimate["se"] <= 0.5:
            result["reasons"].append(
                f"reward model: orders {estimate['mean']:.0%} ± {estimate['se']:.0%} (SE over "
                f"{estimate['n']} rankings) of the held-out pairs right, not better than chance "
                f"by {config.significance} SE: the rankings it trained on carry no signal it "
                "learned, so nothing trained on them goes live"
            )
    if any(pairs):
        margins = agreement_margins(
            answer_logprobs(candidate, sequences, pad), answer_logprobs(live, sequences, pad), pairs
        )
        result["heldout_rankings"] = len(margins)
        result["heldout_pairs"] = sum(len(r) for r in pairs)
        result["agreement_margin"] = estimate = mean_with_error(margins)
        if worse_beyond_noise(estimate, config.significance):
            result["reasons"].append(
                f"agreement: moved away from users' held-out choices, margin "
                f"{estimate['mean']:+.3f} ± {estimate['se']:.3f} nats (SE over "
                f"{estimate['n']} rankings), worse by more than {config.significance} SE"
            )
    return verdict()
