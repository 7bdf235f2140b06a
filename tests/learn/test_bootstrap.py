"""The built-in model's bootstrap: trained once per data dir (even with concurrent callers),
cached, loadable, and what a bare ``loopchat up`` serves. Uses the seconds-long ``test``
recipe; the real one is measured by ``loopchat bench model``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn.bootstrap import builtin_dir, ensure_builtin_model
from tests.conftest import start_server


def test_bootstrap_trains_once_then_returns_the_cached_model(tmp_path: Path):
    model_dir = ensure_builtin_model(tmp_path, progress=False, recipe="test")
    assert model_dir == builtin_dir(tmp_path, "test")
    assert (model_dir / "builtin.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [model_dir.name]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert model.config.vocab_size == len(tokenizer) and tokenizer.chat_template

    weights = model_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    started = time.monotonic()
    assert ensure_builtin_model(tmp_path, progress=False, recipe="test") == model_dir
    assert time.monotonic() - started < 1.0
    assert weights.stat().st_mtime_ns == written


def test_recipe_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LOOPCHAT_BUILTIN_RECIPE", "test")
    assert ensure_builtin_model(tmp_path, progress=False) == builtin_dir(tmp_path, "test")
    with pytest.raises(ValueError, match="unknown built-in recipe"):
        ensure_builtin_model(tmp_path, progress=False, recipe="huge")


BOOTSTRAP = (
    "import sys; from pathlib import Path; from learn.bootstrap import ensure_builtin_model; "
    "print(ensure_builtin_model(Path(sys.argv[1]), recipe='test'))"
)


@pytest.mark.slow
def test_concurrent_first_starts_train_the_model_only_once(tmp_path: Path):
    """The API and its worker may both start on a fresh data dir: one trains, one waits."""
    runs = [subprocess.Popen([sys.executable, "-c", BOOTSTRAP, str(tmp_path)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]  # fmt: skip
    outputs = [run.communicate(timeout=600) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert paths == {str(builtin_dir(tmp_path, "test"))}
    trained = [err for _, err in outputs if "training the built-in model once" in err]
    assert len(trained) == 1
    assert not list((tmp_path / "models").glob(".partial-*"))


@pytest.mark.slow
def test_bare_loopchat_up_serves_the_built_in_model(tmp_path: Path, redis_url: str):
    server = start_server(None, tmp_path / "data", redis_url, engine="hf",
                          env={"LOOPCHAT_BUILTIN_RECIPE": "test"})  # fmt: skip
    try:
        reply = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": "loopchat", "messages": [{"role": "user", "content": "Hi!"}],
                  "max_tokens": 8},
            timeout=120,
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        server.stop()
    assert builtin_dir(tmp_path / "data", "test").is_dir()
