"""Stage 2: the assistant-only loss mask, an SFT run that overfits and reproduces its
conversations greedily, and an output directory that transformers and vLLM both serve."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn.pretrain import IGNORE
from learn.sft import SFTConfig, assistant_masks, conversation_docs, sft

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42."},
        {"role": "user", "content": "And plus 5?"},
        {"role": "assistant", "content": "47"},
    ],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ],
    [
        {"role": "user", "content": "how many letters in word yes"},
        {"role": "assistant", "content": "yes has 3 letters."},
        {"role": "user", "content": "and no"},
        {"role": "assistant", "content": "no has 2 letters."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_assistant_mask_is_exact_on_a_multi_turn_conversation(tokenizer):
    messages = CONVERSATIONS[0] + CONVERSATIONS[2]  # system, 4 user and 4 assistant turns
    [(ids, mask)] = assistant_masks(tokenizer, [messages])
    assert len(ids) == len(mask)
    kept = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    dropped = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert kept == "".join(a + "<|end|>" for a in answers)
    prompts = [f"<|{m['role']}|>{m['content']}<|end|>" if m["role"] != "assistant"
               else "<|assistant|>" for m in messages]  # fmt: skip
    assert dropped == "".join(prompts)
    runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    assert runs == len(answers)


def test_templates_without_generation_markers_give_the_same_mask(tokenizer):
    """Hub models' templates rarely mark assistant text; the prefix-difference path must agree
    with the marked one."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    assert assistant_masks(plain, CONVERSATIONS) == assistant_masks(tokenizer, CONVERSATIONS)


def test_labels_keep_assistant_tokens_only(tokenizer):
    [(ids, labels)] = conversation_docs(tokenizer, [CONVERSATIONS[1]])
    kept = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(kept) == "Hello! How can I help?<|end|>"
    assert len(ids) == len(labels)


def _greedy(model, tokenizer, messages: list[dict], max_new_tokens: int = 24) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]  # fmt: skip
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _turns(conversation: list[dict]) -> list[tuple[list[dict], str]]:
    return [(conversation[:i], m["content"]) for i, m in enumerate(conversation)
            if m["role"] == "assistant"]  # fmt: skip


@pytest.fixture(scope="module")
def overfit_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SFT of the random nano model on three conversations from a JSONL file, until memorised."""
    work = tmp_path_factory.mktemp("sft")
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    config = SFTConfig(model_dir=str(tiny_model), output_dir=str(work / "out"),
                       train_files=[str(data)], eval_files=[str(data)], max_steps=80,
                       batch_size=2, seq_len=64, lr=5e-3, min_lr=5e-4, warmup_steps=5,
                       save_every=0, progress=False)  # fmt: skip
    sft(config)
    return work / "out"


@pytest.mark.slow
def test_sft_overfits_and_reproduces_its_conversations(overfit_dir: Path):
    training = json.loads((overfit_dir / "training.json").read_text())
    assert training["metrics"]["eval_loss"] < 0.1
    assert training["history"][0]["loss"] > 2.0
    model = AutoModelForCausalLM.from_pretrained(str(overfit_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(overfit_dir))
    for conversation in CONVERSATIONS:
        for prompt, answer in _turns(conversation):
            assert _greedy(model, tokenizer, prompt) == answer


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    llm = LLM(model=model_dir, enforce_eager=True, kv_cache_memory_bytes=32 << 20,
              max_model_len=256, dtype="float32", seed=0)
    outputs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=24))
    print("RESULT " + json.dumps([o.outputs[0].text for o in outputs]))
    """
)


@pytest.mark.slow
def test_sft_output_is_served_by_vllm_as_it_is(overfit_dir: Path, tmp_path: Path):
    turns = [t for c in CONVERSATIONS for t in _turns(c)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(tmp_path / "vllm"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(overfit_dir), json.dumps([p for p, _ in turns])],
        capture_output=True, text=True, timeout=540, env=env,
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    assert json.loads(lines[0][len("RESULT ") :]) == [answer for _, answer in turns]


def test_cli_rejects_conversations_without_answers(tiny_model: Path, tmp_path: Path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "serve.cli", "train", "sft", "--model-dir", str(tiny_model),
         "--train-files", str(data), "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2
    assert "no assistant message" in run.stderr and "Traceback" not in run.stderr
    missing_model = subprocess.run(
        [sys.executable, "-m", "serve.cli", "train", "sft", "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing_model.returncode == 2 and "model_dir" in missing_model.stderr
