"""``loopchat bench model``: how often a model answers the built-in tasks exactly right.

Greedy answers (transformers ``generate``, batched) to the corpus's held-out prompts, judged by
``grader.check_answer``: the share right per task (sums, differences, products, facts, follow-ups
on numbers, facts and words, spelling, counting, descriptions, small talk). Written as
``<out>/model.json`` with a few wrong answers per task, and a bar plot ``<out>/model.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn.builtin import corpus, grader


@torch.no_grad()
def greedy_answers(
    model_dir: str | Path,
    prompts: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> list[str]:
    """The model's greedy answer to each prompt (left-padded batches)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]  # fmt: skip
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)  # fmt: skip
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        new = out[:, batch["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return [a.strip() for a in answers]


def evaluate_model(
    model_dir: str | Path, n_per_task: int = 50, seed: int = 0, split: str = "heldout"
) -> dict:
    """Accuracy per task of greedy answers on ``split`` prompts, with wrong examples."""
    started = time.monotonic()
    prompts = corpus.prompts(n_per_task, seed=seed, split=split)
    answers = greedy_answers(model_dir, [messages for _, messages in prompts])
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    wrong: dict[str, list[dict]] = {}
    for (task, messages), answer in zip(prompts, answers, strict=True):
        total[task] = total.get(task, 0) + 1
        if grader.check_answer(messages, answer):
            right[task] = right.get(task, 0) + 1
        elif len(wrong.setdefault(task, [])) < 3:
            wrong[task].append({"prompt": messages, "answer": answer,
                                "expected": grader.solve(messages).gold})  # fmt: skip
    accuracy = {task: round(right.get(task, 0) / n, 4) for task, n in total.items()}
    return {
        "model": str(model_dir),
        "split": split,
        "prompts": len(prompts),
        "accuracy": accuracy,
        "overall": round(sum(right.values()) / max(1, len(prompts)), 4),
        "counts": total,
        "wrong_examples": wrong,
        "seconds": round(time.monotonic() - started, 1),
    }


# --- `loopchat bench model` -----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Model directory (default: the built-in model)."
    )
    parser.add_argument("--per-task", type=int, default=50, help="Prompts per task.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompt sample.")
    parser.add_argument("--split", choices=["heldout", "train"], default="heldout",
                        help="Held-out prompts (default) or training ones.")  # fmt: skip
    parser.add_argument("--out", default="results", help="Folder for model.json and model.png.")


def run(args: argparse.Namespace) -> int:
    from learn.bench.common import figure, model_dir, save_figure, write_result
    from learn.errors import LearnError

    if args.per_task < 1:
        raise LearnError("--per-task must be at least 1")
    path = model_dir(args.model)
    result = evaluate_model(path, args.per_task, args.seed, args.split)
    builtin = path / "builtin.json"
    if builtin.is_file():  # how the built-in model was made, next to how good it is
        import json

        result["builtin"] = json.loads(builtin.read_text())
    written = write_result(args.out, "model", result)
    fig, axes = figure(1, 1, width=9, height=4)
    ax = axes[0][0]
    tasks = list(result["accuracy"])
    ax.bar(tasks, [100 * result["accuracy"][t] for t in tasks], color="tab:blue")
    ax.axhline(80, color="tab:red", linestyle="--", linewidth=1, label="target 80%")
    ax.set_ylabel(f"% exactly right (greedy, {args.split})")
    ax.set_ylim(0, 100)
    ax.set_title(f"{path.name}: overall {100 * result['overall']:.1f}%")
    ax.tick_params(axis="x", rotation=35)
    ax.legend(loc="lower left")
    plot = save_figure(fig, args.out, "model")
    for task in tasks:
        print(f"{task:<15} {100 * result['accuracy'][task]:5.1f}%  ({result['counts'][task]})")
    print(f"{'overall':<15} {100 * result['overall']:5.1f}%")
    print(f"wrote {written} and {plot}")
    return 0
