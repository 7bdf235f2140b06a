"""Stage 1: the loss and schedule math, packing, a nano run whose loss falls, resume, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn.pretrain import (
    IGNORE,
    PretrainConfig,
    TrainConfig,
    lm_loss,
    lr_at,
    pack,
    pretrain,
)


def test_lm_loss_sums_next_token_cross_entropy_over_kept_labels():
    vocab = 4
    logits = torch.zeros(1, 3, vocab)  # uniform: every target costs log(4)
    logits[0, 1, 2] = 10.0  # position 1 predicts token 2 almost surely
    labels = torch.tensor([[IGNORE, 1, 2]])  # targets: position 0 -> 1, position 1 -> 2
    expected = math.log(vocab) + (-torch.log_softmax(logits[0, 1], -1)[2]).item()
    assert lm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    labels[0, 2] = IGNORE
    assert lm_loss(logits, labels).item() == pytest.approx(math.log(vocab), rel=1e-5)


def test_lr_warms_up_linearly_then_follows_cosine_to_min_lr():
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert lr_at(0, 0.0, config) == pytest.approx(1e-4)
    assert lr_at(9, 0.09, config) == pytest.approx(1e-3)
    assert lr_at(10, 0.0, config) == pytest.approx(1e-3)
    assert lr_at(50, 0.5, config) == pytest.approx(0.55e-3)
    assert lr_at(100, 1.0, config) == pytest.approx(1e-4)


def test_pack_keeps_documents_whole_and_restarts_positions():
    docs = [([1, 2, 3], [1, 2, 3]), ([4, 5], [IGNORE, 5]), ([6, 7, 8, 9, 10, 11], [6] * 6)]
    packed = pack(docs, seq_len=5, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 0, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    # a document's (or piece's) first token has nothing before it to be predicted from
    assert packed.labels.tolist() == [
        [IGNORE, 2, 3, IGNORE, 5],
        [IGNORE, 6, 6, 6, 6],
        [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE],
    ]


def test_packed_documents_attend_only_within_themselves(tiny_model: Path):
    """Restarting position ids give a block-diagonal mask: a document's logits are the same
    packed behind another one as alone."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    first, second = [5, 9, 13, 21, 7], [30, 8, 12]
    packed = pack([(first, first), (second, second)], seq_len=8, pad_id=0)
    with torch.no_grad():
        together = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                         use_cache=False).logits[0, 5:8]  # fmt: skip
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
    assert torch.allclose(together, alone, atol=1e-5)


def _nano_config(out: Path, **overrides) -> PretrainConfig:
    settings = dict(output_dir=str(out), preset="nano", builtin_docs=400, eval_docs=40,
                    max_steps=30, batch_size=8, seq_len=64, lr=3e-3, min_lr=3e-4,
                    warmup_steps=5, save_every=0, progress=False)  # fmt: skip
    return PretrainConfig(**{**settings, **overrides})


@pytest.mark.slow
def test_nano_pretraining_loss_falls_and_the_output_loads(tmp_path: Path):
    metrics = pretrain(_nano_config(tmp_path / "out"))
    history = json.loads((tmp_path / "out" / "training.json").read_text())["history"]
    assert len(history) == metrics["steps"] == 30
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-3:]) / 3
    assert first > math.log(400)  # starts near uniform over the vocabulary
    assert last < first - 1.5
    assert metrics["eval_loss"] < first - 1.5
    assert not (tmp_path / "out" / "resume").exists()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.cli", "train", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.slow
def test_interrupted_pretraining_resumes_where_it_stopped(tmp_path: Path):
    reference = pretrain(_nano_config(tmp_path / "whole", max_steps=16))
    out = tmp_path / "resumed"
    flags = ["pretrain", "--output-dir", str(out), "--preset", "nano", "--builtin-docs", "400",
             "--eval-docs", "40", "--max-steps", "16", "--batch-size", "8", "--seq-len", "64",
             "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "5", "--save-every", "4",
             "--no-progress"]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "serve.cli", "train", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    state = out / "resume" / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert state.exists(), "the run ended before its first checkpoint"
    interrupted_at = torch.load(state, weights_only=True)["step"]
    assert 4 <= interrupted_at < 16

    resumed = pretrain(_nano_config(out, max_steps=16))
    history = json.loads((out / "training.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 17))
    # same data order and state: the resumed run ends where the uninterrupted one did
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], abs=1e-3)
    assert resumed["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-3)


class _Payload:
    """Unpickling this runs code: it creates the file named ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resuming_never_unpickles_code_from_the_checkpoint(tmp_path: Path, tiny_model: Path):
    """A resume file from shared storage is data, not a program: torch.load(weights_only)."""
    out, marker = tmp_path / "out", tmp_path / "code-ran"
    (out / "resume").mkdir(parents=True)
    torch.save({"model": {}, "step": 1, "payload": _Payload(marker)}, out / "resume" / "state.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        pretrain(_nano_config(out, max_steps=2, init_from=str(tiny_model)))
    assert not marker.exists()


def test_cli_rejects_bad_input_with_one_line(tmp_path: Path):
    missing = _cli("pretrain", "--train-files", str(tmp_path / "nope.txt"),
                   "--output-dir", str(tmp_path / "o"))  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "nope.txt" in missing.stderr
    config = tmp_path / "config.yaml"
    config.write_text("max_steps: 10\nlearning_rate_typo: 1\n")
    unknown = _cli("pretrain", "--config", str(config))
    assert unknown.returncode == 2 and "learning_rate_typo" in unknown.stderr
    config.write_text('{"max_steps": "many"}')
    wrong_type = _cli("pretrain", "--config", str(config))
    assert wrong_type.returncode == 2 and "max_steps" in wrong_type.stderr
    bad_preset = _cli("pretrain", "--preset", "huge", "--output-dir", str(tmp_path / "o"))
    assert bad_preset.returncode == 2 and "huge" in bad_preset.stderr
    assert "Traceback" not in missing.stderr + unknown.stderr + wrong_type.stderr
