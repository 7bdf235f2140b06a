"""A synthetic preference small enough for a nano model: users like answers with more "yes".

Answers are six words, each "yes" or "no"; a user ranks the K answers of a prompt by how many
"yes" they contain (equal counts tied). A policy fine-tuned to answer in that format (a few
seconds of SFT here) starts at about half "yes"; the reward model learns the preference from
rankings and PPO should move the policy toward "yes" while the KL penalty holds it near SFT.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn.builtin.presets import new_model
from learn.builtin.tokenizer import train_tokenizer
from learn.modeling import save_model
from learn.reward import RewardConfig, load_reward_model, score, train_reward_model
from learn.tokens import answer_logprobs, encode_answer

WORDS = ("yes", "no")
ANSWER_WORDS = 6
PROMPTS = [
    "Say yes or no.",
    "Yes or no?",
    "Answer with yes or no.",
    "Tell me yes or no, please.",
    "Do you agree? Yes or no.",
    "Is it true? Say yes or no.",
    "Reply yes or no.",
    "Yes, or no?",
]


def prompt_messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def random_answer(rng: random.Random, p_yes: float = 0.5) -> str:
    return " ".join("yes" if rng.random() < p_yes else "no" for _ in range(ANSWER_WORDS))


def yes_count(answer: str) -> int:
    return answer.split().count("yes")


def rank_by_yes(candidates: list[str]) -> list[list[int]]:
    """Best to worst by the number of "yes"; equal counts form a tie group."""
    counts = sorted({yes_count(c) for c in candidates}, reverse=True)
    return [[i for i, c in enumerate(candidates) if yes_count(c) == n] for n in counts]


def preference_events(count: int, k: int = 4, seed: int = 0) -> list[dict]:
    """Feedback events (brief contract 1) of a user who prefers more "yes"."""
    rng = random.Random(seed)
    events = []
    for i in range(count):
        candidates = [random_answer(rng, p_yes=rng.random()) for _ in range(k)]
        events.append({
            "id": uuid.UUID(int=rng.getrandbits(128)).hex,
            "completion_id": f"chatcmpl-{i}",
            "messages": prompt_messages(rng.randrange(len(PROMPTS))),
            "candidates": candidates,
            "ranking": rank_by_yes(candidates),
            "all_bad": False,
            "user": "tester",
            "comment": None,
            "version": "v1",
            "time": time.time(),
        })  # fmt: skip
    return events


def yes_no_tokenizer():
    texts = [*PROMPTS, *(f"{a} {b} {a} {b}" for a in WORDS for b in WORDS)]
    return train_tokenizer(texts * 4, vocab_size=300)


def sft_yes_no_policy(out_dir: Path, steps: int = 150, seed: int = 0) -> Path:
    """A nano Llama fine-tuned (loss on assistant tokens) to answer six random yes/no words."""
    tokenizer = yes_no_tokenizer()
    model = new_model("nano", tokenizer, seed=seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        conversations = [
            [*prompt_messages(rng.randrange(len(PROMPTS))),
             {"role": "assistant", "content": random_answer(rng)}]
            for _ in range(16)
        ]  # fmt: skip
        batch = tokenizer.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_tensors="pt", padding=True,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        labels = batch["input_ids"].masked_fill(batch["assistant_masks"] == 0, -100)
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_model(model.eval(), tokenizer, out_dir)


@torch.no_grad()
def sample_answers(model_dir: Path, n: int, max_new_tokens: int = 16, seed: int = 1) -> list[str]:
    """Fresh answers of the policy in ``model_dir`` to the prompts, decoded."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    answers = []
    for i in range(len(PROMPTS)):
        ids = tokenizer.apply_chat_template(
            prompt_messages(i), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        out = model.generate(
            ids, do_sample=True, num_return_sequences=n // len(PROMPTS),
            max_new_tokens=max_new_tokens, top_k=0, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        answers += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return answers


def cached_dir(base: Path, name: str, build: Callable[[Path], object]) -> Path:
    """``build(path)`` once per test session, so test modules share the models they need."""
    path = base / name
    if not (path / "config.json").exists():
        build(path)
    return path


def shared_sft_policy(base: Path) -> Path:
    return cached_dir(base, "yes-no-sft", sft_yes_no_policy)


REWARD_CONFIG = RewardConfig(learning_rate=1e-3, epochs=2)


def shared_reward_model(base: Path) -> Path:
    """A reward model that learned the "more yes" preference from 160 rankings."""
    sft = shared_sft_policy(base)
    return cached_dir(
        base,
        "yes-no-rm",
        lambda out: train_reward_model(preference_events(160), sft, out, REWARD_CONFIG),
    )


def loopchat(*args: str) -> subprocess.CompletedProcess:
    """The installed ``loopchat`` command, as a user runs it."""
    command = [str(Path(sys.executable).parent / "loopchat"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def answer_messages(answers: list[str]) -> list[list[dict[str, str]]]:
    """The prompt each answer was sampled for (answers grouped prompt by prompt, as the
    learners' tests sample them: the same number for each of ``PROMPTS``)."""
    per_prompt = len(answers) // len(PROMPTS)
    return [prompt_messages(i // per_prompt) for i in range(len(answers))]


def mean_score(rm_dir: Path, answers: list[str]) -> float:
    """The reward model's mean normalised score of ``answers`` to their prompts."""
    rm, tokenizer = load_reward_model(rm_dir), AutoTokenizer.from_pretrained(rm_dir)
    return score(rm, tokenizer, answer_messages(answers), answers).mean().item()


@torch.no_grad()
def sequence_kl(policy_dir: Path, ref_dir: Path, answers: list[str]) -> float:
    """Monte-Carlo KL(π‖π_ref) per answer, nats: mean over π's samples of Σ log π − log π_ref."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    encoded = [
        encode_answer(tokenizer, messages, answer, 512)
        for messages, answer in zip(answer_messages(answers), answers, strict=True)
    ]
    policy, ref = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (policy_dir, ref_dir))
    pad = tokenizer.pad_token_id
    return (
        (answer_logprobs(policy, encoded, pad) - answer_logprobs(ref, encoded, pad)).mean().item()
    )


def assert_learned_the_preference(sft: Path, rm: Path, out: Path, kl_bound: float) -> None:
    """Fresh samples of the trained policy ``out`` score higher than the SFT policy's, say
    "yes" more (the preference itself, not only the reward model's view of it), and stay
    within ``kl_bound`` nats of the SFT policy."""
    before, after = sample_answers(sft, 64), sample_answers(out, 64)
    assert mean_score(rm, after) > mean_score(rm, before) + 0.3
    assert sum(map(yes_count, after)) > sum(map(yes_count, before))
    assert 0.0 <= sequence_kl(out, sft, after) <= kl_bound
