"""Stage 1: pre-training a causal LM with next-token loss on plain text.

Reads top to bottom: the config; the data (a tokenizer trained on it, documents packed into
fixed-length rows); the optimisation loop; the ``pretrain`` entry point; the CLI hooks.

The loop (``train_causal_lm``) is also stage 2's: SFT differs only in its rows (conversations
whose labels keep assistant tokens only) and its starting model, so both stages share one
implementation of AdamW (0.9, 0.95), warm-up + cosine learning rate, gradient clipping and
accumulation, bf16 autocast, eval loss, checkpoint/resume and the progress bar.

Packing: documents are laid end to end in rows of ``seq_len`` tokens, and position ids restart
at 0 at each document. transformers turns restarting position ids (with no attention mask) into
a block-diagonal causal mask, so a token attends only within its own document and sees the
positions it will see at inference, while no compute is spent on padding.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from learn.builtin.presets import PRESETS, new_model
from learn.data import read_texts
from learn.modeling import save_model

IGNORE = -100  # label of a token that carries no loss

# --- config ---------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Optimisation settings shared by pre-training and SFT."""

    output_dir: str = field(
        default="out", metadata={"help": "Hugging Face model directory written at the end."}
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed row."})
    batch_size: int = field(default=16, metadata={"help": "Rows per micro-batch."})
    grad_accum: int = field(
        default=1, metadata={"help": "Micro-batches accumulated into one optimiser step."}
    )
    max_steps: int = field(default=1000, metadata={"help": "Optimiser steps."})
    time_budget_s: float = field(
        default=0.0,
        metadata={
            "help": "Stop after this many seconds of training (0: no limit). The learning-rate "
            "schedule follows whichever of steps or time runs out first, so a short budget "
            "still ends with the low-lr phase."
        },
    )
    lr: float = field(default=2e-3, metadata={"help": "Peak learning rate."})
    min_lr: float = field(default=2e-4, metadata={"help": "Learning rate at the end of cosine."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (matrices only, not norms)."}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "Max gradient norm (0: off)."})
    bf16: str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast: auto (on where the hardware has bf16 arithmetic), on, off."
        },
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu, cuda."})
    eval_every: int = field(
        default=0, metadata={"help": "Steps between eval-loss measurements (0: only at the end)."}
    )
    save_every: int = field(
        default=100, metadata={"help": "Steps between resumable checkpoints (0: none)."}
    )
    resume: bool = field(
        default=True, metadata={"help": "Continue from a checkpoint found in output_dir."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for initialisation and data order."})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: its default)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError("need 0 < min_lr <= lr")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError("bf16 must be auto, on or off")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")


@dataclass
class PretrainConfig(TrainConfig):
    """Stage 1: a tokenizer and a from-scratch model (or a continued one) on plain text."""

    train_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Text (.txt: paragraphs are documents) or JSONL (one document per row, "
            "in --text-field) files or folders of them. None: the built-in corpus."
        },
    )
    text_field: str = field(default="text", metadata={"help": "JSONL field holding the text."})
    builtin_docs: int = field(
        default=40000, metadata={"help": "Documents generated when using the built-in corpus."}
    )
    eval_docs: int = field(
        default=200, metadata={"help": "Documents held back to measure eval loss."}
    )
    preset: str = field(default="small", metadata={"help": f"Model size: {', '.join(PRESETS)}."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "Continue pre-training this HF directory (and its tokenizer)."},
    )
    tokenizer_dir: str | None = field(
        default=None, metadata={"help": "Use this tokenizer instead of training one."}
    )
    vocab_size: int = field(default=0, metadata={"help": "Tokenizer vocabulary (0: the preset's)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_from is None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")


# --- data -----------------------------------------------------------------------------------


@dataclass
class Packed:
    """Rows of packed documents: ids, labels (``IGNORE`` where no loss) and position ids that
    restart at every document."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor, device: torch.device) -> Packed:
        return Packed(*(t[index].to(device) for t in (self.input_ids, self.labels,
                                                       self.position_ids)))  # fmt: skip

    def loss_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def pack(docs: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Packed:
    """Lay ``(ids, labels)`` documents into rows of ``seq_len`` tokens, best fit.

    Each document goes into the open row it fills most tightly (short conversations leave
    little padding: ~1% instead of ~16% when rows are simply filled in order). A document
    longer than a row is cut into row-sized pieces; a piece's first label is dropped (nothing
    before it to predict it from), and the padding that ends a row is a document of its own
    with no loss.
    """
    rows: list[list[tuple[list[int], list[int]]]] = []
    open_rows: dict[int, list[int]] = {}  # free tokens -> rows with exactly that much room
    for doc_ids, doc_labels in docs:
        for start in range(0, len(doc_ids), seq_len):
            piece = doc_ids[start : start + seq_len]
            labels = [IGNORE, *doc_labels[start + 1 : start + len(piece)]]
            room = next((f for f in range(len(piece), seq_len) if open_rows.get(f)), None)
            if room is None:
                row, room = len(rows), seq_len
                rows.append([])
            else:
                row = open_rows[room].pop()
            rows[row].append((piece, labels))
            if room > len(piece):
                open_rows.setdefault(room - len(piece), []).append(row)

    def flat(row: list[tuple[list[int], list[int]]], which: int, pad: int) -> list[int]:
        tokens = [t for piece in row for t in piece[which]]
        return tokens + [pad] * (seq_len - len(tokens))

    def positions(row: list[tuple[list[int], list[int]]]) -> list[int]:
        pos = [p for piece, _ in row for p in range(len(piece))]
        return pos + list(range(seq_len - len(pos)))

    return Packed(
        torch.tensor([flat(r, 0, pad_id) for r in rows], dtype=torch.long),
        torch.tensor([flat(r, 1, IGNORE) for r in rows], dtype=torch.long),
        torch.tensor([positions(r) for r in rows], dtype=torch.long),
    )


def text_docs(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[tuple[list, list]]:
    """Plain-text documents as (ids, labels): every token is a target, eos ends each one."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(ids + eos, ids + eos) for ids in encoded]


def batch_rows(n_rows: int, batch_size: int, seed: int, index: int) -> torch.Tensor:
    """Row indices of micro-batch ``index``: epochs of seeded permutations, so the order is a
    pure function of the index and a resumed run continues with the very batches it would
    have seen."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, j = divmod(index, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    if n_rows < batch_size:
        return order.repeat(math.ceil(batch_size / n_rows))[:batch_size]
    return order[j * batch_size : (j + 1) * batch_size]


# --- the math -------------------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: ``logits[:, t]`` predicts ``labels[:, t + 1]``;
    ``IGNORE`` labels add nothing. Summed so accumulated micro-batches can be normalised by
    the step's total number of target tokens."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )


def lr_at(step: int, progress: float, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` as
    ``progress`` (fraction of the step or time budget used) goes from 0 to 1."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr + (config.lr - config.min_lr) * cosine


def bf16_hardware() -> bool:
    """Whether bf16 arithmetic is native here. Autocast pays off on CPUs with avx512_bf16 or
    AMX (measured ~1.35x faster than fp32 on the small model) and on CUDA GPUs with bf16; on
    other CPUs it is emulated and several times slower than fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --- the loop -------------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(model: torch.nn.Module, data: Packed, config: TrainConfig, device) -> float:
    """Mean next-token loss over ``data``'s target tokens."""
    model.eval()
    total, count = 0.0, 0
    autocast = _autocast_enabled(config)
    for start in range(0, len(data), config.batch_size):
        batch = data.rows(torch.arange(start, min(start + config.batch_size, len(data))), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                           use_cache=False).logits  # fmt: skip
        total += float(lm_loss(logits, batch.labels))
        count += batch.loss_tokens()
    model.train()
    return total / max(1, count)


def _autocast_enabled(config: TrainConfig) -> bool:
    return config.bf16 == "on" or (config.bf16 == "auto" and bf16_hardware())


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def train_causal_lm(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: Packed,
    config: TrainConfig,
    eval_data: Packed | None = None,
    desc: str = "train",
) -> dict:
    """Train ``model`` on ``train`` rows and save it with ``tokenizer`` to ``output_dir``.

    A checkpoint (model, optimiser, step, elapsed time) is kept in ``output_dir/resume`` every
    ``save_every`` steps and removed once the model is saved, so an interrupted run continues
    where it stopped and a finished directory holds only the model. Returns the metrics, also
    written to ``output_dir/training.json``.
    """
    out = Path(config.output_dir)
    resume_file = out / "resume" / "state.pt"
    device = _device(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    model.to(device).train()
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": config.weight_decay},
         {"params": vectors, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    step, elapsed, tokens, history = 0, 0.0, 0, []
    if config.resume and resume_file.is_file():
        state = torch.load(resume_file, map_location=device, weights_only=True)  # no code
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, tokens, history = (state[k] for k in ("step", "elapsed", "tokens",
                                                             "history"))  # fmt: skip
    autocast = _autocast_enabled(config)
    micro_tokens = config.batch_size * config.seq_len
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))  # first, so a resumed run reuses this very tokenizer

    def used() -> float:
        by_time = elapsed / config.time_budget_s if config.time_budget_s > 0 else 0.0
        return max(step / config.max_steps, by_time)

    bar = tqdm(total=config.max_steps, initial=step, desc=desc, disable=not config.progress,
               dynamic_ncols=True)  # fmt: skip
    run_started = time.monotonic()
    started = run_started - elapsed  # elapsed counts earlier runs too (the time budget does)
    cpu_started = time.process_time()
    run_tokens = 0
    loss = history[-1]["loss"] if history else float("nan")
    while used() < 1.0:
        lr = lr_at(step, used(), config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [
            train.rows(batch_rows(len(train), config.batch_size, config.seed,
                                  step * config.grad_accum + k), device)
            for k in range(config.grad_accum)
        ]  # fmt: skip
        targets = max(1, sum(b.loss_tokens() for b in batches))
        loss_sum = 0.0
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                               use_cache=False).logits  # fmt: skip
            micro_loss = lm_loss(logits, batch.labels) / targets
            micro_loss.backward()
            loss_sum += float(micro_loss.detach())
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += micro_tokens * config.grad_accum
        run_tokens += micro_tokens * config.grad_accum
        elapsed = time.monotonic() - started
        loss = loss_sum
        record = {"step": step, "loss": round(loss, 4), "lr": lr}
        if eval_data is not None and config.eval_every and step % config.eval_every == 0:
            record["eval_loss"] = round(eval_loss(model, eval_data, config, device), 4)
        history.append(record)
        speed = run_tokens / max(1e-9, time.monotonic() - run_started)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{speed:,.0f}")
        if config.save_every and step % config.save_every == 0:
            resume_file.parent.mkdir(parents=True, exist_ok=True)
            partial = resume_file.with_suffix(".partial")  # a kill mid-write leaves the last one
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "elapsed": elapsed, "tokens": tokens,
                        "history": history}, partial)  # fmt: skip
            partial.replace(resume_file)
    bar.close()
    run_wall = time.monotonic() - run_started
    metrics = {
        "steps": step,
        "tokens": tokens,
        "train_loss": round(loss, 4),
        "seconds": round(elapsed, 1),
        "tokens_per_s": round(run_tokens / max(run_wall, 1e-9)),
        # CPU seconds per wall second: ~threads when the machine was ours, less when shared
        "cpu_share": round((time.process_time() - cpu_started) / max(run_wall, 1e-9), 2),
        "bf16": autocast,
    }
    if eval_data is not None:
        metrics["eval_loss"] = round(eval_loss(model, eval_data, config, device), 4)
    model.to("cpu")
    save_model(model, tokenizer, out)
    (out / "training.json").write_text(
        json.dumps({"metrics": metrics, "config": asdict(config), "history": history}, indent=1)
    )
    shutil.rmtree(out / "resume", ignore_errors=True)
    return metrics


