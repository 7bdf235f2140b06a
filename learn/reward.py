"""Reward model: the SFT model's backbone with a scalar head on the last token, trained on rankings.

InstructGPT's recipe (Ouyang et al. 2022, §3.5): start from the SFT weights, replace the
unembedding by a linear head that reads the hidden state of the last token (here the
end-of-turn token the chat template closes every answer with), and train on K-wise rankings
with −log σ(r_w − r_l) over every pair of a ranking, all pairs of one ranking in the same batch
(so each answer is run once per ranking, and a ranking counts once in the loss).

One addition: the score is ``head(h_last) + w · ℓ(y|x)``, where ℓ is the answer's mean token
log-likelihood under the model's own (tied) unembedding, and ``w`` is one learned weight. A
fresh scalar head needs thousands of rankings before it reads correctness off the last hidden
state (held-out pair accuracy 0.55–0.69 from 100–500 rankings of the built-in tasks), while the
SFT model's likelihood already tells a right answer from a wrong one on ~79% of pairs. ``w`` is
fitted to the rankings (a convex one-parameter logistic fit at the start of every refresh, then
trained with the rest), so the data decide how much the likelihood counts, and in which
direction: users who prefer what the model finds unlikely get a negative ``w``.

A refresh warm-starts from the previous reward model when ``init_dir`` is one, so each round
builds on what the last round learned. The mean and standard deviation of the rewards the model
gives its training answers are stored in its config (``reward_mean``, ``reward_std``): PPO and
the gate use normalised scores, so one refresh's shift in scale does not change the PPO reward.

The output is a Hugging Face directory (``LlamaForSequenceClassification`` for a Llama SFT
model, plus the tokenizer) that ``load_reward_model`` reads back.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from learn.modeling import LoraOptions, adapter_base, autocast, backbone, resolve_device
from learn.rlhf import batch_pairs, pairwise_accuracy, pairwise_ranking_loss
from learn.tokens import Encoded, encode_answer, pad_right
from serve.adapters import is_adapter
from serve.events import Messages, normalise_ranking, ranking_pairs, ranking_problem

logger = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    """Settings of one reward-model training run (or refresh)."""

    learning_rate: float = field(
        default=2e-4,
        metadata={
            "help": "AdamW learning rate, constant after a short warm-up (sized for the small "
            "built-in models; InstructGPT's 6B reward model used 9e-6)."
        },
    )
    warmup_steps: int = field(
        default=10, metadata={"help": "Steps of linear learning-rate warm-up (the head is new)."}
    )
    epochs: int = field(
        default=1,
        metadata={
            "help": "Passes over the rankings. InstructGPT trained one: the reward model "
            "overfits quickly when it sees the same answers again (and each warm-started "
            "refresh of the loop is one more pass over the older rankings)."
        },
    )
    rankings_per_batch: int = field(
        default=8,
        metadata={"help": "Rankings per step; all C(K,2) pairs of each go in the same batch."},
    )
    max_length: int = field(
        default=256,
        metadata={"help": "Longest prompt + answer in tokens; longer ones lose their start."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    heldout_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the most recent rankings held out for accuracy when no "
            "held-out rankings are given."
        },
    )
    micro_batch_size: int = field(
        default=8,
        metadata={
            "help": "Answers per forward/backward pass (whole rankings; one ranking alone if "
            "it has more); the step's gradient is the whole batch's."
        },
    )
    bf16: bool = field(
        default=False, metadata={"help": "bfloat16 autocast for forwards and backward (CPU/GPU)."}
    )
    likelihood_feature: bool = field(
        default=True,
        metadata={
            "help": "Add w · (the answer's mean token log-likelihood under the model's tied "
            "unembedding) to the score, w fitted to the rankings at every refresh. Needs "
            "tied embeddings; ignored for models without them."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for the head's init and data order."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu, cuda."})

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        if min(self.epochs, self.rankings_per_batch, self.max_length, self.micro_batch_size) < 1:
            raise ValueError(
                "epochs, rankings_per_batch, max_length and micro_batch_size must be >= 1"
            )
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")


# --- data: feedback events -> token ids and rankings ---------------------------------------------


@dataclass
class RankedAnswers:
    """One ranking: each candidate encoded (prompt + answer, answer start) and its tie groups."""

    sequences: list[Encoded]
    ranking: list[list[int]]


def encode_events(
    events: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[RankedAnswers]:
    """Rankings that order at least two answers; all-bad and all-tied rankings carry no pair.

    Raises ``ValueError`` naming the event when one is malformed (offline JSONL may be
    hand-written; events from the API were validated already).
    """
    encoded = []
    for n, event in enumerate(events):
        name = event.get("id", f"#{n}") if isinstance(event, dict) else f"#{n}"
        try:
            candidates, messages = event["candidates"], event["messages"]
            groups = normalise_ranking(event["ranking"])
        except KeyError as exc:
            raise ValueError(f"event {name}: not a feedback event (no {exc} field)") from None
        except TypeError:
            raise ValueError(f"event {name}: not a feedback event") from None
        problem = ranking_problem(groups, len(candidates), bool(event.get("all_bad")))
        if problem:
            raise ValueError(f"event {name}: {problem}")
        if next(ranking_pairs(groups), None) is None:
            continue
        sequences = [encode_answer(tokenizer, messages, c, max_length) for c in candidates]
        encoded.append(RankedAnswers(sequences, groups))
    return encoded


# --- the model -----------------------------------------------------------------------------------


def init_reward_model(
    init_dir: str | Path, seed: int, lora: LoraOptions | None = None, base_dir: Path | None = None
) -> tuple[PreTrainedModel, bool]:
    """Backbone (and head, when ``init_dir`` is a reward model) from ``init_dir``.

    From an SFT causal LM the backbone is copied and a new scalar head (``num_labels=1``) is
    initialised; from a previous reward model everything is (the warm start). With ``lora`` (a
    large model) the backbone is ``base_dir``'s, frozen, under a LoRA adapter, and the head is
    trained in full beside it (peft's ``modules_to_save``); the warm start is then the previous
    reward model's adapter. Returns the model and whether it was a warm start.
    """
    warm = is_reward_model(init_dir)
    torch.manual_seed(seed)
    if lora is None:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(init_dir), num_labels=1, dtype=torch.float32
        )
        return model, warm
    from peft import LoraConfig, PeftModel, get_peft_model

    base = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=1, dtype=torch.float32
    )
    if warm and is_adapter(init_dir):
        model = PeftModel.from_pretrained(base, str(init_dir), is_trainable=True)
        copy_reward_statistics(AutoConfig.from_pretrained(str(init_dir)), model.config)
        return model, True
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="SEQ_CLS",
    )  # fmt: skip
    return get_peft_model(base, config), False


REWARD_STATISTICS = ("reward_mean", "reward_std", "likelihood_weight")


def copy_reward_statistics(source: Any, target: Any) -> None:
    """What a reward model keeps in its config beside the weights (scale and likelihood weight)."""
    for name in REWARD_STATISTICS:
        if hasattr(source, name):
            setattr(target, name, getattr(source, name))


def check_model_dir(model_dir: str | Path) -> None:
    """A clear error for a path that is not a Hugging Face model (or LoRA adapter) directory."""
    if not any((Path(model_dir) / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ValueError(f"{model_dir}: not a Hugging Face model directory (no config.json)")


def is_reward_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a reward model written by ``train_reward_model``."""
    check_model_dir(model_dir)
    return hasattr(AutoConfig.from_pretrained(str(model_dir)), "reward_mean")


def load_reward_model(model_dir: str | Path) -> PreTrainedModel:
    """A trained reward model, in eval mode; its tokenizer is in the same directory."""
    if not is_reward_model(model_dir):
        raise ValueError(f"{model_dir} is not a reward model (no reward_mean in its config)")
    if not is_adapter(model_dir):
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), dtype=torch.float32
        )
        return model.eval()
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(
        adapter_base(model_dir), num_labels=1, dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
    copy_reward_statistics(AutoConfig.from_pretrained(str(model_dir)), model.config)
    return model.eval()


def has_likelihood_head(model: PreTrainedModel) -> bool:
    """Whether the backbone's input embeddings double as its unembedding (tied weights), so the
    reward model can compute the likelihood feature without a separate LM head."""
    return bool(getattr(model.config, "tie_word_embeddings", False))


def head_and_likelihood(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's score of each sequence at its last attended token, and the answer's mean
    token log-likelihood (None without an ``answer_mask`` or a tied unembedding).

    The last token is found from the attention mask, not by looking for pad ids, so an answer
    that happens to contain the pad token is still scored at its end. Logits are computed only
    where an answer token is predicted, so a large vocabulary costs no full-sequence logits.
    """
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    hidden = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    positions = torch.arange(input_ids.shape[1], device=device)
    last = (positions * attention_mask).argmax(1)
    rows = torch.arange(input_ids.shape[0], device=device)
    head = model.score(hidden[rows, last]).squeeze(-1)
    if answer_mask is None or not has_likelihood_head(model):
        return head, None
    targets = answer_mask.to(device)[:, 1:]  # token t+1 is predicted at position t
    row, col = targets.nonzero(as_tuple=True)
    logits = hidden[row, col] @ model.get_input_embeddings().weight.T
    token_logp = torch.log_softmax(logits.float(), -1).gather(
        1, input_ids[row, col + 1].unsqueeze(1)
    )
    total = torch.zeros(input_ids.shape[0], device=device).index_add(0, row, token_logp[:, 0])
    return head, total / targets.sum(1).clamp(min=1)


def likelihood_weight(model: PreTrainedModel) -> float:
    """The learned weight of the likelihood feature (0 for a model trained without it)."""
    return float(getattr(model.config, "likelihood_weight", 0.0) or 0.0)


def last_token_rewards(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw scalar reward of each sequence (any padding side): the head's score at the last
    attended token, plus the learned weight times the answer's mean log-likelihood.

    ``answer_mask`` marks the answer's tokens; a reward model with a likelihood weight needs
    it (the same answer scores differently without its likelihood term).
    """
    weight = likelihood_weight(model)
    if weight and answer_mask is None:
        raise ValueError("this reward model scores likelihood too: pass the answer_mask")
    head, likelihood = head_and_likelihood(
        model, input_ids, attention_mask, answer_mask if weight else None
    )
    return head if likelihood is None else head + weight * likelihood


def normalize_rewards(model: PreTrainedModel, raw: torch.Tensor) -> torch.Tensor:
    """(raw − mean) / std with the statistics stored at training time."""
    return (raw - model.config.reward_mean) / model.config.reward_std


# --- training ------------------------------------------------------------------------------------


def batch_parts(
    model: PreTrainedModel, batch: Sequence[RankedAnswers], pad_id: int, likelihood: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head scores and (if ``likelihood``) answer likelihoods of every answer of a batch."""
    sequences = [s for item in batch for s in item.sequences]
    input_ids, attention_mask, answer_mask = pad_right(sequences, pad_id)
    head, lik = head_and_likelihood(
        model, input_ids, attention_mask, answer_mask if likelihood else None
    )
    return head.float(), lik  # float32 even under bf16 autocast: rewards are compared


def backward_ranking_loss(
    model: PreTrainedModel,
    batch: Sequence[RankedAnswers],
    pad_id: int,
    likelihood: bool,
    weight: torch.Tensor,
    micro_batch_size: int,
) -> float:
    """Backpropagate the pairwise loss of a batch of rankings, whole rankings of at most
    ``micro_batch_size`` answers a pass (one ranking alone if it has more); returns the loss.

    The loss is a mean over rankings, so each pass's mean weighted by its share of the
    batch's rankings adds up to the batch's loss and gradient with no extra forward.
    """
    owners = batch_pair_indices(batch, torch.device("cpu"))[1]
    counted = len(owners.unique())
    total = 0.0
    for group in ranking_groups(batch, micro_batch_size):
        pairs, owner = batch_pair_indices(group, model.device)
        if not len(pairs):  # all tied: nothing to learn from this pass
            continue
        head, lik = batch_parts(model, group, pad_id, likelihood)
        share = len(owner.unique()) / counted
        loss = pairwise_ranking_loss(combine(head, lik, weight), pairs, owner) * share
        loss.backward()
        total += loss.item()
    return total


def ranking_groups(
    batch: Sequence[RankedAnswers], max_answers: int
) -> list[Sequence[RankedAnswers]]:
    """Consecutive runs of whole rankings with at most ``max_answers`` answers each."""
    groups: list[Sequence[RankedAnswers]] = []
    first, answers = 0, 0
    for i, item in enumerate(batch):
        if i > first and answers + len(item.sequences) > max_answers:
            groups.append(batch[first:i])
            first, answers = i, 0
        answers += len(item.sequences)
    return [*groups, batch[first:]] if batch else groups


def combine(head: torch.Tensor, likelihood: torch.Tensor | None, weight: Any) -> torch.Tensor:
    """The reward: head score plus the weighted likelihood (when there is one)."""
    return head if likelihood is None else head + weight * likelihood


def batch_pair_indices(
    batch: Sequence[RankedAnswers], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of a batch of rankings (indices into its flattened answers) and their owners."""
    pairs, owner = batch_pairs([item.ranking for item in batch], [len(i.sequences) for i in batch])
    return pairs.to(device), owner.to(device)


@dataclass
class ScoredRankings:
    """Head scores and likelihoods of every answer of a data set, with all its pairs."""

    head: torch.Tensor
    likelihood: torch.Tensor | None
    pairs: torch.Tensor
    owner: torch.Tensor

    def metrics(self, weight: float) -> dict[str, Any]:
        """Pairwise accuracy and loss (mean over rankings), and every raw reward."""
        rewards = combine(self.head, self.likelihood, weight)
        return {
            "accuracy": pairwise_accuracy(rewards, self.pairs),
            "loss": pairwise_ranking_loss(rewards, self.pairs, self.owner).item(),
            "pairs": len(self.pairs),
            "rewards": rewards,
        }


@torch.no_grad()
def score_rankings(
    model: PreTrainedModel,
    data: Sequence[RankedAnswers],
    pad_id: int,
    batch_size: int,
    likelihood: bool,
    bf16: bool = False,
) -> ScoredRankings:
    """One no-gradient pass over ``data``."""
    model.eval()
    heads, likelihoods = [], []
    for start in range(0, len(data), batch_size):
        with autocast(model.device, bf16):
            head, lik = batch_parts(model, data[start : start + batch_size], pad_id, likelihood)
        heads.append(head.cpu())
        likelihoods.append(lik.cpu() if lik is not None else None)
    pairs, owner = batch_pair_indices(data, torch.device("cpu"))
    return ScoredRankings(
        torch.cat(heads), torch.cat(likelihoods) if likelihood else None, pairs, owner
    )


def fit_likelihood_weight(scored: ScoredRankings, start: float, l2: float = 1e-3) -> float:
    """The likelihood weight that best ranks ``scored``'s pairs with the head scores held fixed.

    A one-parameter logistic regression: convex, so L-BFGS finds the same answer from any
    start; the small L2 term keeps it finite when a few rankings are perfectly separable.
    """
    assert scored.likelihood is not None
    weight = torch.tensor(float(start), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        rewards = combine(scored.head, scored.likelihood, weight)
        loss = pairwise_ranking_loss(rewards, scored.pairs, scored.owner) + l2 * weight**2
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.item()


def train_reward_model(
    events: Sequence[dict[str, Any]],
    init_dir: str | Path,
    out_dir: str | Path,
    config: RewardConfig,
    heldout_events: Sequence[dict[str, Any]] | None = None,
    lora: LoraOptions | None = None,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Train (or refresh) a reward model on feedback events and save it to ``out_dir``.

    ``init_dir`` is the SFT policy (first time) or the previous reward model (warm start).
    With ``lora``, an adapter over ``base_dir`` (the SFT model) is trained and saved instead.
    Returns JSON-able metrics: ``heldout_accuracy`` (None without held-out rankings),
    ``reward_mean``, ``reward_std``, ``likelihood_weight``, train loss/accuracy, counts, time.
    """
    started = time.perf_counter()
    check_model_dir(init_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(init_dir))
    pad_id = tokenizer.pad_token_id
    train = encode_events(events, tokenizer, config.max_length)
    if heldout_events is None:
        n_held = int(len(train) * config.heldout_fraction) if len(train) >= 2 else 0
        train, heldout = train[: len(train) - n_held], train[len(train) - n_held :]
    else:
        heldout = encode_events(heldout_events, tokenizer, config.max_length)
    if not train:
        raise ValueError("no ranking that orders at least two answers to train on")

    if lora is not None and base_dir is None:
        raise ValueError("a LoRA reward model needs base_dir (the SFT model)")
    model, warm = init_reward_model(init_dir, config.seed, lora, base_dir)
    device = resolve_device(config.device)
    model.to(device)
    use_likelihood = config.likelihood_feature and has_likelihood_head(model)
    batch = 2 * config.rankings_per_batch
    weight = torch.nn.Parameter(torch.tensor(likelihood_weight(model), device=device))
    if use_likelihood:  # fit the one weight first, so the head learns what it leaves unexplained
        scored = score_rankings(model, train, pad_id, batch, True, config.bf16)
        weight.data.fill_(fit_likelihood_weight(scored, weight.item()))
    parameters = [*model.parameters(), weight] if use_likelihood else list(model.parameters())
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps))
    )
    rng = random.Random(config.seed)
    step, epoch_losses = 0, []
    for _ in range(config.epochs):
        model.train()
        order = rng.sample(train, len(train))
        epoch_losses = []
        for start in range(0, len(order), config.rankings_per_batch):
            chunk = order[start : start + config.rankings_per_batch]
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, config.bf16):
                loss = backward_ranking_loss(
                    model, chunk, pad_id, use_likelihood, weight, config.micro_batch_size
                )
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            epoch_losses.append(loss)
            step += 1
        logger.info("reward model epoch done: step %d loss %.4f", step, _mean(epoch_losses))

    final_weight = weight.item() if use_likelihood else 0.0
    on_train = score_rankings(model, train, pad_id, batch, use_likelihood, config.bf16)
    on_train = on_train.metrics(final_weight)
    on_heldout = (
        score_rankings(model, heldout, pad_id, batch, use_likelihood, config.bf16).metrics(
            final_weight
        )
        if heldout
        else None
    )
    model.config.likelihood_weight = final_weight
    model.config.reward_mean = on_train["rewards"].mean().item()
    model.config.reward_std = max(on_train["rewards"].std().item(), 1e-6)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    if lora is not None:  # the adapter alone: keep the statistics in a config beside it
        model.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {
        "rankings": len(train),
        "pairs": on_train["pairs"],
        "heldout_rankings": len(heldout),
        "heldout_pairs": on_heldout["pairs"] if on_heldout else 0,
        "heldout_accuracy": on_heldout["accuracy"] if on_heldout else None,
        "heldout_loss": on_heldout["loss"] if on_heldout else None,
        "train_accuracy": on_train["accuracy"],
        "train_loss": on_train["loss"],
        "last_epoch_loss": _mean(epoch_losses),
        "likelihood_weight": final_weight,
        "reward_mean": model.config.reward_mean,
        "reward_std": model.config.reward_std,
        "steps": step,
        "warm_start": warm,
        "seconds": time.perf_counter() - started,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --- scoring -------------------------------------------------------------------------------------


@torch.no_grad()
def score_ids(
    rm: PreTrainedModel,
    sequences: Sequence[Encoded],
    pad_id: int,
    batch_size: int = 32,
    normalize: bool = True,
) -> torch.Tensor:
    """Reward of each encoded (prompt + answer, answer start), shape (N,), normalised by
    default: what on-policy learners score their samples with (no detokenising round trip)."""
    rewards = []
    for start in range(0, len(sequences), batch_size):
        ids, mask, answer = (
            t.to(rm.device) for t in pad_right(sequences[start : start + batch_size], pad_id)
        )
        rewards.append(last_token_rewards(rm, ids, mask, answer))
    raw = torch.cat(rewards).float().cpu() if rewards else torch.zeros(0)
    return normalize_rewards(rm, raw) if normalize else raw


def score(
    rm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages_list: Sequence[Messages],
    answers: Sequence[str],
    normalize: bool = True,
    batch_size: int = 32,
) -> torch.Tensor:
    """Reward of each (conversation, answer) pair, normalised by default: shape (N,)."""
    max_length = rm.config.max_position_embeddings
    sequences = [
        encode_answer(tokenizer, messages, answer, max_length)
        for messages, answer in zip(messages_list, answers, strict=True)
    ]
    return score_ids(rm, sequences, tokenizer.pad_token_id, batch_size, normalize)
