"""The built-in synthetic corpus: conversations, demonstrations, pre-training text and the
held-out prompts benchmarks and simulated users ask, all generated from ``learn.builtin.tasks``.

loopchat must make its own model offline, and its learning loop needs users whose rankings carry
signal. Both come from here. Training text and demonstrations use only ``train`` keys; the
prompts of ``prompts(split="heldout")`` are new to the model.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from learn.builtin.tasks import (
    ARITH_FORMS,
    DESCRIPTIONS,
    FACT_TABLES,
    FOLLOWUPS,
    POLITE_CLOSINGS,
    POLITE_OPENINGS,
    QUESTIONS,
    REPLIES,
    STYLES,
    SYSTEM_PROMPTS,
    WORD_FORMS,
    WORDS,
    Question,
    followup_question,
    fresh_question,
    split_of,
)

# --- generating conversations ---------------------------------------------------------------

# How often each fresh task starts an exchange: arithmetic-heavy, since it is what the small
# model finds hardest and what the follow-ups build on.
FORM_WEIGHTS = {
    "add": 36, "sub": 16, "diff": 7, "mul": 10, "capital": 5, "colour": 3, "sound": 3,
    "spell": 2, "count": 3, "count_letter": 1, "describe": 2, "identity": 1,
}  # fmt: skip
FOLLOWUP_PROBABILITY = {"arith": 0.5, "fact": 0.3, "word": 0.25}
STYLE_WEIGHTS = (0.3, 0.35, 0.25, 0.1)


def reply(q: Question, style: str, rng: random.Random) -> str:
    """The assistant's answer to ``q`` in ``style``."""
    bodies = REPLIES[q.form]
    if style == "polite" and "polite" not in bodies:
        body = rng.choice(bodies["plain"]).format(**q.fields)
        return rng.choice(POLITE_OPENINGS) + body + rng.choice(POLITE_CLOSINGS)
    return rng.choice(bodies[style]).format(**q.fields)


def _sample_fresh(form: str, rng: random.Random) -> tuple[str, Question]:
    i = rng.randrange(len(QUESTIONS[form]))
    slots: dict[str, str] = {}
    if form in ("add", "sub", "diff"):
        a = rng.randrange(100)
        b = rng.randrange(100) if form == "add" else rng.randrange(a + 1)
        slots = {"a": str(a), "b": str(b)}
    elif form == "mul":
        slots = {"a": str(rng.randrange(13)), "b": str(rng.randrange(13))}
    elif form in FACT_TABLES or form == "describe":
        table = FACT_TABLES.get(form, DESCRIPTIONS)
        slots = {"x": rng.choice(list(table))}
    elif form in WORD_FORMS:
        word = rng.choice(WORDS)
        slots = {"w": word, "c": rng.choice(word)}
    text = QUESTIONS[form][i].format(**slots)
    return text, fresh_question(form, slots, i)


def _sample_followup(prev: Question, rng: random.Random) -> tuple[str, Question] | None:
    if prev.form in ARITH_FORMS:
        value = int(prev.gold)
        kinds = ["add", "add", "sub"] + (["double", "mul"] if value <= 50 else [])
        kind = rng.choice(kinds) if value > 0 else "add"
        n = {"add": rng.randint(1, 20), "sub": rng.randint(1, max(1, min(value, 20))),
             "mul": rng.randint(2, 3), "double": 2}[kind]  # fmt: skip
        slots = {"n": str(n)}
    elif prev.form in FACT_TABLES:
        kind = "entity"
        others = [e for e in FACT_TABLES[prev.form] if e != prev.fields["x"]]
        slots = {"x": rng.choice(others)}
    elif prev.form in WORD_FORMS:
        kind = "word"
        candidates = [w for w in WORDS if not prev.fields["c"] or prev.fields["c"] in w]
        slots = {"w": rng.choice(candidates)}
    else:
        return None
    text = rng.choice(FOLLOWUPS[kind]).format(**slots)
    q = followup_question(kind, slots, prev)
    return (text, q) if q is not None else None


def _followup_chance(q: Question) -> float:
    if q.form in ARITH_FORMS:
        return FOLLOWUP_PROBABILITY["arith"]
    if q.form in FACT_TABLES:
        return FOLLOWUP_PROBABILITY["fact"]
    return FOLLOWUP_PROBABILITY["word"] if q.form in WORD_FORMS else 0.0


