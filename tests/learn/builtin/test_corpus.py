"""The built-in corpus: generation and answer checking agree, the split holds, answers vary."""

from __future__ import annotations

import random

import pytest

from learn.builtin import corpus, grader, tasks
from learn.builtin.grader import check_answer, solve


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_every_generated_answer_is_judged_right_by_check_answer():
    """Generator and parser share the phrasings: each demonstration turn parses back to a
    question and its written answer checks as right, in every style and follow-up chain."""
    seen_tasks = set()
    for demo in corpus.demonstrations(1500, seed=3):
        messages = demo["messages"]
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                question = solve(messages[:i])
                assert question is not None, messages[:i]
                assert check_answer(messages[:i], message["content"]), messages[: i + 1]
                seen_tasks.add(question.task)
    assert seen_tasks == set(corpus.BENCH_TASKS)


def test_follow_ups_are_answered_from_the_earlier_turns():
    chat = [user("What is 12 + 30?"), assistant("12 + 30 = 42."), user("And plus 5?")]
    assert check_answer(chat, "47")
    assert check_answer(chat, "Sure! 42 + 5 = 47.")
    assert not check_answer(chat, "5")
    chain = chat + [assistant("47"), user("Now double it."), assistant("94"), user("Take away 4.")]
    assert check_answer(chain, "94 - 4 = 90.")
    # the right answer follows the true values, not a wrong earlier answer
    wrong_context = [user("What is 2 + 3?"), assistant("6"), user("And plus 1?")]
    assert solve(wrong_context).gold == "6"
    facts = [user("What is the capital of France?"), assistant("Paris."), user("And Italy?")]
    assert check_answer(facts, "The capital of Italy is Rome.")
    assert not check_answer(facts, "Paris")
    words = [user("How many letters are in apple?"), assistant("5"), user("What about banana?")]
    assert check_answer(words, "banana has 6 letters.")
    assert solve([user("And plus 5?")]) is None  # nothing earlier to follow


@pytest.mark.parametrize(
    ("question", "answer", "right"),
    [
        ("What is 7 + 8?", "15", True),
        ("what's 7+8", "7 + 8 = 15.", True),
        ("What is 7 + 8?", "It is 15 or maybe 16", False),
        ("What is 3 - 9?", "3 - 9 = -6.", True),
        ("What is the difference between 3 and 9?", "They are 6 apart.", True),
        ("Multiply 6 by 7.", "6 * 7 = 42.", True),
        ("What is the capital of Japan?", "tokyo", True),
        ("What is the capital of Japan?", "Tokyo or Beijing", False),
        ("What sound does a donkey make?", "A donkey goes hee-haw.", True),
        ("What colour is snow?", "Snow is white.", True),
        ("What colour is snow?", "Snow is blue.", False),
        ("Spell the word garden.", "garden is spelled g-a-r-d-e-n.", True),
        ("Spell the word garden.", "g-a-r-d-e-m", False),
        ("How many times does the letter p appear in apple?", "2", True),
        ("Describe the moon.", "The moon orbits the Earth.", True),
        ("Describe the moon.", "It is round.", False),
        ("Hello!", "Hi! How can I help?", True),
        ("Who are you?", "I am loopchat.", True),
        ("Write me a poem about the sea.", "The sea is blue.", False),  # unknown: never right
    ],
)
def test_check_answer_rules(question: str, answer: str, right: bool):
    assert check_answer([user(question)], answer) is right


def test_training_data_never_contains_a_held_out_question():
    held_out = corpus.prompts(30, seed=1, split="heldout")
    held_keys = {solve(messages).key for _, messages in held_out}
    assert all(tasks.split_of(key) == "heldout" for key in held_keys if key is not None)
    training_keys = set()
    for demo in corpus.demonstrations(3000, seed=0):
        messages = demo["messages"]
        for i, message in enumerate(messages):
            if message["role"] == "user":
                training_keys.add(solve(messages[: i + 1]).key)
    assert not (held_keys - {None}) & training_keys
    assert tasks.split_of(("add", 37, 45)) == tasks.split_of(("add", 37, 45))  # stable


def test_prompts_cover_every_task_and_end_with_a_user_turn():
    prompts = corpus.prompts(5, seed=2)
    assert {task for task, _ in prompts} == set(corpus.BENCH_TASKS)
    for task, messages in prompts:
        assert messages[-1]["role"] == "user"
        assert solve(messages).task == task


def test_answers_differ_in_length_and_politeness_so_rankings_carry_signal():
    question = solve([user("What is 21 + 21?")])
    rng = random.Random(0)
    replies = {style: corpus.reply(question, style, rng) for style in tasks.STYLES}
    brevity = {s: grader.brevity(r) for s, r in replies.items()}
    politeness = {s: grader.politeness(r) for s, r in replies.items()}
    assert brevity["brief"] > brevity["plain"] > brevity["verbose"]
    assert politeness["polite"] > politeness["brief"] == 0
    assert all(check_answer([user("What is 21 + 21?")], r) for r in replies.values())
    assert grader.PREFERENCES["correct"]([user("What is 21 + 21?")], "43") == 0.0


def test_pretraining_text_is_plain_questions_and_answers():
    docs = corpus.pretrain_texts(50, seed=0)
    assert len(docs) == 50
    assert not any("<|" in doc for doc in docs)
    assert any("=" in doc or " is " in doc for doc in docs)
