"""The promotion gate: may this candidate replace the live policy?

Checks, cheapest first (a failing check that makes the later ones meaningless stops the gate):

1. **finite** — every weight is finite (a single NaN answers garbage or crashes the engine);
2. **generates** — the checkpoint loads in transformers and samples answers whose log-probs
   are finite;
3. **KL to live** — on held-out prompts, answers sampled from the candidate; the sequence KL
   estimate ``E[Σ_t log π_cand − log π_live]`` (nats per answer) is within ``kl_budget``, so
   users never see a sudden jump in behaviour, however good the reward model thinks it is;
4. **reward** — the reward model scores the candidate's answers not lower than the live
   policy's on the same prompts (same seeds: common random numbers cut the noise);
5. **agreement** — on held-out recent rankings (which the reward model never trained on) the
   candidate gives the user-preferred answer the higher log-likelihood at least as often as
   live does: the check that the policy moved towards what users said, not only towards the
   reward model.

Checks 4 and 5 are estimates from a few prompts and a few dozen pairs, so "not lower" means
"not lower by more than ``significance`` standard errors of the paired difference" (and the
fixed tolerance): with a bare comparison a candidate exactly as good as live fails half the
time, and the loop stalls on noise (seen in ``loopchat bench loop``: 5 of 8 refused).

The result is a JSON-able dict: ``passed``, ``reasons`` (failed checks, empty when passed),
``reason`` (one line, for the registry and the ops page) and the numbers behind each check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel

from learn.modeling import load_causal_lm
from learn.reward import load_reward_model, score
from learn.tokens import answer_ids, answer_logprobs, encode_prompt
from serve.events import Messages, normalise_ranking, ranking_pairs
from serve.registry import weights_finite


@dataclass
class GateConfig:
    """Budgets and sample sizes of the gate."""

    prompts: int = field(default=16, metadata={"help": "Held-out prompts sampled for KL/reward."})
    max_new_tokens: int = field(default=32, metadata={"help": "Length of sampled answers."})
    max_prompt_length: int = field(
        default=192, metadata={"help": "Longest prompt in tokens; longer ones lose their start."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (as served)."})
    kl_budget: float = field(
        default=4.0, metadata={"help": "Largest KL(candidate || live), nats per answer."}
    )
    reward_tolerance: float = field(
        default=0.1,
        metadata={
            "help": "Candidate's mean normalised RM score may be this much below live's "
            "(in reward standard deviations: sampling noise on a few prompts)."
        },
    )
    agreement_tolerance: float = field(
        default=0.0,
        metadata={"help": "Candidate's held-out agreement may be this much below live's."},
    )
    significance: float = field(
        default=1.0,
        metadata={
            "help": "The reward and agreement checks fail only when the candidate is worse by "
            "more than this many standard errors of the paired difference (and the tolerance)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed (the same for both models)."})


def encode(
    tokenizer: Any, messages: Messages, answer: list[int], config: GateConfig
) -> tuple[list[int], int]:
    """Token ids of prompt + answer, and where the answer starts."""
    prompt = encode_prompt(tokenizer, messages, config.max_prompt_length)
    return prompt + answer, len(prompt)


@torch.no_grad()
def sample_answers(
    model: PreTrainedModel, tokenizer: Any, prompts: list[Messages], config: GateConfig
) -> list[list[int]]:
    """One sampled answer per prompt (token ids, ending in end-of-turn when the model ended
    it), in one left-padded batch seeded with ``config.seed``: the same draws for both models."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    encoded = [encode(tokenizer, messages, [], config)[0] for messages in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    torch.manual_seed(config.seed)
    out = model.generate(
        input_ids,
        attention_mask=attention,
        do_sample=True,
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    rows = out[:, width:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


@torch.no_grad()
def agreement(
    model: PreTrainedModel, tokenizer: Any, events: list[dict], config: GateConfig
) -> torch.Tensor:
    """One value per held-out preference pair: 1 where ``model`` gives the preferred answer the
    higher log-likelihood, ½ on a tie, 0 otherwise (the mean is the agreement rate)."""
    sequences, offsets = [], []
    for event in events:
        offsets.append(len(sequences))
        sequences += [
            encode(tokenizer, event["messages"], answer_ids(tokenizer, c), config)
            for c in event["candidates"]
        ]
    logp = answer_logprobs(model, sequences, tokenizer.pad_token_id)
    hits = []
    for event, offset in zip(events, offsets, strict=True):
        for better, worse in ranking_pairs(normalise_ranking(event["ranking"])):
            won, lost = logp[offset + better], logp[offset + worse]
            hits.append(1.0 if won > lost else 0.5 if won == lost else 0.0)
    return torch.tensor(hits)


def worse_beyond_noise(
    candidate: torch.Tensor, live: torch.Tensor, tolerance: float, significance: float
) -> bool:
    """Whether paired measurements say the candidate is worse than live: its mean is below
    live's by more than ``tolerance`` and by more than ``significance`` standard errors of the
    paired differences (one pair: no spread to judge by, the tolerance alone decides)."""
    difference = candidate - live
    spread = difference.std().item() / len(difference) ** 0.5 if len(difference) > 1 else 0.0
    return difference.mean().item() < -max(tolerance, significance * spread)


@torch.no_grad()
def evaluate_gate(
    candidate_dir: Path,
    live_dir: Path,
    reward_dir: Path | None,
    heldout_events: list[dict],
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
        result["reasons"].append("weights are not finite (NaN or inf)")
        return verdict()

    tokenizer = AutoTokenizer.from_pretrained(candidate_dir)
    prompts = prompts[: config.prompts]
    try:
        candidate = load_causal_lm(candidate_dir)
        cand_answers = sample_answers(candidate, tokenizer, prompts, config)
        sequences = [
            encode(tokenizer, p, a, config) for p, a in zip(prompts, cand_answers, strict=True)
        ]
        cand_logp = answer_logprobs(candidate, sequences, tokenizer.pad_token_id)
    except Exception as exc:  # any failure to load or run is the verdict, not a crash
        result["generates"] = False
        result["reasons"].append(f"does not load and generate: {type(exc).__name__}: {exc}")
        return verdict()
    result["generates"] = bool(torch.isfinite(cand_logp).all())
    if not result["generates"]:
        result["reasons"].append("generated answers have non-finite log-probabilities")
        return verdict()

    live = load_causal_lm(live_dir)
    live_logp = answer_logprobs(live, sequences, tokenizer.pad_token_id)
    result["kl"] = float((cand_logp - live_logp).mean())
    if result["kl"] > config.kl_budget:
        result["reasons"].append(f"KL to live {result['kl']:.3f} > budget {config.kl_budget}")

    if reward_dir is not None:
        rm = load_reward_model(reward_dir)
        live_answers = sample_answers(live, tokenizer, prompts, config)
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in cand_answers]
        live_texts = [tokenizer.decode(a, skip_special_tokens=True) for a in live_answers]
        cand_rewards = score(rm, tokenizer, prompts, texts)
        live_rewards = score(rm, tokenizer, prompts, live_texts)
        result["reward_candidate"] = float(cand_rewards.mean())
        result["reward_live"] = float(live_rewards.mean())
        if worse_beyond_noise(
            cand_rewards, live_rewards, config.reward_tolerance, config.significance
        ):
            result["reasons"].append(
                f"reward {result['reward_candidate']:.3f} below live's {result['reward_live']:.3f}"
            )

    cand_hits = agreement(candidate, tokenizer, heldout_events, config) if heldout_events else []
    if len(cand_hits):
        live_hits = agreement(live, tokenizer, heldout_events, config)
        result["heldout_pairs"] = len(cand_hits)
        result["agreement_candidate"] = float(cand_hits.mean())
        result["agreement_live"] = float(live_hits.mean())
        if worse_beyond_noise(
            cand_hits, live_hits, config.agreement_tolerance, config.significance
        ):
            result["reasons"].append(
                f"agrees with users on {result['agreement_candidate']:.1%} of held-out pairs, "
                f"live on {result['agreement_live']:.1%}"
            )
    return verdict()
