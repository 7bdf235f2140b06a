"""DPO on the loop's rankings, with an SFT term on the chosen answers.

**The method.** Direct Preference Optimization (Rafailov et al. 2023) trains the policy π on
preference pairs (chosen y_c, rejected y_r) against a frozen reference π_ref with

    −log σ(β · h),   h = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)],

derived from the closed-form optimum of the KL-regularised objective PPO optimises, by writing
the reward as β · log(π/π_ref) (the *implicit reward*) inside the Bradley-Terry likelihood.
IPO (Azar et al. 2023) swaps the logistic loss for (h − 1/(2β))²: it regresses the margin to a
finite target instead of pushing it to infinity, so a pair every user agrees on cannot drive
the policy arbitrarily far from the reference. Log-probabilities are totals over the answer's
tokens, as in both derivations.

**Why it fits a loop of rankings.** A user ranks the K alternates the service showed, so every
(better, worse) pair across tie groups — C(K,2) without ties — is a preference pair, and DPO
trains on them directly: no reward model to fit, no sampling, no value head. All pairs of one
ranking go in the same step, so each answer is run once per step however many pairs it is in.
The reference is the SFT model (``learn.learner``), scored once per round.

**The SFT term.** DPO only sees the margin h: it can lower the log-probability of the chosen
answers too, as long as the rejected ones fall faster, moving mass to answers nobody ranked.
Round after round that compounds: on a toy preference (the ~1M preset, 6 continued rounds of
128 rankings) plain DPO's KL to the SFT model went 1 → 8 → 17 → 37 nats and the preferred
answers got rarer again. Adding α times the mean per-token NLL of each ranking's best answers
(as in Pang et al. 2024, TRL's ``rpo_alpha``) keeps what users liked likely: at α = 0.3 the
KL levelled off near 3.7 nats with the same gain. Per token, so a long chosen answer does not
outweigh a short one; a ranking marked all bad still gives its pairs but nothing to imitate.

**Continuity.** Adam's moments and a round counter are saved beside the policy
(``learner/state.pt``) and restored by the next DPO round; the learning rate and weight decay
are always this round's config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedModel

from learn.learner import RoundData, TrainerOptions, restore_optimizer, save_state
from learn.modeling import autocast, load_causal_lm, load_policy, resolve_device, save_policy
from learn.reward import RankedAnswers, check_model_dir, encode_events
from learn.rlhf import batch_pairs
from learn.tokens import Encoded, answer_logprobs, backward_answer_logprobs
from serve.events import FeedbackEvent, count_pairs, has_preference

logger = logging.getLogger(__name__)

NO_GRAD_BATCH = 64  # sequences per forward when only scoring (reference, final rewards)


@dataclass
class DPOConfig(TrainerOptions):
    """Settings of one DPO round. Names and defaults follow TRL's DPOConfig where they overlap
    (``loss`` is TRL's ``loss_type``, ``sft_coef`` its ``rpo_alpha``)."""

    beta: float = field(
        default=0.1,
        metadata={"help": "β: strength of the implicit KL to the reference (TRL's default)."},
    )
    loss: str = field(
        default="sigmoid",
        metadata={"help": "sigmoid = DPO's −log σ(β·h); ipo = IPO's (h − 1/(2β))²."},
    )
    sft_coef: float = field(
        default=0.3,
        metadata={
            "help": "α: weight of the mean per-token NLL of each ranking's best answers "
            "(0 = plain DPO; all-bad rankings are not imitated). Toy preference, ~1M preset, "
            "6 rounds of 128 rankings: α = 0 ran away (KL to SFT 8–50 nats from round 2), "
            "0.1 and 0.3 gained alike (KL ~3.9 / ~3.7, chosen log-probs falling slower at "
            "0.3), 1.0 held the chosen log-probs but gained less."
        },
    )
    learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": "AdamW learning rate, constant. Sized for the ~1M built-in model (TRL's "
            "5e-7 is for billions of parameters): one round of 128 rankings (32 steps) moved "
            "a toy preference from 52% to 80% at 1e-4 (KL to SFT 1.1 nats), to 61% at 3e-5, and "
            "to 97% at 3e-4 in one jump (KL 3.8)."
        },
    )
    epochs: int = field(
        default=2,
        metadata={"help": "Passes over the round's rankings (1 moved the toy half as far)."},
    )
    rankings_per_step: int = field(
        default=8,
        metadata={"help": "Rankings per optimizer step; all C(K,2) pairs of each in the step."},
    )
    max_length: int = field(
        default=256,
        metadata={"help": "Longest prompt + answer in tokens; longer ones lose their start."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be {' or '.join(LOSSES)}, not {self.loss!r}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.sft_coef < 0 or self.weight_decay < 0:
            raise ValueError("sft_coef and weight_decay must be >= 0")
        if min(self.epochs, self.rankings_per_step, self.max_length) < 1:
            raise ValueError("epochs, rankings_per_step and max_length must be >= 1")


# --- the losses: pure functions of answer log-probs -----------------------------------------------


def log_ratio_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """h = (π_c − r_c) − (π_r − r_r): how much more the policy, relative to the reference,
    favours the chosen answer of each pair (inputs: total answer log-probs, (P,))."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair DPO loss −log σ(β·h) (Rafailov et al. 2023, eq. 7)."""
    h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * h)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair IPO loss (h − 1/(2β))² (Azar et al. 2023, eq. 17, β their τ): the margin is
    pulled to 1/(2β), never past it."""
    h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1 / (2 * beta)) ** 2


def implicit_rewards(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards DPO's policy implies, β·(log π − log π_ref), of the chosen and the rejected
    answers: their difference is what the loss pushes up."""
    return beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
LOSSES: dict[str, PairLoss] = {"sigmoid": dpo_loss, "ipo": ipo_loss}


# --- data: rankings -> steps ----------------------------------------------------------------------


@dataclass
class Ranking:
    """One usable ranking: its answers encoded, its tie groups, the reference's total log-prob
    of each answer (fixed for the round, so the reference runs once), and whether its best
    answers are imitated (not when the user marked every answer bad: the order still teaches,
    the best of bad answers is no example)."""

    sequences: list[Encoded]
    groups: list[list[int]]
    ref_logprobs: torch.Tensor  # (K,)
    imitate: bool = True


@dataclass
class Batch:
    """Several rankings' answers flattened, with their pairs and the answers the SFT term
    imitates (the best tie group of each ranking not marked all bad) as indices."""

    sequences: list[Encoded]
    ref_logprobs: torch.Tensor  # (N,)
    pairs: torch.Tensor  # (P, 2) (better, worse)
    best: torch.Tensor  # (B,) every answer in a best tie group (of rankings imitated)
    answer_tokens: torch.Tensor  # (N,) tokens each answer's log-prob sums over

    @classmethod
    def of(cls, rankings: Sequence[Ranking]) -> Batch:
        sequences = [s for r in rankings for s in r.sequences]
        sizes = [len(r.sequences) for r in rankings]
        pairs, _ = batch_pairs([r.groups for r in rankings], sizes)
        offsets = [0, *accumulate(sizes)][:-1]
        best = [
            o + i for o, r in zip(offsets, rankings, strict=True) if r.imitate for i in r.groups[0]
        ]
        return cls(
            sequences,
            torch.cat([r.ref_logprobs for r in rankings]),
            pairs,
            torch.tensor(best, dtype=torch.long),
            # answer_logprobs sums over ids[start:] (the answer and its end-of-turn)
            torch.tensor([len(ids) - start for ids, start in sequences], dtype=torch.float32),
        )

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.sequences, self.ref_logprobs.to(device), self.pairs.to(device),
            self.best.to(device), self.answer_tokens.to(device),
        )  # fmt: skip


