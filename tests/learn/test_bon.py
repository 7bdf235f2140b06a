"""Best-of-n distillation moves the policy toward the reward model's best samples; the random
control trains on the same kind of samples without reading any reward; the users' own best
answers are trained on; a second round continues the first one's optimizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn import bon
from learn.bon import BoNConfig, select_best, select_random, train_round, user_best_answers
from learn.learner import STATE_FILE, RoundData, load_state
from learn.reward import load_reward_model, score
from learn.tokens import Encoded, answer_logprobs, encode_answer
from tests.learn.rlhf_helpers import (
    PROMPTS,
    preference_events,
    prompt_messages,
    sample_answers,
    yes_count,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# One round that visibly moves the nano policy: 64 prompts, 4 samples each, 8 steps.
FAST = {"response_length": 12, "learning_rate": 1e-3, "batch_size": 8, "device": "cpu"}


def prompts(repeat: int = 1) -> list[list[dict[str, str]]]:
    return [prompt_messages(i) for i in range(len(PROMPTS))] * repeat


def round_data(
    policy: Path,
    reward: Path,
    out: Path,
    events: list[dict] | None = None,
    state: dict[str, Any] | None = None,
    seed: int = 0,
    repeat: int = 1,
) -> RoundData:
    return RoundData(
        policy_dir=policy, reference_dir=policy, reward_dir=reward, events=events or [],
        prompts=prompts(repeat), ptx_texts=None, state=state, out_dir=out, seed=seed,
    )  # fmt: skip


@pytest.fixture
def captured_targets(monkeypatch: pytest.MonkeyPatch) -> list[Encoded]:
    """The answers ``train_round`` fine-tunes on, recorded as they reach ``distil``."""
    seen: list[Encoded] = []
    original: Callable[..., Any] = bon.distil

    def spy(policy: Any, optimizer: Any, targets: list[Encoded], *args: Any) -> Any:
        seen.extend(targets)
        return original(policy, optimizer, targets, *args)

    monkeypatch.setattr(bon, "distil", spy)
    return seen


def mean_score(rm_dir: Path, answers: list[str]) -> float:
    rm, tokenizer = load_reward_model(rm_dir), AutoTokenizer.from_pretrained(rm_dir)
    per_prompt = len(answers) // len(PROMPTS)
    messages = [prompt_messages(i // per_prompt) for i in range(len(answers))]
    return score(rm, tokenizer, messages, answers).mean().item()


# --- selection on toy tensors --------------------------------------------------------------------


def test_select_best_keeps_the_highest_scoring_sample_of_each_prompt() -> None:
    scores = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9], [-2.0, -3.0, -1.5]])
    ended = torch.ones(3, 3, dtype=torch.bool)
    assert select_best(scores, ended, penalty=1.0).tolist() == [1, 0, 2]


def test_missing_eos_penalty_flips_the_choice_to_an_answer_that_ended() -> None:
    scores = torch.tensor([[1.5, 1.0], [0.2, 0.0]])
    ended = torch.tensor([[False, True], [False, True]])
    assert select_best(scores, ended, penalty=0.0).tolist() == [0, 0]
    # 1.5 − 1 < 1.0: the cut-off answer loses; 0.2 − 1 < 0.0 as well
    assert select_best(scores, ended, penalty=1.0).tolist() == [1, 1]
    # a margin larger than the penalty still wins
    assert select_best(torch.tensor([[2.5, 1.0]]), ended[:1], penalty=1.0).tolist() == [0]


def test_select_random_is_repeatable_with_its_seed_and_covers_every_sample() -> None:
    first = select_random(1000, 4, seed=3)
    assert first.shape == (1000,)
    assert torch.equal(first, select_random(1000, 4, seed=3))
    assert not torch.equal(first, select_random(1000, 4, seed=4))
    assert set(first.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "settings",
    [
        {"select": "best"},
        {"n": 0},
        {"epochs": 0},
        {"batch_size": 0},
        {"temperature": 0.0},
        {"learning_rate": 0.0},
        {"missing_eos_penalty": -1.0},
        {"device": "tpu"},
    ],
)
def test_config_refuses_invalid_settings(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BoNConfig(**settings)


# --- the users' best answers ---------------------------------------------------------------------


def test_user_best_answers_are_the_top_tie_group_of_rankings_that_order_two_answers(
    models: tuple[Path, Path],
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models[0])
    ordered, all_tied, all_bad = preference_events(3)
    ordered["candidates"] = ["yes yes", "no", "yes no", "no no"]
    ordered["ranking"] = [[0, 2], 1, [3]]  # a tie at the top, a bare index below
    all_tied["ranking"] = [[0, 1, 2, 3]]
    all_bad.update(ranking=[], all_bad=True)
    messages = ordered["messages"]
    assert user_best_answers([ordered, all_tied, all_bad], tokenizer, 64) == [
        encode_answer(tokenizer, messages, "yes yes", 64),
        encode_answer(tokenizer, messages, "yes no", 64),
    ]


def test_a_round_trains_on_the_users_best_answers(
    models: tuple[Path, Path], tmp_path: Path, captured_targets: list[Encoded]
) -> None:
    sft, rm = models
    events = preference_events(6, seed=5)
    config = BoNConfig(**FAST)
    metrics = train_round(round_data(sft, rm, tmp_path, events), config)

    tokenizer = AutoTokenizer.from_pretrained(sft)
    length = config.max_prompt_length + config.response_length
    best = [
        encode_answer(tokenizer, ev["messages"], ev["candidates"][i], length)
        for ev in events
        for i in ev["ranking"][0]
    ]
    worst = [
        encode_answer(tokenizer, ev["messages"], ev["candidates"][i], length)
        for ev in events
        for i in ev["ranking"][-1]
    ]
    from_users = captured_targets[metrics["targets_sampled"] :]
    assert metrics["targets_sampled"] == len(PROMPTS)  # one kept sample per prompt
    assert metrics["targets_from_users"] == len(best) == len(from_users)
    assert all(answer in from_users for answer in best)
    assert not any(answer in from_users for answer in worst)


def test_use_user_best_off_trains_on_samples_only(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    sft, rm = models
    config = BoNConfig(**FAST, use_user_best=False)
    metrics = train_round(round_data(sft, rm, tmp_path, preference_events(6)), config)
    assert metrics["targets_from_users"] == 0
    assert metrics["targets_sampled"] == len(PROMPTS)


# --- whole rounds --------------------------------------------------------------------------------


def test_reward_selection_raises_the_reward_of_fresh_samples_and_of_the_kept_answers(
    models: tuple[Path, Path], tmp_path: Path, captured_targets: list[Encoded]
) -> None:
    sft, rm = models
    metrics = train_round(round_data(sft, rm, tmp_path, repeat=8), BoNConfig(**FAST))

    assert metrics["reward_selected"] > metrics["reward_mean"]  # the best of 4 beats the mean
    before, after = sample_answers(sft, 64), sample_answers(tmp_path, 64)
    assert mean_score(rm, after) > mean_score(rm, before) + 0.2
    assert sum(map(yes_count, after)) > sum(map(yes_count, before))  # the preference itself

    pad_id = AutoTokenizer.from_pretrained(sft).pad_token_id
    with torch.no_grad():
        start = answer_logprobs(AutoModelForCausalLM.from_pretrained(sft), captured_targets, pad_id)
        end = answer_logprobs(
            AutoModelForCausalLM.from_pretrained(tmp_path), captured_targets, pad_id
        )
    assert end.mean() > start.mean()  # the policy now gives its kept answers more probability


def test_random_selection_reads_no_reward_model(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sft, _ = models

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the no-feedback control must not use reward scores")

    monkeypatch.setattr(bon, "load_reward_model", forbidden)
    monkeypatch.setattr(bon, "score_ids", forbidden)
    missing_rm = tmp_path / "no-reward-model"
    config = BoNConfig(**FAST, select="random")
    metrics = train_round(round_data(sft, missing_rm, tmp_path / "out"), config)
    assert metrics["targets_sampled"] == len(PROMPTS)
    assert metrics["reward_mean"] is None and metrics["reward_selected"] is None
    assert metrics["steps"] == 1 and metrics["loss"] > 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_users_selection_samples_nothing_and_distils_the_users_best_answers(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sft, _ = models

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("users selection samples nothing and scores nothing")

    for name in ("load_reward_model", "score_ids", "generate_answers"):
        monkeypatch.setattr(bon, name, forbidden)
    events = preference_events(6, seed=5)
    config = BoNConfig(**FAST, select="users")
    metrics = train_round(round_data(sft, tmp_path / "no-rm", tmp_path / "out", events), config)
    assert metrics["targets_sampled"] == 0
    assert metrics["targets_from_users"] == sum(len(ev["ranking"][0]) for ev in events)
    with pytest.raises(ValueError, match="use_user_best"):
        BoNConfig(select="users", use_user_best=False)


def test_a_round_writes_a_loadable_policy_its_state_and_json_metrics(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    sft, rm = models
    metrics = train_round(round_data(sft, rm, tmp_path), BoNConfig(**FAST))
    json.dumps(metrics)
    for name in (
        "learner", "prompts", "targets_sampled", "targets_from_users", "reward_mean",
        "reward_selected", "ended", "loss", "steps", "seconds",
    ):  # fmt: skip
        assert name in metrics, name
    assert metrics["learner"] == "bon" and metrics["prompts"] == len(PROMPTS)
    assert 0.0 <= metrics["ended"] <= 1.0
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template is not None
    assert (tmp_path / STATE_FILE).is_file()


def test_a_round_is_repeatable_with_its_seed_and_draws_anew_in_the_next_round(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    sft, rm = models
    config = BoNConfig(**FAST)
    runs = {
        name: train_round(round_data(sft, rm, tmp_path / name, seed=seed), config)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    }
    assert runs["a"]["reward_mean"] == runs["b"]["reward_mean"]
    assert runs["a"]["reward_mean"] != runs["c"]["reward_mean"]


def test_second_round_restores_the_first_rounds_optimizer_state(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    sft, rm = models
    config = BoNConfig(**FAST)
    first = train_round(round_data(sft, rm, tmp_path / "r1"), config)
    state = load_state(tmp_path / "r1")
    assert state is not None and state["learner"] == "bon" and state["rounds"] == 1

    second = train_round(round_data(tmp_path / "r1", rm, tmp_path / "r2", state=state), config)
    resumed = load_state(tmp_path / "r2")
    assert resumed is not None and resumed["rounds"] == 2
    steps = {float(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert steps == {first["steps"] + second["steps"]}  # Adam's moments carried on
    assert resumed["optimizer"]["param_groups"][0]["lr"] == config.learning_rate


def test_another_learners_state_is_ignored(models: tuple[Path, Path], tmp_path: Path) -> None:
    sft, rm = models
    state = {"learner": "ppo", "optimizer": {"state": {}, "param_groups": []}, "kl_coef": 0.1}
    metrics = train_round(round_data(sft, rm, tmp_path, state=state), BoNConfig(**FAST))
    resumed = load_state(tmp_path)
    assert resumed is not None and resumed["rounds"] == 1
    steps = {float(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert steps == {metrics["steps"]}