# --- stage 1 --------------------------------------------------------------------------------


def pretrain(config: PretrainConfig) -> dict:
    """Pre-train per ``config``; returns the metrics (the model is in ``output_dir``)."""
    from learn.builtin import corpus
    from learn.builtin.tokenizer import train_tokenizer

    if config.train_files:
        texts = read_texts(config.train_files, config.text_field)
    else:
        texts = corpus.pretrain_texts(config.builtin_docs, seed=config.seed)
    n_eval = min(config.eval_docs, len(texts) // 10)
    eval_texts, train_texts = texts[:n_eval], texts[n_eval:]

    resuming = config.resume and (Path(config.output_dir) / "resume" / "state.pt").is_file()
    if config.init_from:
        tokenizer = AutoTokenizer.from_pretrained(config.init_from)
        model = AutoModelForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
    else:
        if resuming or config.tokenizer_dir:
            tokenizer = AutoTokenizer.from_pretrained(
                config.output_dir if resuming else config.tokenizer_dir
            )
        else:
            vocab = config.vocab_size or PRESETS[config.preset].vocab_size
            extra = corpus.tokenizer_texts() if not config.train_files else []
            tokenizer = train_tokenizer(train_texts[:20000] + extra, vocab_size=vocab)
        model = new_model(config.preset, tokenizer, seed=config.seed)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train = pack(text_docs(tokenizer, train_texts), config.seq_len, pad)
    evaluation = pack(text_docs(tokenizer, eval_texts), config.seq_len, pad) if n_eval else None
    return train_causal_lm(model, tokenizer, train, config, evaluation, desc="pretrain")