def usable_rankings(
    events: Sequence[FeedbackEvent], tokenizer: Any, max_length: int
) -> tuple[list[RankedAnswers], list[bool]]:
    """The rankings that order at least two answers, encoded (a malformed event is a
    ``ValueError`` naming it), and for each whether its best answers may be imitated."""
    ranked = encode_events(events, tokenizer, max_length)
    imitate = [not event.get("all_bad") for event in events if has_preference(event)]
    return ranked, imitate


@torch.no_grad()
def score_reference(
    reference_dir: Path,
    ranked: Sequence[RankedAnswers],
    imitate: Sequence[bool],
    policy: PreTrainedModel,
    pad_id: int,
    config: DPOConfig,
) -> list[Ranking]:
    """The reference's log-prob of every answer, once; the reference is freed afterwards."""
    ref = load_causal_lm(reference_dir, frozen=True).to(policy.device)
    if ref.config.vocab_size != policy.config.vocab_size:
        raise ValueError("the reference does not share the policy's vocabulary")
    sequences = [s for item in ranked for s in item.sequences]
    with autocast(policy.device, config.bf16):
        logprobs = answer_logprobs(ref, sequences, pad_id, NO_GRAD_BATCH).float().cpu()
    per_ranking = logprobs.split([len(item.sequences) for item in ranked])
    return [
        Ranking(item.sequences, item.ranking, lp, ok)
        for item, lp, ok in zip(ranked, per_ranking, imitate, strict=True)
    ]


