"""The reward model learns a preference from K-wise rankings, and reloads and scores as trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from learn.reward import (
    RankedAnswers,
    RewardConfig,
    backward_ranking_loss,
    head_and_likelihood,
    init_reward_model,
    last_token_rewards,
    load_reward_model,
    score,
    train_reward_model,
)
from learn.tokens import encode_answer, encode_prompt, make_rollout, pad_right, sequence_logprobs
from tests.learn.rlhf_helpers import (
    REWARD_CONFIG,
    loopchat,
    preference_events,
    prompt_messages,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(sft: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rm")
    heldout = preference_events(60, seed=1)
    metrics = train_reward_model(
        preference_events(160), sft, out, REWARD_CONFIG, heldout_events=heldout
    )
    return out, metrics


def test_reward_model_learns_the_preference_to_90_percent_heldout_pairwise_accuracy(
    trained: tuple[Path, dict],
) -> None:
    _, metrics = trained
    assert metrics["heldout_accuracy"] >= 0.9
    assert metrics["heldout_rankings"] == 60
    assert metrics["rankings"] == 160
    assert metrics["warm_start"] is False
    # K = 4: at most C(4, 2) = 6 pairs a ranking, fewer where answers tie
    assert 160 < metrics["pairs"] <= 160 * 6


def test_saved_reward_model_reloads_and_scores_normalised(
    trained: tuple[Path, dict], sft: Path
) -> None:
    out, metrics = trained
    rm = load_reward_model(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert rm.config.reward_mean == pytest.approx(metrics["reward_mean"])
    assert rm.config.reward_std == pytest.approx(metrics["reward_std"])

    events = preference_events(160)  # the training rankings: normalised to mean 0, std 1
    messages = [e["messages"] for e in events for _ in e["candidates"]]
    answers = [c for e in events for c in e["candidates"]]
    normalised = score(rm, tokenizer, messages, answers)
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert normalised.std().item() == pytest.approx(1.0, abs=1e-3)
    raw = score(rm, tokenizer, messages, answers, normalize=False)
    assert torch.allclose(raw, normalised * metrics["reward_std"] + metrics["reward_mean"])

    best, worst = score(
        rm, tokenizer, [prompt_messages(0)] * 2, ["yes yes yes yes yes yes", "no no no no no no"]
    )
    assert best > worst


def test_refresh_warm_starts_from_the_previous_reward_model(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    previous, _ = trained
    # a single step on 4 new rankings: a new head could not be at 90%, a warm start stays there
    config = RewardConfig(learning_rate=1e-4, epochs=1, rankings_per_batch=4)
    metrics = train_reward_model(
        preference_events(4, seed=7), previous, tmp_path, config,
        heldout_events=preference_events(60, seed=1),
    )  # fmt: skip
    assert metrics["warm_start"] is True
    assert metrics["steps"] == 1
    assert metrics["heldout_accuracy"] >= 0.9


def test_without_heldout_events_the_most_recent_rankings_are_held_out(
    sft: Path, tmp_path: Path
) -> None:
    events = preference_events(20, seed=3)
    events[0]["ranking"], events[0]["all_bad"] = [], True  # all bad: nothing to learn from
    events[1]["ranking"] = [[0, 1, 2, 3]]  # all tied: no pair either
    config = RewardConfig(epochs=1, heldout_fraction=0.25)
    metrics = train_reward_model(events, sft, tmp_path, config)
    assert metrics["rankings"] + metrics["heldout_rankings"] == 18
    assert metrics["heldout_rankings"] == 4
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0


def test_malformed_event_is_refused_with_its_id(sft: Path, tmp_path: Path) -> None:
    events = preference_events(3)
    events[1]["ranking"] = [[0], [7]]
    with pytest.raises(ValueError, match=events[1]["id"]):
        train_reward_model(events, sft, tmp_path, RewardConfig())
    with pytest.raises(ValueError, match="no ranking"):
        train_reward_model([], sft, tmp_path, RewardConfig())


def test_cli_trains_from_an_exported_rankings_file(sft: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rankings.jsonl", preference_events(40))
    result = loopchat(
        "train", "reward", "--data", str(data), "--init", str(sft),
        "--out", str(tmp_path / "rm"), "--epochs", "1", "--learning-rate", "1e-3",
        "--heldout-fraction", "0.25",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.splitlines()[-2])
    assert metrics["rankings"] == 30 and metrics["heldout_rankings"] == 10
    assert load_reward_model(tmp_path / "rm").config.reward_std == metrics["reward_std"]


def test_cli_refuses_a_bad_rankings_file_in_one_line(sft: Path, tmp_path: Path) -> None:
    data = tmp_path / "rankings.jsonl"
    data.write_text(json.dumps(preference_events(1)[0]) + "\n{not json\n")
    result = loopchat(
        "train", "reward", "--data", str(data), "--init", str(sft), "--out", str(tmp_path)
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"{data}:2: not JSON" in result.stderr
    assert not (tmp_path / "config.json").exists()


def test_likelihood_term_is_the_answers_mean_token_log_likelihood_under_the_sft_model(
    sft: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(sft)
    rm, _ = init_reward_model(sft, seed=0)
    lm = AutoModelForCausalLM.from_pretrained(sft).eval()
    answers = ["yes no yes no yes no", "no no", "yes yes yes yes yes yes yes yes"]
    encoded = [encode_answer(tokenizer, prompt_messages(i), a, 256) for i, a in enumerate(answers)]
    ids, mask, answer = pad_right(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        _, likelihood = head_and_likelihood(rm.eval(), ids, mask, answer)
        token_logprobs = sequence_logprobs(lm, ids, mask)  # entry t: log p(ids[t+1] | ..t)
    for row, (seq, start) in enumerate(encoded):
        expected = token_logprobs[row, start - 1 : len(seq) - 1].mean()
        assert likelihood[row].item() == pytest.approx(expected.item(), abs=1e-4)


def test_a_ranking_step_in_micro_batches_has_the_whole_batchs_gradients(sft: Path) -> None:
    """Two rankings of 3 and 2 answers (one tie group) in passes of 2 answers: the same loss,
    the same gradients of the backbone, the head and the likelihood weight as one pass."""
    tokenizer = AutoTokenizer.from_pretrained(sft)
    answers = [["yes yes", "no", "yes no yes"], ["no no no", "yes"]]
    batch = [
        RankedAnswers(
            [encode_answer(tokenizer, prompt_messages(i), a, 256) for a in group], ranking
        )
        for i, (group, ranking) in enumerate(zip(answers, [[[2], [0, 1]], [[1], [0]]], strict=True))
    ]

    def gradients(micro_batch_size: int) -> tuple[float, list[torch.Tensor]]:
        rm, _ = init_reward_model(sft, seed=0)
        weight = torch.nn.Parameter(torch.tensor(0.7))
        loss = backward_ranking_loss(rm.eval(), batch, tokenizer.pad_token_id, True, weight,
                                     micro_batch_size)  # fmt: skip
        return loss, [weight.grad, *(p.grad for p in rm.parameters() if p.grad is not None)]

    whole_loss, whole = gradients(16)
    micro_loss, micro = gradients(2)
    assert micro_loss == pytest.approx(whole_loss, abs=1e-6)
    assert len(micro) == len(whole) > 1 and whole[0] != 0
    for a, b in zip(whole, micro, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_likelihood_weight_takes_the_sign_of_the_users_preference(
    sft: Path, tmp_path: Path
) -> None:
    """Users who prefer the answers the model finds likely get a positive weight; users who
    prefer the unlikely ones, a negative one: the data decide, not a built-in prior."""
    likely, unlikely = "yes no yes no no yes", "Say Say Say agree agree"
    events = preference_events(24, seed=5)
    for event in events:
        event["candidates"] = [likely, unlikely]
    config = RewardConfig(epochs=1, learning_rate=1e-5)
    for name, ranking, sign in (("likely", [0, 1], 1), ("unlikely", [1, 0], -1)):
        for event in events:
            event["ranking"] = ranking
        metrics = train_reward_model(events, sft, tmp_path / name, config)
        assert sign * metrics["likelihood_weight"] > 0.1
        assert metrics["train_accuracy"] == 1.0


def test_ppo_rollouts_score_as_the_reward_model_scores_the_same_answer_as_text(
    trained: tuple[Path, dict],
) -> None:
    out, metrics = trained
    assert metrics["likelihood_weight"] != 0.0
    rm = load_reward_model(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [prompt_messages(i) for i in range(3)]
    texts = ["yes yes no", "no", "yes no yes no yes no"]
    prompts = [encode_prompt(tokenizer, m, 192) for m in messages]
    answers = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for t in texts
    ]
    rollout = make_rollout(prompts, answers, tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert rollout.input_ids[rollout.answer_mask()].tolist() == [t for a in answers for t in a]
    with torch.no_grad():
        from_rollout = last_token_rewards(
            rm, rollout.input_ids, rollout.attention_mask, rollout.answer_mask()
        )
    from_text = score(rm, tokenizer, messages, texts, normalize=False)
    assert torch.allclose(from_rollout, from_text, atol=1e-4)
    with pytest.raises(ValueError, match="answer_mask"):
        last_token_rewards(rm, rollout.input_ids, rollout.attention_mask)
