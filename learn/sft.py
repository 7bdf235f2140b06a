"""Stage 2: supervised fine-tuning on conversations, with loss on the assistant's tokens only.

Reads top to bottom: the config; conversations (JSONL in the OpenAI fine-tuning format
``{"messages": [{"role": ..., "content": ...}, ...]}`` read with ``datasets``, or the built-in
demonstrations); each one rendered with the model's own chat template into ids and labels that
keep only assistant tokens; the ``sft`` entry point; the CLI hooks.

Only the answers carry loss: the model is taught to answer, not to imitate users, and on the
built-in tasks this is what made a small model exact (loss on every token, same time: about
half the accuracy). Rows are packed and trained by the pre-training loop
(``learn.pretrain.train_causal_lm``); any Hugging Face causal LM with a chat template can be
the starting point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from learn.pretrain import IGNORE, Packed, TrainConfig, pack, train_causal_lm

ROLES = ("system", "user", "assistant")

# --- config ---------------------------------------------------------------------------------


@dataclass
class SFTConfig(TrainConfig):
    """Stage 2: fine-tune ``model_dir`` on conversations."""

    model_dir: str = field(
        default="", metadata={"help": "Hugging Face causal-LM directory to start from."}
    )
    train_files: list[str] = field(
        default_factory=list,
        metadata={"help": 'JSONL files of {"messages": [...]}. None: the built-in demonstrations.'},
    )
    eval_files: list[str] = field(
        default_factory=list,
        metadata={"help": "JSONL conversations for eval loss. None: a slice of the training data "
                  "(the held-out split for the built-in demonstrations)."},
    )  # fmt: skip
    eval_fraction: float = field(
        default=0.02, metadata={"help": "Share of the training files kept for eval loss."}
    )
    builtin_conversations: int = field(
        default=20000, metadata={"help": "Demonstrations generated when using the built-in set."}
    )
    builtin_eval: int = field(
        default=300, metadata={"help": "Held-out built-in demonstrations for eval loss."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model_dir:
            raise ValueError("model_dir is required (the model to fine-tune)")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError("eval_fraction must be in [0, 1)")


# --- conversations --------------------------------------------------------------------------


def check_conversation(messages: object, where: str) -> list[dict]:
    """``messages`` if it is a conversation worth training on, else a ValueError naming it."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{where}: message {i} needs a role in {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} needs string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_conversations(files: list[str]) -> list[list[dict]]:
    """Conversations from local JSONL files, read with ``datasets``."""
    import datasets

    for name in files:
        with open(name):  # a clear FileNotFoundError before datasets' own resolution
            pass
    try:
        rows = datasets.load_dataset("json", data_files=list(files), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError) as exc:
        raise ValueError(f"{', '.join(files)}: not JSONL conversations ({exc})") from None
    if "messages" not in rows.column_names:
        raise ValueError(f"{', '.join(files)}: rows need a 'messages' field")
    return [check_conversation(r, f"row {i}") for i, r in enumerate(rows["messages"])]


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def assistant_masks(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each rendered conversation and a 0/1 mask of the assistant's tokens.

    Templates that mark assistant text with ``{% generation %}`` (ours) give the masks directly
    (rendered and tokenized in batches: the fast tokenizer encodes a batch in parallel). For
    others (most hub models), assistant turn ``i``'s tokens are those that rendering
    ``messages[:i + 1]`` adds to rendering ``messages[:i]`` with the generation prompt, which is
    exact as long as the template renders a conversation's start as a prefix of its tokens
    (checked).
    """
    if not _GENERATION_TAG.search(tokenizer.chat_template or ""):
        return [_mask_by_prefixes(tokenizer, messages) for messages in conversations]
    out = []
    for start in range(0, len(conversations), 512):
        chunk = conversations[start : start + 512]
        enc = tokenizer.apply_chat_template(
            chunk, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        pairs = zip(enc["input_ids"], enc["assistant_masks"], strict=True)
        out += [(list(ids), list(mask)) for ids, mask in pairs]
    return out


def _mask_by_prefixes(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict]
) -> tuple[list[int], list[int]]:
    def render(part: list[dict], prompt: bool) -> list[int]:
        enc = tokenizer.apply_chat_template(part, tokenize=True, return_dict=True,
                                            add_generation_prompt=prompt)  # fmt: skip
        return list(enc["input_ids"])

    ids = render(messages, False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, upto = len(render(messages[:i], True)), render(messages[: i + 1], False)
        end = len(upto)
        if upto != ids[:end]:
            raise ValueError("the chat template does not render a conversation's start as a "
                             "prefix; add {% generation %} markers to it")  # fmt: skip
        mask[start:end] = [1] * (end - start)
    return ids, mask


def conversation_docs(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per conversation: labels are the ids on assistant tokens, else IGNORE."""
    return [
        (ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)])
        for ids, mask in assistant_masks(tokenizer, conversations)
    ]


def pack_conversations(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]], seq_len: int
) -> Packed:
    """Packed rows of conversations, each cut to ``seq_len`` tokens: a conversation is never
    split across rows, where its later turns would lose the earlier ones they refer to."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    docs = conversation_docs(tokenizer, conversations)
    return pack(((ids[:seq_len], labels[:seq_len]) for ids, labels in docs), seq_len, pad)


# --- stage 2 --------------------------------------------------------------------------------


def sft(config: SFTConfig) -> dict:
    """Fine-tune per ``config``; returns the metrics (the model is in ``output_dir``)."""
    from learn.builtin import corpus

    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"{config.model_dir}: the tokenizer has no chat template")
    if config.train_files:
        train = load_conversations(config.train_files)
        if config.eval_files:
            evaluation = load_conversations(config.eval_files)
        else:
            n_eval = int(len(train) * config.eval_fraction)
            evaluation, train = train[:n_eval], train[n_eval:]
    else:
        demos = corpus.demonstrations(config.builtin_conversations, seed=config.seed)
        held = corpus.demonstrations(config.builtin_eval, seed=config.seed + 1, split="heldout")
        train = [d["messages"] for d in demos]
        evaluation = [d["messages"] for d in held]
    if not train:
        raise ValueError("no training conversations")

    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32)
    rows = pack_conversations(tokenizer, train, config.seq_len)
    eval_rows = pack_conversations(tokenizer, evaluation, config.seq_len) if evaluation else None
    return train_causal_lm(model, tokenizer, rows, config, eval_rows, desc="sft")
