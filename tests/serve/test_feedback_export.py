"""`loopchat feedback export|stats` run as real commands against rankings stored in Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.events import FeedbackLog
from serve.store import sync_client
from tests.serve.feedback_helpers import make_completion, store_rankings

pytestmark = pytest.mark.slow  # starts real processes


def loopchat(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    """Run the installed ``loopchat`` console script (what users run)."""
    env = {**os.environ, "LOOPCHAT_REDIS_URL": redis_url}
    command = [str(Path(sys.executable).parent / "loopchat"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def _store_mixed(redis_url: str) -> None:
    """Rankings with ties, a flat order, all-bad, a comment, two versions and three users."""
    store_rankings(
        redis_url,
        [
            (make_completion(4, version="v1"), {"ranking": [[2], [0, 1], [3]], "user": "ann"}),
            (make_completion(3, version="v1"), {"ranking": [1, 0, 2], "user": "bob"}),
            (make_completion(2, version="v2"), {"ranking": [], "all_bad": True, "user": "ann"}),
            (
                make_completion(2, version="v2"),
                {"ranking": [[0, 1]], "user": "cy", "comment": "same thing twice"},
            ),
        ],
    )


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rankings_export_round_trips_the_stored_events(redis_url: str, tmp_path: Path) -> None:
    _store_mixed(redis_url)
    out = tmp_path / "rankings.jsonl"
    done = loopchat(redis_url, "feedback", "export", "--format", "rankings", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "wrote 4 rankings" in done.stdout

    stored = [event for _, event in FeedbackLog(sync_client(redis_url)).events()]
    assert _read_jsonl(out) == stored
    assert [event["ranking"] for event in stored] == [
        [[2], [0, 1], [3]],
        [[1], [0], [2]],
        [],
        [[0, 1]],
    ]


EXPECTED_PAIRS = [  # [[2],[0,1],[3]] -> 5 pairs; [1,0,2] -> 3; all-bad and one tie group -> 0
    ("answer 2", "answer 0"),
    ("answer 2", "answer 1"),
    ("answer 2", "answer 3"),
    ("answer 0", "answer 3"),
    ("answer 1", "answer 3"),
    ("answer 1", "answer 0"),
    ("answer 1", "answer 2"),
    ("answer 0", "answer 2"),
]


@pytest.mark.parametrize("fmt", ["trl-dpo", "pairs"])
def test_trl_dpo_export_yields_every_ordered_pair_as_chat_messages(
    redis_url: str, tmp_path: Path, fmt: str
) -> None:
    _store_mixed(redis_url)
    out = tmp_path / "pairs.jsonl"
    done = loopchat(redis_url, "feedback", "export", "--format", fmt, "--out", str(out))
    assert done.returncode == 0, done.stderr

    records = _read_jsonl(out)
    prompt = make_completion(1).messages

    def names(record: dict) -> tuple[str, str]:
        assert record["prompt"] == prompt
        assert [m["role"] for m in record["chosen"] + record["rejected"]] == ["assistant"] * 2
        return record["chosen"][0]["content"], record["rejected"][0]["content"]

    assert [names(r) for r in records] == EXPECTED_PAIRS

    from datasets import load_dataset  # what TRL's trainers are handed

    dataset = load_dataset("json", data_files=str(out), split="train")
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert len(dataset) == 8


def test_openai_dpo_export_writes_openai_preference_fine_tuning_records(
    redis_url: str, tmp_path: Path
) -> None:
    _store_mixed(redis_url)
    out = tmp_path / "openai.jsonl"
    done = loopchat(redis_url, "feedback", "export", "--format", "openai-dpo", "--out", str(out))
    assert done.returncode == 0, done.stderr
    records = _read_jsonl(out)
    assert all(
        set(r) == {"input", "preferred_output", "non_preferred_output"}
        and r["input"] == {"messages": make_completion(1).messages}
        and [m["role"] for m in r["preferred_output"] + r["non_preferred_output"]]
        == ["assistant", "assistant"]
        for r in records
    )
    pairs = [
        (r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"])
        for r in records
    ]
    assert pairs == EXPECTED_PAIRS


def test_stats_count_rankings_pairs_ties_all_bad_and_what_no_learner_can_use(
    redis_url: str,
) -> None:
    _store_mixed(redis_url)
    done = loopchat(redis_url, "feedback", "stats", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "rankings": 4,
        "pairs": 8,
        "with_ties": 2,
        "all_bad": 1,
        "with_comment": 1,
        "per_version": {"v1": 2, "v2": 2},
        "per_user": {"ann": 2, "bob": 1, "cy": 1},
        "per_candidates": {"2": 2, "3": 1, "4": 1},
        "unusable": 2,
        "unusable_by_reason": {"all_bad": 1, "all_tied": 1},
        "trimmed": 0,
    }
    text = loopchat(redis_url, "feedback", "stats")
    assert text.returncode == 0 and "rankings 4" in text.stdout and "ann" in text.stdout
    assert "unusable 2" in text.stdout and "all_tied" in text.stdout


def test_stats_say_how_many_rankings_were_trimmed_beyond_the_retention(redis_url: str) -> None:
    _store_mixed(redis_url)
    log = FeedbackLog(sync_client(redis_url))
    log.ack([entry_id for entry_id, _ in log.read_new("worker-1", count=10)])
    assert log.trim(keep=1) == 3

    done = loopchat(redis_url, "feedback", "stats", "--json")
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout)
    assert (numbers["rankings"], numbers["trimmed"], numbers["per_user"]) == (1, 3, {"cy": 1})
    assert "trimmed 3" in loopchat(redis_url, "feedback", "stats").stdout


def test_export_to_a_missing_directory_is_a_one_line_error(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "nowhere" / "pairs.jsonl"
    done = loopchat(redis_url, "feedback", "export", "--format", "pairs", "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"loopchat feedback: error: --out {out}: directory {out.parent} does not exist"
    ]
