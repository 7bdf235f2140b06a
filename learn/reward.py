"""Reward model: the SFT model's backbone with a scalar head on the last token, trained on rankings.

InstructGPT's recipe (Ouyang et al. 2022, §3.5): start from the SFT weights, replace the
unembedding by a linear head that reads the hidden state of the last token (here the
end-of-turn token the chat template closes every answer with), and train on K-wise rankings
with −log σ(r_w − r_l) over every pair of a ranking, all pairs of one ranking in the same batch
(so each answer is run once per ranking, and a ranking counts once in the loss).

A refresh warm-starts from the previous reward model when ``init_dir`` is one, so each round
builds on what the last round learned. The mean and standard deviation of the rewards the model
gives its training answers are stored in its config (``reward_mean``, ``reward_std``): PPO and
the gate use normalised scores, so one refresh's shift in scale does not change the PPO reward.

The output is a Hugging Face directory (``LlamaForSequenceClassification`` for a Llama SFT
model, plus the tokenizer) that ``load_reward_model`` reads back.
"""

from __future__ import annotations

import argparse
import json
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

from learn.rlhf import batch_pairs, pairwise_accuracy, pairwise_ranking_loss
from serve.feedback import normalise_ranking, ranking_pairs, ranking_problem

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


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
    seed: int = field(default=0, metadata={"help": "Seed for the head's init and data order."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu, cuda."})

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        if min(self.epochs, self.rankings_per_batch, self.max_length) < 1:
            raise ValueError("epochs, rankings_per_batch and max_length must be >= 1")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")


# --- data: feedback events -> token ids and rankings ---------------------------------------------


@dataclass
class RankedAnswers:
    """One ranking: the token ids of each candidate (prompt + answer) and its tie groups."""

    sequences: list[list[int]]
    ranking: list[list[int]]


def encode_answer(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, answer: str, max_length: int
) -> list[int]:
    """Prompt and answer through the chat template; the last token is the answer's end-of-turn.

    Too-long conversations lose their beginning, never the answer's end that the head reads.
    """
    conversation = [*messages, {"role": "assistant", "content": answer}]
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    return list(ids)[-max_length:]


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


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to the longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


# --- the model -----------------------------------------------------------------------------------


def init_reward_model(init_dir: str | Path, seed: int) -> tuple[PreTrainedModel, bool]:
    """Backbone (and head, when ``init_dir`` is a reward model) from ``init_dir``.

    From an SFT causal LM the backbone is copied and a new scalar head (``num_labels=1``) is
    initialised; from a previous reward model everything is (the warm start). Returns the model
    and whether it was a warm start.
    """
    warm = is_reward_model(init_dir)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(init_dir), num_labels=1, dtype=torch.float32
    )
    return model, warm


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_model_dir(model_dir: str | Path) -> None:
    """A clear error for a path that is not a Hugging Face model directory."""
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a Hugging Face model directory (no config.json)")


def is_reward_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a reward model written by ``train_reward_model``."""
    check_model_dir(model_dir)
    return hasattr(AutoConfig.from_pretrained(str(model_dir)), "reward_mean")


def load_reward_model(model_dir: str | Path) -> PreTrainedModel:
    """A trained reward model, in eval mode; its tokenizer is in the same directory."""
    if not is_reward_model(model_dir):
        raise ValueError(f"{model_dir} is not a reward model (no reward_mean in its config)")
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def last_token_rewards(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Raw scalar reward of each sequence, read at its last attended token (any padding side).

    The last token is found from the attention mask, not by looking for pad ids, so an answer
    that happens to contain the pad token is still scored at its end.
    """
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask).argmax(1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return model.score(hidden[rows, last]).squeeze(-1)


def normalize_rewards(model: PreTrainedModel, raw: torch.Tensor) -> torch.Tensor:
    """(raw − mean) / std with the statistics stored at training time."""
    return (raw - model.config.reward_mean) / model.config.reward_std


# --- training ------------------------------------------------------------------------------------


def ranking_batch_rewards(
    model: PreTrainedModel, batch: Sequence[RankedAnswers], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards of every answer of a batch of rankings, with the batch's pairs and their owners."""
    sequences = [s for item in batch for s in item.sequences]
    input_ids, attention_mask = pad_right(sequences, pad_id)
    rewards = last_token_rewards(model, input_ids, attention_mask)
    pairs, owner = batch_pairs([item.ranking for item in batch], [len(i.sequences) for i in batch])
    return rewards, pairs.to(rewards.device), owner.to(rewards.device)


@torch.no_grad()
def evaluate(
    model: PreTrainedModel, data: Sequence[RankedAnswers], pad_id: int, batch_size: int
) -> dict[str, Any]:
    """Pairwise accuracy and loss on ``data``, and every raw reward (for the normalisation)."""
    model.eval()
    all_rewards, losses, hits, n_pairs = [], [], 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        rewards, pairs, owner = ranking_batch_rewards(model, batch, pad_id)
        losses.append(pairwise_ranking_loss(rewards, pairs, owner).item() * len(batch))
        hits += pairwise_accuracy(rewards, pairs) * len(pairs)
        n_pairs += len(pairs)
        all_rewards.append(rewards)
    return {
        "accuracy": hits / n_pairs,
        "loss": sum(losses) / len(data),
        "pairs": n_pairs,
        "rewards": torch.cat(all_rewards).cpu(),
    }


def train_reward_model(
    events: Sequence[dict[str, Any]],
    init_dir: str | Path,
    out_dir: str | Path,
    config: RewardConfig,
    heldout_events: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train (or refresh) a reward model on feedback events and save it to ``out_dir``.

    ``init_dir`` is the SFT policy (first time) or the previous reward model (warm start).
    Returns JSON-able metrics: ``heldout_accuracy`` (None without held-out rankings),
    ``reward_mean``, ``reward_std``, train loss/accuracy, counts and time.
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

    model, warm = init_reward_model(init_dir, config.seed)
    model.to(resolve_device(config.device))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
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
            rewards, pairs, owner = ranking_batch_rewards(
                model, order[start : start + config.rankings_per_batch], pad_id
            )
            loss = pairwise_ranking_loss(rewards, pairs, owner)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            epoch_losses.append(loss.item())
            step += 1
        logger.info("reward model epoch done: step %d loss %.4f", step, _mean(epoch_losses))

    batch = 2 * config.rankings_per_batch
    on_train = evaluate(model, train, pad_id, batch)
    on_heldout = evaluate(model, heldout, pad_id, batch) if heldout else None
    model.config.reward_mean = on_train["rewards"].mean().item()
    model.config.reward_std = max(on_train["rewards"].std().item(), 1e-6)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
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
    rewards = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_right(sequences[start : start + batch_size], tokenizer.pad_token_id)
        rewards.append(last_token_rewards(rm, ids, mask))
    raw = torch.cat(rewards).cpu() if rewards else torch.zeros(0)
    return normalize_rewards(rm, raw) if normalize else raw


# --- `loopchat train reward` ---------------------------------------------------------------------


def read_jsonl(path: str, flag: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing file or a bad line is a CLI error naming it."""
    from serve.cli import CLIError

    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise CLIError(f"{flag} {path}: {exc.strerror or exc}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{flag} {path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise CLIError(f"{flag} {path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from learn.cli_train import add_config_arguments

    parser.add_argument(
        "--data", required=True, metavar="FILE",
        help="Rankings JSONL: feedback events (`loopchat feedback export --format rankings`).",
    )  # fmt: skip
    parser.add_argument(
        "--init", required=True, metavar="DIR",
        help="SFT policy to start from, or a previous reward model to refresh (warm start).",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="Reward model written here.")
    parser.add_argument(
        "--heldout", metavar="FILE",
        help="Held-out rankings JSONL (default: the most recent --heldout-fraction of --data).",
    )  # fmt: skip
    add_config_arguments(parser, RewardConfig)


def run(args: argparse.Namespace) -> int:
    from learn.cli_train import config_from_args
    from serve.cli import CLIError

    config = config_from_args(args, RewardConfig)
    events = read_jsonl(args.data, "--data")
    heldout = read_jsonl(args.heldout, "--heldout") if args.heldout else None
    try:
        metrics = train_reward_model(events, args.init, args.out, config, heldout)
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps(metrics))
    print(f"reward model written to {args.out}")
    return 0
