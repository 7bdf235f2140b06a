"""Reading training input: bad files are one clear error, and the PPO-ptx text is the served
model's own kind (the built-in corpus only for the built-in model)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from learn.data import ptx_texts, read_jsonl, read_prompts, read_texts
from learn.errors import LearnError


def test_ptx_auto_uses_the_builtin_corpus_only_for_the_builtin_model(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    builtin = shutil.copytree(tiny_model, tmp_path / "builtin")
    (builtin / "builtin.json").write_text("{}")
    texts = ptx_texts("auto", builtin, 8, seed=0)
    assert texts is not None and len(texts) == 8 and all(isinstance(t, str) for t in texts)

    with caplog.at_level(logging.INFO, logger="loopchat.learn"):
        assert ptx_texts("auto", tiny_model, 8, seed=0) is None
    assert "PPO-ptx off" in caplog.text and "LOOPCHAT_PTX" in caplog.text
    assert ptx_texts("builtin", tiny_model, 8, seed=0) is not None


def test_ptx_reads_the_users_text_file_or_is_off(tiny_model: Path, tmp_path: Path) -> None:
    own = tmp_path / "own.txt"
    own.write_text("First paragraph of my domain.\n\nSecond one.\n\nThird.")
    assert sorted(ptx_texts(str(own), tiny_model, 2, seed=0)) in (
        sorted(pair)
        for pair in [
            ["First paragraph of my domain.", "Second one."],
            ["First paragraph of my domain.", "Third."],
            ["Second one.", "Third."],
        ]
    )
    assert ptx_texts("off", tiny_model, 8, seed=0) is None
    assert ptx_texts(str(own), tiny_model, 0, seed=0) is None
    with pytest.raises(LearnError, match="no such file"):
        ptx_texts(str(tmp_path / "missing.txt"), tiny_model, 8, seed=0)


def test_bad_input_files_are_errors_naming_file_and_line(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n{oops\n")
    with pytest.raises(LearnError, match=r"--data .*rows.jsonl:2: not JSON"):
        read_jsonl(str(rows), "--data")
    with pytest.raises(LearnError, match="no such file"):
        read_texts([str(tmp_path / "nothing")])
    rows.write_text(json.dumps({"text": "no messages here"}) + "\n")
    with pytest.raises(LearnError, match="row 1 has no 'messages'"):
        read_prompts(str(rows))


def test_prompts_are_distinct_and_end_on_the_users_turn(tmp_path: Path) -> None:
    asked = [{"role": "user", "content": "What is 2 + 2?"}]
    answered = [*asked, {"role": "assistant", "content": "4"}]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (asked, answered)))
    assert read_prompts(str(rows)) == [asked]