# --- training -------------------------------------------------------------------------------------


def step_losses(
    policy_logprobs: torch.Tensor, batch: Batch, config: DPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean pair loss, mean per-token NLL of the best answers) of one step."""
    chosen, rejected = batch.pairs[:, 0], batch.pairs[:, 1]
    pair_loss = LOSSES[config.loss](
        policy_logprobs[chosen], policy_logprobs[rejected],
        batch.ref_logprobs[chosen], batch.ref_logprobs[rejected], config.beta,
    ).mean()  # fmt: skip
    if not len(batch.best):  # every ranking of the step was all bad
        return pair_loss, policy_logprobs.new_zeros(())
    nll = -(policy_logprobs[batch.best] / batch.answer_tokens[batch.best]).mean()
    return pair_loss, nll


def train_step(
    policy: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    pad_id: int,
    config: DPOConfig,
) -> dict[str, float]:
    """One gradient step on a batch of rankings (their answers' forwards ``micro_batch_size``
    sequences at a time, see :func:`learn.tokens.backward_answer_logprobs`)."""
    batch = batch.to(policy.device)

    def objective(logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        pair_loss, nll = step_losses(logprobs.float(), batch, config)
        loss = pair_loss + config.sft_coef * nll
        return loss, {"loss": loss.item(), "pair_loss": pair_loss.item(), "sft_loss": nll.item()}

    optimizer.zero_grad(set_to_none=True)
    with autocast(policy.device, config.bf16):
        stats = backward_answer_logprobs(
            policy, batch.sequences, pad_id, config.micro_batch_size, objective
        )
    torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
    optimizer.step()
    return stats


def train_epoch(
    policy: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    rankings: Sequence[Ranking],
    generator: torch.Generator,
    pad_id: int,
    config: DPOConfig,
) -> list[dict[str, float]]:
    """One shuffled pass over the rankings, ``rankings_per_step`` at a time."""
    policy.train()
    order = torch.randperm(len(rankings), generator=generator).tolist()
    stats = []
    for start in range(0, len(order), config.rankings_per_step):
        chunk = [rankings[i] for i in order[start : start + config.rankings_per_step]]
        stats.append(train_step(policy, optimizer, Batch.of(chunk), pad_id, config))
    return stats


@torch.no_grad()
def measure_rewards(
    policy: PreTrainedModel, rankings: Sequence[Ranking], pad_id: int, config: DPOConfig
) -> dict[str, float]:
    """Implicit rewards on the given rankings' pairs: how often the chosen answer's is higher
    (``reward_accuracy``), by how much on average (``reward_margin``), and each side's mean."""
    policy.eval()
    batch = Batch.of(rankings)
    with autocast(policy.device, config.bf16):
        logprobs = answer_logprobs(policy, batch.sequences, pad_id, NO_GRAD_BATCH).float().cpu()
    c, r = batch.pairs[:, 0], batch.pairs[:, 1]
    chosen, rejected = implicit_rewards(
        logprobs[c], logprobs[r], batch.ref_logprobs[c], batch.ref_logprobs[r], config.beta
    )
    return {
        "reward_accuracy": (chosen > rejected).float().mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "reward_chosen": chosen.mean().item(),
        "reward_rejected": rejected.mean().item(),
    }


