"""Token-level helpers every learner shares: prompts and answers as ids, padded batches, and the
log-probabilities a model gives an answer.

Two layouts, each for a reason:

- **Encoded sequences** (``Encoded``: prompt + answer ids and where the answer starts), padded
  on the right by :func:`pad_right`; what the reward model, the gate and DPO score.
- **Rollouts** (:class:`Rollout`): sampled answers laid out so that ``response_index[b, t]``
  is the position whose hidden state predicts answer token ``t``; what PPO-style learners
  gather logits and values at. Right padding keeps position ids plain and never leaves a
  query row fully masked.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from learn import rlhf
from learn.modeling import backward_in_micro_batches
from serve.events import Messages

Encoded = tuple[list[int], int]  # prompt + answer token ids, and where the answer starts


# --- text -> ids ------------------------------------------------------------------------------


def encode_prompt(tokenizer: Any, messages: Messages, max_length: int) -> list[int]:
    """The conversation through the chat template, ending where the assistant answers."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)[-max_length:]


def encode_answer(tokenizer: Any, messages: Messages, answer: str, max_length: int) -> Encoded:
    """Prompt and answer through the chat template, and the index of the answer's first token.

    The last token is the answer's end-of-turn. Too-long conversations lose their beginning,
    never the answer's end that a reward head reads.
    """
    conversation = [*messages, {"role": "assistant", "content": answer}]
    ids = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False))
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    cut = max(0, len(ids) - max_length)
    return ids[cut:], max(1, len(prompt) - cut)


def answer_ids(tokenizer: Any, text: str) -> list[int]:
    """An answer as the policy produces it: its tokens, then end-of-turn."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def pack_texts(tokenizer: Any, texts: Sequence[str], length: int) -> torch.Tensor:
    """Plain text as (N, length) blocks of token ids (texts joined by end-of-turn): the
    pre-training batches of the PPO-ptx term."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(ids) < length:  # too little text for one block: repeat it
        ids = ids * (length // len(ids) + 1)
    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


# --- padded batches ------------------------------------------------------------------------------


def pad_right(
    sequences: Sequence[Encoded], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, answer_mask), right-padded to the longest sequence."""
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    answer = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, start) in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
        answer[row, start : len(seq)] = True
    return ids, mask, answer


@dataclass
class Rollout:
    """Prompts and sampled answers as right-padded tensors (see the module docstring)."""

    input_ids: torch.Tensor  # (B, L) prompt + answer, right-padded
    attention_mask: torch.Tensor  # (B, L)
    response_index: torch.Tensor  # (B, R) position predicting answer token t
    responses: torch.Tensor  # (B, R) answer tokens, pad after the end
    response_mask: torch.Tensor  # (B, R) float, 1 on answer tokens
    ended: torch.Tensor  # (B,) bool: the answer closed with end-of-turn

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        return Rollout(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def to(self, device: torch.device) -> Rollout:
        return Rollout(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def answer_mask(self) -> torch.Tensor:
        """(B, L) bool: where the answer's tokens stand in ``input_ids`` (what the reward
        model's likelihood term averages over)."""
        start = self.response_index[:, :1] + 1
        length = self.response_mask.sum(1, keepdim=True).long()
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (positions >= start) & (positions < start + length)


def make_rollout(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, eos_id: int
) -> Rollout:
    """Lay out prompt + answer pairs (every answer at least one token long)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    r_width = max(len(r) for r in responses)
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_index = torch.zeros((n, r_width), dtype=torch.long)
    response_tokens = torch.full((n, r_width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((n, r_width))
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = torch.tensor([*p, *r], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        response_index[row] = (len(p) - 1 + torch.arange(r_width)).clamp(max=len(ids) - 2)
        response_tokens[row, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[row, : len(r)] = 1.0
    ended = torch.tensor([len(r) > 0 and r[-1] == eos_id for r in responses])
    return Rollout(input_ids, attention_mask, response_index, response_tokens, response_mask, ended)


def prompt_batches(n_prompts: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of prompt indices: shuffled passes over all prompts, one after another."""
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += rng.sample(range(n_prompts), n_prompts)
        yield order[:batch_size]
        order = order[batch_size:]


# --- log-probabilities ------------------------------------------------------------------------


def sequence_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs (B, T−1): entry t is log p(input_ids[t+1] | input_ids[..t]).

    Positions whose target is padding are 0. Works with left or right padding (position ids
    follow the attention mask).
    """
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=False,
    ).logits[:, :-1]  # fmt: skip
    logprobs = rlhf.logprobs_from_logits(logits.float() / temperature, input_ids[:, 1:])
    return logprobs * attention_mask[:, 1:]


def answer_logprobs(
    model: PreTrainedModel,
    sequences: Sequence[Encoded],
    pad_id: int,
    batch_size: int = 32,
    average: bool = False,
) -> torch.Tensor:
    """Log-probability of each answer given its prompt, (N,): the total, or with ``average``
    the mean per answer token (a length-fair NLL for supervised terms). ``batch_size``
    sequences a forward. Gradients flow when enabled (a learner trains through it; the gate
    calls it under ``no_grad``)."""
    totals = []
    for first in range(0, len(sequences), batch_size):
        ids, mask, answer = (
            t.to(model.device) for t in pad_right(sequences[first : first + batch_size], pad_id)
        )
        target = answer[:, 1:]
        total = (sequence_logprobs(model, ids, mask) * target).sum(dim=1)
        totals.append(total / target.sum(dim=1).clamp(min=1) if average else total)
    return torch.cat(totals)


def backward_answer_logprobs(
    model: PreTrainedModel,
    sequences: Sequence[Encoded],
    pad_id: int,
    size: int,
    objective: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    average: bool = False,
) -> dict[str, float]:
    """Backpropagate ``objective(answer log-probs of all sequences)`` into ``model``, ``size``
    sequences' graph at a time (:func:`learn.modeling.backward_in_micro_batches`: the gradient
    of the whole batch even when the objective couples answers, as DPO's pairs do); returns the
    objective's statistics. ``average`` as in :func:`answer_logprobs`."""
    return backward_in_micro_batches(
        len(sequences),
        size,
        lambda rows: (answer_logprobs(model, sequences[rows], pad_id, size, average),),
        lambda outputs: objective(outputs[0]),
    )


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
) -> list[list[int]]:
    """One answer per prompt from transformers ``generate`` (pure sampling at
    ``temperature``, no top-k/top-p, as served; ``temperature=0`` is greedy), each cut after
    its end-of-turn token. Seed ``torch`` first for repeatable draws."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # generate wants left padding
        ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    out = model.generate(
        input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
        max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, **sampling,
    )  # fmt: skip
    return [
        row[: row.index(eos_id) + 1] if eos_id in row else row for row in out[:, width:].tolist()
    ]
