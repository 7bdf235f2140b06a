"""``loopchat models import`` and ``loopchat checkpoints export`` on a real Redis and registry.

The tiny random Llama keeps most of these fast; one test imports the real SmolLM2-135M-Instruct
GGUF from the package registry and asks it a question through the API on vLLM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.cli import main as loopchat
from serve.registry import Registry
from serve.settings import Settings
from serve.store import sync_client
from tests.conftest import start_server


@pytest.fixture
def env(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's settings: a fresh data dir and the tests' Redis."""
    data = tmp_path / "data"
    monkeypatch.setenv("LOOPCHAT_DATA_DIR", str(data))
    monkeypatch.setenv("LOOPCHAT_REDIS_URL", redis_url)
    return data


def registry_of(data: Path, redis_url: str) -> Registry:
    return Registry.from_settings(
        Settings(data_dir=data, redis_url=redis_url), sync_client(redis_url)
    )


def test_import_of_a_model_directory_registers_a_gated_sft_version_with_a_card(
    env: Path, redis_url: str, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loopchat(["models", "import", str(tiny_model), "--name", "tiny"]) == 0
    assert "make it live: loopchat promote v1" in capsys.readouterr().out
    registry = registry_of(env, redis_url)
    meta = registry.get("v1")
    assert meta["kind"] == "sft" and meta["gate"]["passed"]
    assert meta["info"]["import"]["format"] == "hf"
    assert meta["info"]["import"]["architecture"] == "LlamaForCausalLM"
    card = (registry.local_path("v1") / "README.md").read_text()
    assert card.startswith("# tiny") and str(tiny_model) in card
    assert loopchat(["promote", "v1"]) == 0
    assert registry.alias("live") == "v1"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "x.gguf").write_bytes(b"not a gguf file"), "not a GGUF file"),
        (lambda d: (d / "x.gguf").write_bytes(b"GGUF" + b"\x03\x00" * 20), "broken GGUF file"),
        (lambda d: (d / "x").mkdir(), "neither a GGUF file nor a directory"),
    ],
    ids=["not-gguf", "truncated-gguf", "empty-dir"],
)
def test_import_of_a_broken_file_is_an_error_and_registers_nothing(
    env: Path, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], make, message
) -> None:
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("x"))
    assert loopchat(["models", "import", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert registry_of(env, redis_url).versions() == []


def test_import_of_an_architecture_that_is_not_a_causal_lm_is_refused(
    env: Path, redis_url: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = shutil.copytree(tiny_model, tmp_path / "bert")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(
        json.dumps({**config, "architectures": ["BertForSequenceClassification"]})
    )
    assert loopchat(["models", "import", str(model)]) == 2
    assert "not a causal language model" in capsys.readouterr().err
    assert registry_of(env, redis_url).versions() == []


def test_import_of_a_model_without_a_chat_template_is_refused(
    env: Path, redis_url: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = shutil.copytree(tiny_model, tmp_path / "plain")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    assert loopchat(["models", "import", str(model)]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert registry_of(env, redis_url).versions() == []


def test_checkpoints_export_writes_a_directory_transformers_loads_without_registry_files(
    env: Path, redis_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    assert loopchat(["models", "import", str(tiny_model)]) == 0
    out = tmp_path / "exported"
    assert loopchat(["checkpoints", "export", "v1", "--out", str(out)]) == 0
    assert not (out / "loopchat.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(str(out))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    for (name, a), (_, b) in zip(
        exported.state_dict().items(), original.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(str(out)).chat_template


def test_checkpoints_export_refuses_an_unknown_version_or_a_non_empty_directory(
    env: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loopchat(["checkpoints", "export", "v9", "--out", str(tmp_path / "o")]) == 2
    assert "unknown version 'v9'" in capsys.readouterr().err
    assert loopchat(["models", "import", str(tiny_model)]) == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert loopchat(["checkpoints", "export", "v1", "--out", str(tmp_path / "busy")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_real_gguf_model_imported_from_the_registry_answers_through_the_api_on_vllm(
    smollm2_gguf: Path, tmp_path: Path, redis_url: str
) -> None:
    data = tmp_path / "data"
    env = {"LOOPCHAT_DATA_DIR": str(data), "LOOPCHAT_REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "serve.cli", "models", "import", str(smollm2_gguf), "--promote"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "as v1 (LlamaForCausalLM, 135M parameters)" in done.stdout
    server = start_server(None, data, redis_url, engine="vllm", timeout=600)
    try:
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": "loopchat",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 24,
            },
            timeout=120,
        ).json()
    finally:
        server.stop()
    choice = answer["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"  # stopped on the model's own <|im_end|>
    assert "<|im_end|>" not in choice["message"]["content"]
    assert answer["system_fingerprint"] == "v1"
