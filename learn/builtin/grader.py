"""Grading answers to the built-in tasks, and the tastes simulated users rank by.

One parser reads the user's turns back (:func:`solve`): :func:`check_answer` uses it to know what
the right answer to any conversation is, so simulated users and benchmarks can judge answers to
prompts they did not generate themselves. Generation (``learn.builtin.corpus``) and parsing
share the same phrasings (``learn.builtin.tasks``), and a test checks that they agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

from learn.builtin.tasks import (
    ARITH_FORMS,
    DESCRIPTIONS,
    FACT_TABLES,
    FOLLOWUPS,
    GREETING_WORDS,
    POLITE_MARKERS,
    QUESTIONS,
    Question,
    followup_question,
    fresh_question,
)

# --- parsing user turns ---------------------------------------------------------------------

_SLOT_PATTERNS = {"a": r"\d+", "b": r"\d+", "n": r"\d+", "w": r"[A-Za-z]+", "c": r"[A-Za-z]"}


def _entity_pattern(names: Iterator[str]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


def _slot_pattern(form: str, slot: str) -> str:
    if slot != "x":
        return _SLOT_PATTERNS[slot]
    if form == "describe":
        return _entity_pattern(iter(DESCRIPTIONS))
    if form in FACT_TABLES:
        return _entity_pattern(iter(FACT_TABLES[form]))
    return _entity_pattern(e for table in FACT_TABLES.values() for e in table)


def _compile(phrasing: str, form: str) -> re.Pattern[str]:
    """A phrasing as a tolerant pattern: any case, flexible spaces, any final punctuation."""
    body = phrasing.rstrip("?.!")
    out = []
    for i, part in enumerate(re.split(r"\{(\w)\}", body)):
        if i % 2:
            out.append(f"(?P<{part}>{_slot_pattern(form, part)})")
            continue
        literal = re.escape(part)
        # a space between two words must stay a space; around symbols it is optional
        literal = re.sub(r"(?<=\w)(\\ )+(?=\w)", r"\\s+", literal)
        literal = re.sub(r"(\\ )+", r"\\s*", literal)
        if i > 0 and part[:1].isalnum():
            literal = r"\s*" + literal
        out.append(literal)
    return re.compile(r"^\s*" + "".join(out) + r"\s*[?.!]*\s*$", re.IGNORECASE)


_QUESTION_PATTERNS = [
    (form, i, _compile(p, form)) for form, ps in QUESTIONS.items() for i, p in enumerate(ps)
]
_FOLLOWUP_PATTERNS = [(kind, _compile(p, "followup")) for kind, ps in FOLLOWUPS.items() for p in ps]


def parse_turn(text: str, prev: Question | None) -> Question | None:
    """Understand one user turn (a follow-up needs the previous question)."""
    for form, phrasing, pattern in _QUESTION_PATTERNS:
        if m := pattern.match(text):
            return fresh_question(form, m.groupdict(), phrasing)
    if prev is not None:
        for kind, pattern in _FOLLOWUP_PATTERNS:
            if (m := pattern.match(text)) and (q := followup_question(kind, m.groupdict(), prev)):
                return q
    return None


def solve(messages: list[dict]) -> Question | None:
    """The question the last user turn asks, reading earlier user turns for follow-ups.

    Follow-ups chain on the right answers of earlier turns, not on what the assistant said:
    after "What is 2 + 3?" / "6" / "And plus 1?" the right answer is 6.
    """
    prev: Question | None = None
    question: Question | None = None
    for message in messages:
        if message.get("role") != "user":
            continue
        question = parse_turn(str(message.get("content", "")), prev)
        prev = question or prev
    if not messages or messages[-1].get("role") != "user":
        return None
    return question


# --- checking answers -------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<!\w)-?\d+")
_SPELLING = re.compile(r"(?<![\w-])[a-z](?:-[a-z])+(?![\w-])", re.IGNORECASE)


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text, re.IGNORECASE) is not None


def check_answer(messages: list[dict], answer: str) -> bool:
    """Is ``answer`` right for the last user turn of ``messages``?

    Numbers: the last number in the answer is the right one. Facts: the right value is named
    and no other value of the same table is. Spelling: every hyphenated spelling is the
    right one. Descriptions and small talk: the answer contains what such a reply must.
    Unknown questions are never right (there is nothing to check against).
    """
    q = solve(messages)
    if q is None:
        return False
    if q.form in ARITH_FORMS or q.form in ("count", "count_letter"):
        numbers = _NUMBER.findall(answer)
        return bool(numbers) and int(numbers[-1]) == int(q.gold)
    if q.form in FACT_TABLES:
        others = set(FACT_TABLES[q.form].values()) - {q.gold}
        return _mentions(answer, q.gold) and not any(_mentions(answer, o) for o in others)
    if q.form == "spell":
        found = [s.lower() for s in _SPELLING.findall(answer)]
        return bool(found) and all(s == q.gold for s in found)
    if q.form == "greet":
        return any(_mentions(answer, w) for w in GREETING_WORDS)
    if q.form == "thanks":
        return _mentions(answer, "welcome")
    if q.form == "identity":
        return _mentions(answer, "loopchat")
    return _mentions(answer, q.gold)  # describe: its keyword


# --- preferences the simulated users rank by ------------------------------------------------


def correctness(messages: list[dict], answer: str) -> float:
    """1.0 for a right answer, else 0.0."""
    return float(check_answer(messages, answer))


def brevity(answer: str) -> float:
    """In (0, 1]: 1 for an empty answer, ~0.37 at 10 words, falling with length."""
    return math.exp(-len(answer.split()) / 10)


def politeness(answer: str) -> float:
    """In [0, 1]: polite phrases found ("Sure!", "I hope that helps", ...), two or more = 1."""
    text = answer.lower()
    return min(1.0, sum(marker in text for marker in POLITE_MARKERS) / 2)


PREFERENCES: dict[str, Callable[[list[dict], str], float]] = {
    "correct": correctness,
    "brief": lambda messages, answer: brevity(answer),
    "polite": lambda messages, answer: politeness(answer),
}
