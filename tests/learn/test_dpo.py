"""DPO's losses against their formulas on toy tensors, and rounds of DPO on a nano model that
learn the "more yes" preference from rankings, continue Adam across rounds and skip rankings
that order nothing."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn import dpo
from learn.dpo import Batch, DPOConfig, Ranking, dpo_loss, implicit_rewards, ipo_loss
from learn.learner import STATE_FILE, RoundData, learner, load_state
from learn.modeling import load_causal_lm
from learn.tokens import answer_logprobs, encode_answer
from serve.events import count_pairs, normalise_ranking, ranking_pairs
from tests.learn.rlhf_helpers import (
    PROMPTS,
    preference_events,
    prompt_messages,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = DPOConfig(device="cpu", learning_rate=3e-4, epochs=2, rankings_per_step=8)


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def round_data(
    policy: Path, reference: Path, events: list[dict], out: Path, state=None, seed: int = 0
) -> RoundData:
    return RoundData(
        policy_dir=policy, reference_dir=reference, reward_dir=reference, events=events,
        prompts=[], ptx_texts=None, state=state, out_dir=out, seed=seed,
    )  # fmt: skip


def adam_steps(state: dict) -> set[int]:
    """The step count of every parameter's Adam state (one number when all moved together)."""
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


@torch.no_grad()
def pair_margins(policy_dir: Path, ref_dir: Path, events: list[dict], beta: float) -> torch.Tensor:
    """β·[(π_c − r_c) − (π_r − r_r)] of every (better, worse) pair of ``events``, computed
    here from the saved models (not from the learner's own bookkeeping)."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    chosen, rejected = [], []
    for event in events:
        encoded = [encode_answer(tokenizer, event["messages"], c, 256) for c in event["candidates"]]
        for better, worse in ranking_pairs(normalise_ranking(event["ranking"])):
            chosen.append(encoded[better])
            rejected.append(encoded[worse])
    pad = tokenizer.pad_token_id
    policy, ref = load_causal_lm(policy_dir), load_causal_lm(ref_dir)

    def ratio(sequences: list) -> torch.Tensor:
        return answer_logprobs(policy, sequences, pad) - answer_logprobs(ref, sequences, pad)

    return beta * (ratio(chosen) - ratio(rejected))


# --- the losses on toy tensors -------------------------------------------------------------------


def test_dpo_loss_is_minus_log_sigmoid_of_beta_times_the_log_ratio_margin() -> None:
    # h = (π_c − r_c) − (π_r − r_r): pair 0: (−1+2) − (−3+2) = 2; pair 1: (−4+3) − (−2+2) = −1
    loss = dpo_loss(t([-1.0, -4.0]), t([-3.0, -2.0]), t([-2.0, -3.0]), t([-2.0, -2.0]), 0.5)
    expected = t([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))])
    assert torch.allclose(loss, expected)


def test_dpo_loss_is_log_2_at_the_reference_and_its_gradient_raises_chosen_lowers_rejected() -> (
    None
):
    chosen, rejected = t([-5.0]).requires_grad_(), t([-7.0]).requires_grad_()
    loss = dpo_loss(chosen, rejected, t([-5.0]), t([-7.0]), beta=0.2)
    assert loss.item() == pytest.approx(math.log(2))
    loss.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.1)  # −β·σ(0)
    assert rejected.grad.item() == pytest.approx(0.1)


def test_ipo_loss_is_the_squared_distance_of_the_margin_to_one_over_two_beta() -> None:
    args = (t([-1.0, -4.0]), t([-3.0, -2.0]), t([-2.0, -3.0]), t([-2.0, -2.0]))  # h = 2, −1
    assert torch.allclose(ipo_loss(*args, beta=0.5), t([(2 - 1) ** 2, (-1 - 1) ** 2]))
    assert torch.allclose(ipo_loss(*args, beta=0.25), t([0.0, (-1 - 2) ** 2]))  # target 2


def test_ipo_loss_uses_the_unscaled_margin_and_dpo_the_beta_scaled_one() -> None:
    args = (t([0.0]), t([0.0]), t([-3.0]), t([0.0]))  # h = 3
    assert ipo_loss(*args, beta=0.1).item() == pytest.approx((3 - 5) ** 2)
    assert dpo_loss(*args, beta=0.1).item() == pytest.approx(math.log(1 + math.exp(-0.3)))


def test_implicit_rewards_are_beta_times_policy_minus_reference_log_probs() -> None:
    chosen, rejected = implicit_rewards(t([-1.0, -4.0]), t([-3.0]), t([-2.0, -3.0]), t([-2.0]), 0.5)
    assert torch.allclose(chosen, t([0.5, -0.5]))
    assert torch.allclose(rejected, t([-0.5]))


def sequences(lengths: list[tuple[int, int]]) -> list[tuple[list[int], int]]:
    """Fake encoded answers: ``total`` ids of which the answer starts at ``start``."""
    return [(list(range(total)), start) for total, start in lengths]


def test_a_batch_holds_all_pairs_of_each_ranking_and_imitates_best_groups_not_all_bad() -> None:
    first = Ranking(sequences([(5, 2), (6, 2), (4, 2)]), [[1], [0, 2]], t([-1, -2, -3]))
    tied_best = Ranking(sequences([(7, 3), (7, 3), (9, 3)]), [[0, 1], [2]], t([-4, -5, -6]))
    all_bad = Ranking(sequences([(5, 1), (5, 1)]), [[1], [0]], t([-7, -8]), imitate=False)
    batch = Batch.of([first, tied_best, all_bad])
    assert batch.pairs.tolist() == [[1, 0], [1, 2], [3, 5], [4, 5], [7, 6]]
    assert batch.best.tolist() == [1, 3, 4]  # nothing from the all-bad ranking
    assert batch.ref_logprobs.tolist() == [-1, -2, -3, -4, -5, -6, -7, -8]
    assert batch.answer_tokens.tolist() == [3, 4, 2, 4, 4, 6, 4, 4]


def test_step_loss_adds_the_mean_per_token_nll_of_the_best_answers() -> None:
    ranking = Ranking(sequences([(6, 2), (4, 2), (3, 1)]), [[0], [1], [2]], t([-2, -2, -2]))
    batch = Batch.of([ranking])
    policy = t([-1.0, -3.0, -2.0])  # π − r = 1, −1, 0; pairs (0,1) (0,2) (1,2): h = 2, 1, −1
    pair_loss, nll = dpo.step_losses(policy, batch, DPOConfig(beta=1.0))
    expected = [math.log(1 + math.exp(-h)) for h in (2, 1, -1)]
    assert pair_loss.item() == pytest.approx(sum(expected) / 3)  # mean over the pairs
    assert nll.item() == pytest.approx(1.0 / 4)  # best answer: 4 tokens, log-prob −1
    silent = Ranking(ranking.sequences, ranking.groups, ranking.ref_logprobs, imitate=False)
    assert dpo.step_losses(policy, Batch.of([silent]), DPOConfig())[1].item() == 0.0


@pytest.mark.parametrize(
    "changes",
    [{"loss": "hinge"}, {"beta": 0.0}, {"sft_coef": -0.1}, {"learning_rate": 0.0},
     {"epochs": 0}, {"rankings_per_step": 0}, {"max_length": 0}, {"device": "tpu"}],
)  # fmt: skip
def test_config_rejects_values_that_cannot_train(changes: dict) -> None:
    with pytest.raises(ValueError):
        DPOConfig(**changes)


def test_dpo_is_the_learner_module_the_loop_picks_by_name() -> None:
    module = learner("dpo")
    assert module.CONFIG is DPOConfig
    assert module.train_round is dpo.train_round


# --- rounds on a nano model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_round(sft: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list]:
    events = preference_events(64, seed=0)
    out = tmp_path_factory.mktemp("dpo-round-1")
    metrics = dpo.train_round(round_data(sft, sft, events, out), CONFIG)
    return out, metrics, events


def test_round_raises_the_implicit_reward_margin_on_its_training_pairs(
    sft: Path, first_round: tuple[Path, dict, list]
) -> None:
    out, metrics, events = first_round
    margins = pair_margins(out, sft, events, CONFIG.beta)  # 0 for every pair before the round
    assert len(margins) == metrics["pairs"]
    assert margins.mean().item() > 0.1
    assert (margins > 0).float().mean().item() > 0.9
    assert metrics["reward_margin"] == pytest.approx(margins.mean().item(), abs=1e-4)
    assert metrics["reward_accuracy"] == pytest.approx((margins > 0).float().mean().item())
    assert metrics["reward_margin_start"] == pytest.approx(0.0, abs=1e-5)


def test_round_generalises_to_held_out_pairs_and_makes_the_preferred_answer_likelier(
    sft: Path, first_round: tuple[Path, dict, list]
) -> None:
    out, _, _ = first_round
    held_out = preference_events(32, seed=1)
    assert (pair_margins(out, sft, held_out, CONFIG.beta) > 0).float().mean().item() > 0.9
    # the preference's extremes, at every prompt: all "yes" became likelier, all "no" less likely
    tokenizer = AutoTokenizer.from_pretrained(out)
    policy, ref, pad = load_causal_lm(out), load_causal_lm(sft), tokenizer.pad_token_id
    messages = [prompt_messages(i) for i in range(len(PROMPTS))]

    @torch.no_grad()
    def gain(answer: str) -> torch.Tensor:
        encoded = [encode_answer(tokenizer, m, answer, 256) for m in messages]
        return answer_logprobs(policy, encoded, pad) - answer_logprobs(ref, encoded, pad)

    assert (gain(" ".join(["yes"] * 6)) > 0).all()
    assert (gain(" ".join(["no"] * 6)) < 0).all()


def test_round_reports_counts_and_losses_and_writes_a_policy_with_its_state(
    sft: Path, first_round: tuple[Path, dict, list]
) -> None:
    out, metrics, events = first_round
    assert metrics["learner"] == "dpo"
    assert metrics["rankings"] == len(events) and metrics["rankings_unusable"] == 0
    assert metrics["pairs"] == sum(count_pairs(normalise_ranking(e["ranking"])) for e in events)
    assert metrics["steps"] == CONFIG.epochs * math.ceil(len(events) / CONFIG.rankings_per_step)
    assert 0 < metrics["pair_loss"] < math.log(2)  # log 2 where the policy is the reference
    assert metrics["loss"] == pytest.approx(
        metrics["pair_loss"] + CONFIG.sft_coef * metrics["sft_loss"]
    )
    assert metrics["rounds"] == 1 and metrics["seconds"] > 0
    json.dumps(metrics)  # registered as checkpoint metrics as it is
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert (
        AutoTokenizer.from_pretrained(out).chat_template
        == AutoTokenizer.from_pretrained(sft).chat_template
    )
    state = load_state(out)
    assert state["learner"] == "dpo" and state["rounds"] == 1
    assert adam_steps(state) == {metrics["steps"]}


def test_next_round_continues_adam_from_the_saved_state_with_its_own_learning_rate(
    sft: Path, first_round: tuple[Path, dict, list], tmp_path: Path
) -> None:
    out1, metrics1, _ = first_round
    config = replace(CONFIG, learning_rate=2e-4, epochs=1)
    events = preference_events(16, seed=2)
    metrics2 = dpo.train_round(
        round_data(out1, sft, events, tmp_path, state=load_state(out1), seed=1), config
    )
    state = load_state(tmp_path)
    assert metrics2["rounds"] == state["rounds"] == 2
    assert metrics2["reward_margin_start"] > 0  # round 1 already prefers "yes" on new rankings
    assert adam_steps(state) == {metrics1["steps"] + metrics2["steps"]}  # not restarted at 0
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {2e-4}


def test_another_learners_state_is_not_resumed(sft: Path, tmp_path: Path) -> None:
    ppo_state = {"learner": "ppo", "optimizer": {"state": {}, "param_groups": []}, "kl_coef": 0.1}
    config = replace(CONFIG, epochs=1)
    metrics = dpo.train_round(
        round_data(sft, sft, preference_events(8, seed=3), tmp_path, state=ppo_state), config
    )
    assert metrics["rounds"] == 1
    assert adam_steps(load_state(tmp_path)) == {metrics["steps"]}


def with_ranking(event: dict, ranking: list, all_bad: bool = False) -> dict:
    return {**event, "ranking": ranking, "all_bad": all_bad}


def test_all_tied_and_empty_all_bad_rankings_are_counted_not_trained_on(
    sft: Path, tmp_path: Path
) -> None:
    usable = preference_events(4, seed=4)
    extra = preference_events(5, seed=5)
    unusable = [with_ranking(e, [[0, 1, 2, 3]]) for e in extra[:3]]
    unusable += [with_ranking(e, [], all_bad=True) for e in extra[3:]]
    config = replace(CONFIG, epochs=1)
    metrics = dpo.train_round(round_data(sft, sft, [*unusable, *usable], tmp_path), config)
    assert metrics["rankings"] == 4 and metrics["rankings_unusable"] == 5
    assert metrics["pairs"] == sum(count_pairs(normalise_ranking(e["ranking"])) for e in usable)
    assert metrics["steps"] == 1  # the four usable rankings fill one step of eight


def test_a_round_with_no_ordered_pair_raises_before_writing_anything(
    sft: Path, tmp_path: Path
) -> None:
    events = preference_events(3, seed=6)
    unusable = [with_ranking(events[0], [[0, 1, 2, 3]]), with_ranking(events[1], [], True)]
    with pytest.raises(ValueError, match="no ranking orders two answers"):
        dpo.train_round(round_data(sft, sft, unusable, tmp_path / "out"), CONFIG)
    assert not (tmp_path / "out").exists()


def test_all_bad_rankings_still_give_pairs_but_no_answer_to_imitate(sft: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(sft)
    events = preference_events(3, seed=7)
    events = [
        with_ranking(events[0], [[0, 1, 2, 3]]),  # tied: dropped
        with_ranking(events[1], [3, 2, 1, 0], all_bad=True),
        events[2],
    ]
    ranked, imitate = dpo.usable_rankings(events, tokenizer, 256)
    assert [r.ranking for r in ranked] == [[[3], [2], [1], [0]], events[2]["ranking"]]
    assert imitate == [False, True]


def test_ipo_round_also_raises_the_margin(sft: Path, tmp_path: Path) -> None:
    events = preference_events(32, seed=8)
    config = replace(CONFIG, loss="ipo")
    metrics = dpo.train_round(round_data(sft, sft, events, tmp_path), config)
    assert metrics["reward_margin"] > 0.05 and metrics["reward_accuracy"] > 0.9
    assert (tmp_path / STATE_FILE).is_file()
