"""The locally trained tokenizer: lossless, digit-splitting, and its chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from learn.builtin import corpus
from learn.builtin.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus.tokenizer_texts(800), vocab_size=512)


@pytest.mark.parametrize(
    "text",
    ["What is 37 + 45?", "  spaces   and\nnewlines\t", "Ünïcödé café — 東京", "c-a-t!", ""],
)
def test_encode_decode_round_trip(tokenizer, text: str):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_every_digit_is_its_own_token(tokenizer):
    ids = tokenizer("12345 + 908", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == list("12345") + list("908")


def test_chat_template_renders_roles_and_generation_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And plus 1?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|system|>Be brief.<|end|><|user|>What is 2 + 2?<|end|><|assistant|>4<|end|>"
        "<|user|>And plus 1?<|end|><|assistant|>"
    )
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True
    )["input_ids"]
    for special in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tokenizer.convert_tokens_to_ids(special) in ids  # one token each
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"


def test_saved_tokenizer_reloads_identically(tokenizer, tmp_path: Path):
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "Spell the word garden."}]
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    sample = "How many letters are in banana? 6"
    assert loaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert loaded.eos_token_id == tokenizer.eos_token_id
