"""PPO moves the policy toward what the reward model prefers while the KL penalty holds it near
the SFT reference; the vLLM sampler's weights follow every update in memory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learn.ppo import Experience, PolicyWithValue, PPOConfig, ppo_minibatch_step, train_ppo
from learn.tokens import make_rollout, sequence_logprobs
from tests.learn.rlhf_helpers import (
    PROMPTS,
    assert_learned_the_preference,
    loopchat,
    preference_events,
    prompt_messages,
    random_answer,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KL_TARGET = 3.0
CONFIG = PPOConfig(
    steps=20, batch_size=16, mini_batch_size=8, ppo_epochs=2, response_length=12,
    learning_rate=3e-4, kl_coef=0.05, adaptive_kl=True, kl_target=KL_TARGET,
    ptx_coef=0.1, ptx_length=32, engine="vllm",
)  # fmt: skip


def prompts() -> list[list[dict[str, str]]]:
    return [prompt_messages(i) for i in range(len(PROMPTS))]


def ptx_texts() -> list[str]:
    rng = random.Random(0)
    return [random_answer(rng) for _ in range(50)]


@pytest.fixture(scope="module")
def trained(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    sft, rm = models
    out = tmp_path_factory.mktemp("ppo")
    metrics = train_ppo(sft, sft, rm, prompts(), ptx_texts(), out, CONFIG)
    return out, metrics


def test_ppo_raises_the_reward_of_fresh_samples_with_kl_within_target(
    models: tuple[Path, Path], trained: tuple[Path, dict]
) -> None:
    sft, rm = models
    out, metrics = trained
    assert_learned_the_preference(sft, rm, out, KL_TARGET)
    assert metrics["reward_mean"] > metrics["reward_start"]


def test_vllm_sampler_weights_follow_every_update(trained: tuple[Path, dict]) -> None:
    _, metrics = trained
    history = metrics["history"]
    assert len(history) == CONFIG.steps
    assert sum(step["approx_kl"] for step in history) > 0  # the policy did move
    # the engine's log-probs of its own samples match the trainer's after every update
    assert max(step["sampler_logprob_gap"] for step in history) < 1e-3


def test_every_step_logs_reward_kl_entropy_clipping_losses_and_phase_times(
    trained: tuple[Path, dict],
) -> None:
    _, metrics = trained
    for step in metrics["history"]:
        for name in (
            "reward", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss", "approx_kl",
            "policy_loss", "ptx_loss", "time_generation", "time_forwards", "time_backward",
            "time_sync",
        ):  # fmt: skip
            assert isinstance(step[name], float), name
    assert set(metrics["time"]) >= {"generation", "forwards", "backward", "sync"}
    assert metrics["episodes"] == CONFIG.steps * CONFIG.batch_size
    json.dumps(metrics)  # registered as checkpoint metrics as it is


def test_output_is_a_policy_dir_in_the_input_format(
    models: tuple[Path, Path], trained: tuple[Path, dict]
) -> None:
    sft, _ = models
    out, _ = trained
    assert (out / "model.safetensors").exists()
    assert not list(out.glob("*value*"))  # the value head is not part of the policy
    assert (
        AutoTokenizer.from_pretrained(out).chat_template
        == AutoTokenizer.from_pretrained(sft).chat_template
    )
    policy = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(sft)
    assert type(policy) is type(original)
    config, original_config = policy.config.to_dict(), original.config.to_dict()
    config.pop("_name_or_path"), original_config.pop("_name_or_path")
    assert config == original_config


def test_hf_generate_fallback_runs_the_same_step(models: tuple[Path, Path], tmp_path: Path) -> None:
    sft, rm = models
    config = PPOConfig(
        steps=2, batch_size=8, mini_batch_size=4, ppo_epochs=1, response_length=8,
        learning_rate=1e-4, adaptive_kl=False, engine="hf",
    )  # fmt: skip
    metrics = train_ppo(sft, sft, rm, prompts(), None, tmp_path, config)
    assert metrics["steps"] == 2
    assert metrics["kl_coef"] == config.kl_coef  # fixed β
    assert "sampler_logprob_gap" not in metrics["history"][0]
    assert "ptx_loss" not in metrics["history"][0]  # no pre-training text: no ptx term
    assert AutoModelForCausalLM.from_pretrained(tmp_path) is not None


def test_a_minibatch_step_in_micro_batches_makes_the_whole_minibatchs_update(
    models: tuple[Path, Path],
) -> None:
    """micro_batch_size bounds memory, not the update: the same SGD step from the same start
    with 5 rows in passes of 2 as in one pass (clipped ratio, clipped values, token means)."""
    rollout = make_rollout(
        [[1, 5, 6], [1, 7], [1, 5, 6], [1, 8, 9, 10], [1, 7]],
        [[11, 12, 2], [13], [11, 2], [14, 15, 16, 17], [18, 19]],
        pad_id=0, eos_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    shape = rollout.responses.shape
    exp = Experience(
        rollout,
        torch.randn(shape) - 3.0,
        torch.randn(shape),
        torch.randn(shape),
        torch.randn(shape),
    )

    def step(micro_batch_size: int) -> list[torch.Tensor]:
        torch.manual_seed(1)
        policy = PolicyWithValue(AutoModelForCausalLM.from_pretrained(models[0]))
        torch.nn.init.normal_(policy.value_head.weight)  # a value loss with a gradient
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        config = PPOConfig(micro_batch_size=micro_batch_size, max_grad_norm=1e9, device="cpu")
        rows = torch.arange(5)
        ppo_minibatch_step(policy, optimizer, exp, rows, None, config, torch.Generator())
        return [p.detach().clone() for p in policy.parameters()]

    for whole, micro in zip(step(64), step(2), strict=True):
        assert torch.allclose(whole, micro, atol=1e-6)


def test_sequence_logprobs_are_the_same_with_left_or_right_padding(
    models: tuple[Path, Path],
) -> None:
    sft, _ = models
    model = AutoModelForCausalLM.from_pretrained(sft).eval()
    ids = [5, 9, 12, 7, 3]
    with torch.no_grad():
        alone = sequence_logprobs(model, torch.tensor([ids]), torch.ones(1, 5, dtype=torch.long))
        manual = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        expected = manual[torch.arange(4), torch.tensor(ids[1:])]
        assert torch.allclose(alone[0], expected, atol=1e-5)
        right = sequence_logprobs(
            model, torch.tensor([ids + [0, 0]]), torch.tensor([[1] * 5 + [0, 0]])
        )
        left = sequence_logprobs(
            model, torch.tensor([[0, 0] + ids]), torch.tensor([[0, 0] + [1] * 5])
        )
    assert torch.allclose(right[0, :4], expected, atol=1e-5)
    assert right[0, 4:].abs().sum() == 0  # targets that are padding give 0
    assert torch.allclose(left[0, 2:], expected, atol=1e-5)


def test_cli_runs_ppo_offline_on_a_rankings_export(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    sft, rm = models
    prompts_file = write_jsonl(tmp_path / "rankings.jsonl", preference_events(10))
    ptx_file = tmp_path / "ptx.txt"
    ptx_file.write_text("\n\n".join(ptx_texts()))
    result = loopchat(
        "train", "ppo", "--policy", str(sft), "--reward", str(rm), "--prompts", str(prompts_file),
        "--ptx", str(ptx_file), "--out", str(tmp_path / "policy"), "--engine", "hf",
        "--steps", "1", "--batch-size", "4", "--mini-batch-size", "4", "--ppo-epochs", "1",
        "--response-length", "8", "--ptx-length", "16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.splitlines()[-2])
    assert metrics["steps"] == 1 and "ptx_loss" in metrics["history"][0]
    assert (tmp_path / "policy" / "model.safetensors").exists()


def test_cli_refuses_a_missing_reward_model_in_one_line(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    sft, _ = models
    prompts_file = write_jsonl(tmp_path / "rankings.jsonl", preference_events(2))
    result = loopchat(
        "train", "ppo", "--policy", str(sft), "--reward", str(tmp_path / "nope"),
        "--prompts", str(prompts_file), "--out", str(tmp_path / "policy"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a Hugging Face model directory" in result.stderr