def _in_split(sample: Callable[[], tuple[str, Question] | None], split: str, tries: int = 500):
    """Draw from ``sample`` until the question falls in ``split`` (None if it never does);
    small talk (no key) belongs to both splits."""
    for _ in range(tries):
        drawn = sample()
        if drawn is not None and (drawn[1].key is None or split_of(drawn[1].key) == split):
            return drawn
    return None


def conversation(rng: random.Random, split: str = "train") -> list[dict]:
    """One demonstration: optional system prompt and greeting, one or two tasks, each maybe
    followed by follow-ups, maybe a thank-you; written in one style throughout."""
    style = rng.choices(STYLES, weights=STYLE_WEIGHTS)[0]
    messages: list[dict] = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})

    def exchange(text: str, q: Question) -> None:
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": reply(q, style, rng)})

    if rng.random() < 0.12:
        exchange(*_sample_fresh("greet", rng))
    for _ in range(rng.choice((1, 1, 2))):
        form = rng.choices(list(FORM_WEIGHTS), weights=list(FORM_WEIGHTS.values()))[0]
        drawn = _in_split(lambda f=form: _sample_fresh(f, rng), split)
        while drawn is not None:
            exchange(*drawn)
            prev = drawn[1]
            if rng.random() >= _followup_chance(prev):
                break
            drawn = _in_split(lambda p=prev: _sample_followup(p, rng), split)
    if rng.random() < 0.08:
        exchange(*_sample_fresh("thanks", rng))
    return messages


def demonstrations(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` conversations in the OpenAI fine-tuning format ``{"messages": [...]}``."""
    rng = random.Random(seed)
    return [{"messages": conversation(rng, split)} for _ in range(n)]


def pretrain_texts(n: int, seed: int = 0) -> list[str]:
    """Plain text for pre-training: documents of questions each followed by an answer, all
    from the training split (no chat template, no roles)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for message in conversation(rng, "train"):
            if message["role"] != "system":
                lines.append(message["content"])
        docs.append("\n".join(lines))
    return docs


BENCH_TASKS = ("add", "sub", "mul", "fact", "followup_math", "followup_fact", "spell",
               "count", "followup_word", "describe", "chat")  # fmt: skip
_TASK_FORMS = {
    "add": ("add",), "sub": ("sub", "diff"), "mul": ("mul",),
    "fact": ("capital", "colour", "sound"), "spell": ("spell",),
    "count": ("count", "count_letter"), "describe": ("describe",),
    "chat": ("greet", "thanks", "identity"),
    "followup_math": ("add", "sub", "mul"), "followup_fact": ("capital", "colour", "sound"),
    "followup_word": ("spell", "count"),
}  # fmt: skip


def prompts(
    n_per_task: int, seed: int = 0, split: str = "heldout", tasks: tuple[str, ...] = BENCH_TASKS
) -> list[tuple[str, list[dict]]]:
    """Prompts ending in a user turn whose question is in ``split``, about ``n_per_task`` per
    task, as ``(task, messages)``.

    A follow-up prompt carries its earlier exchange (a training question) with a right (plain)
    answer in context, so it measures using the earlier turns on a held-out question.
    """
    rng = random.Random(seed)
    out = []
    for task in tasks:
        for _ in range(n_per_task):
            form = rng.choice(_TASK_FORMS[task])
            context: list[dict] = []
            if task.startswith("followup"):
                base = _in_split(lambda f=form: _sample_fresh(f, rng), "train")
                drawn = base and _in_split(lambda b=base[1]: _sample_followup(b, rng), split)
                if base:
                    context = [
                        {"role": "user", "content": base[0]},
                        {"role": "assistant", "content": reply(base[1], "plain", rng)},
                    ]
            else:
                drawn = _in_split(lambda f=form: _sample_fresh(f, rng), split)
            if drawn:
                out.append((task, [*context, {"role": "user", "content": drawn[0]}]))
    return out


def tokenizer_texts(n: int = 4000, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: demonstrations and small talk, every phrasing."""
    texts = [m["content"] for d in demonstrations(n, seed) for m in d["messages"]]
    texts += [p for ps in QUESTIONS.values() for p in ps]
    return texts
