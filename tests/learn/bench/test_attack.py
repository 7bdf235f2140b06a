"""``loopchat bench attack`` end to end on a tiny model: the three arms, the cap, the verdict."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from learn.bench import attack
from learn.identity_caps import identity_cap, identity_of
from learn.loop import stream_order

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_split_prompts_never_asks_a_held_out_question_in_training() -> None:
    context = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    prompts = [[{"role": "user", "content": f"q{i % 10}"}] for i in range(40)]
    prompts += [[*context, {"role": "user", "content": f"q{i}"}] for i in range(10)]
    train, heldout = attack.split_prompts(prompts, 0.3, random.Random(0))
    questions = {p[-1]["content"] for p in heldout}
    assert len(questions) == 3 and len(train) + len(heldout) == 50
    assert questions.isdisjoint(p[-1]["content"] for p in train)


def test_the_attacker_reverses_every_ranking_under_one_key_and_posts_first() -> None:
    slate = attack.Slate([{"role": "user", "content": "What is 2 + 2?"}], ["4", "5", "4"],
                         [1.0, 0.0, 1.0])  # fmt: skip
    honest = attack.honest_events([slate] * 4, 2, "user")
    adversary = attack.attack_events([slate] * 3)
    assert honest[0]["ranking"] == [[0, 2], [1]] and adversary[0]["ranking"] == [[1], [0, 2]]
    assert [e["identity"] for e in adversary] == [attack.ATTACKER] * 3
    assert len({e["user"] for e in adversary}) == 3  # a new name each time, one key
    assert len({e["identity"] for e in honest}) == 2 and len({e["user"] for e in honest}) == 2
    entries = attack.stream(honest, adversary, random.Random(0))
    assert [identity_of(e) for _, e in entries[:3]] == [attack.ATTACKER] * 3
    ids = [entry_id for entry_id, _ in entries]
    assert len(set(ids)) == 7 and ids == sorted(ids, key=stream_order)
    assert len({e["id"] for _, e in entries}) == 7


def test_a_tiny_run_reports_every_arm_and_caps_the_attacker_at_a_quarter(
    tiny_model: Path, tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(tiny_model), "--out", str(tmp_path), "--preference", "brevity",
         "--users", "8", "--rankings-per-user", "3", "--attack-rankings", "60",
         "--heldout-rankings", "16", "--k", "3", "--max-new-tokens", "8", "--seeds", "1"]
    )  # fmt: skip
    code = attack.run(args)
    result = json.loads((tmp_path / "bench-attack.json").read_text())
    assert code == (0 if result["passed"] else 1)
    arms = {arm["arm"]: arm for arm in result["arms"]}
    assert list(arms) == ["honest", "attack, caps on", "attack, caps off"]
    assert arms["honest"]["attacker_kept"] == 0
    assert arms["honest"]["data_window"]["capped"] == 0
    capped = arms["attack, caps on"]
    assert capped["attacker_kept"] == identity_cap([3] * 8 + [60], 0.25) == 8
    assert capped["attacker_share"] <= 0.25 and capped["data_window"]["capped"] == 52
    assert arms["attack, caps off"]["attacker_kept"] == 60
    assert arms["attack, caps off"]["attacker_share"] == pytest.approx(60 / 84)
    assert result["settings"]["heldout_questions_in_training"] == 0
    for arm in arms.values():
        assert arm["agreement"]["n"] == 16 and 0 <= arm["agreement"]["mean"] <= 100
    drop = result["drop_caps_on"]
    difference = arms["honest"]["agreement"]["mean"] - capped["agreement"]["mean"]
    assert drop["mean"] == pytest.approx(difference, abs=0.02)
    assert result["passed"] == (drop["high"] <= result["bound_points"])
    assert (tmp_path / "bench-attack.png").stat().st_size > 0