# --- continuity -----------------------------------------------------------------------------------


def make_optimizer(
    policy: PreTrainedModel, config: DPOConfig, state: dict[str, Any] | None
) -> tuple[torch.optim.AdamW, int]:
    """AdamW, with the previous DPO round's moments and step count when there is one
    (``learn.learner.restore_optimizer``); and the DPO rounds behind it."""
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
    )
    resumed = restore_optimizer(optimizer, state, "dpo")
    return optimizer, int(state.get("rounds", 0)) if resumed else 0


def trainer_state(optimizer: torch.optim.Optimizer, rounds: int) -> dict[str, Any]:
    """What the next DPO round continues from besides the weights."""
    return {"learner": "dpo", "optimizer": optimizer.state_dict(), "rounds": rounds}


# --- the round ------------------------------------------------------------------------------------

CONFIG = DPOConfig


def train_round(data: RoundData, config: DPOConfig) -> dict[str, Any]:
    """One loop round of DPO (``learn.learner``): the round's rankings as preference pairs
    against the reference, from the previous round's policy and optimizer state.

    Returns JSON-able metrics: counts (``rankings``, ``pairs``, ``rankings_unusable``,
    ``steps``), the last epoch's mean ``loss`` (and its ``pair_loss``/``sft_loss`` parts), the
    implicit-reward ``reward_accuracy``/``reward_margin`` on the training pairs after training
    (``…_start``: before it; 0 margin when the policy is the reference, and after earlier rounds
    how well they already agreed with these new rankings), ``rounds`` (DPO rounds so far, this
    one included) and ``seconds``.
    """
    started = time.perf_counter()
    config = replace(config, seed=config.seed + data.seed)
    for model_dir in (data.policy_dir, data.reference_dir):
        check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(data.policy_dir))
    pad_id = tokenizer.pad_token_id
    ranked, imitate = usable_rankings(data.events, tokenizer, config.max_length)
    if not ranked:
        raise ValueError("no ranking orders two answers")
    torch.manual_seed(config.seed)
    policy = load_policy(data.policy_dir, data.reference_dir, data.lora).to(
        resolve_device(config.device)
    )
    rankings = score_reference(Path(data.reference_dir), ranked, imitate, policy, pad_id, config)
    optimizer, rounds = make_optimizer(policy, config, data.state)
    rounds += 1
    start = measure_rewards(policy, rankings, pad_id, config)
    generator = torch.Generator().manual_seed(config.seed)
    steps, last_epoch = 0, []
    for epoch in range(config.epochs):
        last_epoch = train_epoch(policy, optimizer, rankings, generator, pad_id, config)
        steps += len(last_epoch)
        logger.info("dpo epoch %d: loss %.4f", epoch, _mean(last_epoch, "loss"))
    rewards = measure_rewards(policy, rankings, pad_id, config)
    save_policy(policy, tokenizer, data.out_dir)
    save_state(Path(data.out_dir), trainer_state(optimizer, rounds))
    return {
        "learner": "dpo",
        "rankings": len(rankings),
        "pairs": sum(count_pairs(r.groups) for r in rankings),
        "rankings_unusable": len(data.events) - len(rankings),
        "steps": steps,
        "loss": _mean(last_epoch, "loss"),
        "pair_loss": _mean(last_epoch, "pair_loss"),
        "sft_loss": _mean(last_epoch, "sft_loss"),
        **rewards,
        **{f"{name}_start": value for name, value in start.items()},
        "rounds": rounds,
        "seconds": time.perf_counter() - started,
        "config": asdict(config),
    }


def _mean(rows: Sequence[dict[str, float]], name: str) -> float:
    return sum(row[name] for row in rows) / len(rows) if rows else float("nan")
