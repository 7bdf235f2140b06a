"""Learning rounds on a model above ``LOOPCHAT_LORA_ABOVE``: each learner trains a LoRA adapter
on the frozen SFT base; the registry stores the adapter (small) with its base; the next round
continues the adapter; an adapter version serves and rolls back exactly.

The tiny Llama stands in for a large model by setting the threshold to 0 parameters.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learn.learner import LEARNERS
from learn.loop import LoopConfig, run_round
from learn.modeling import load_causal_lm
from serve.adapters import is_adapter, load_merged
from serve.engine.base import SamplingOptions
from serve.engine.hf_engine import HFEngine
from serve.models import export_version
from serve.registry import Registry
from serve.settings import Settings
from serve.store import Completion, sync_client
from tests.learn.loop_helpers import TINY, arithmetic_prompts, sample_completions, submit_rankings
from tests.learn.test_loop import fresh

# The round's LoRA sizing (LoopConfig.lora) kept tiny: a visible change in one step, in bf16
LORA = {**TINY, "lora": {"rloo": {"learning_rate": 5e-2, "bf16": True}, "reward": {"bf16": True}}}


@pytest.fixture(scope="module")
def completions(tiny_model: Path) -> list[Completion]:
    return sample_completions(tiny_model, arithmetic_prompts(12), n=3, max_new_tokens=8)


def lora_loop(redis_url: str, tmp_path: Path, tiny_model: Path, learner: str = "rloo"):
    settings = Settings(
        redis_url=redis_url, data_dir=tmp_path, model=str(tiny_model), learner=learner,
        lora_above=0, lora_rank=4, lora_alpha=8,
    )  # fmt: skip
    registry = Registry.from_settings(settings, sync_client(redis_url))
    registry.ensure_live(tiny_model)
    return settings, registry


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_each_learner_trains_an_adapter_over_the_sft_base_on_a_large_model(
    name, redis_url, tmp_path, tiny_model, completions
) -> None:
    settings, registry = lora_loop(redis_url, tmp_path, tiny_model, name)
    submit_rankings(redis_url, fresh(completions[:6]))
    record = run_round(f"lora-{name}", LoopConfig.from_settings(settings, LORA), settings)

    candidate = registry.get(record["candidate"])
    assert candidate["kind"] == name and candidate["info"]["base"] == "v1"
    if name == "rloo":  # the round applied the LoRA sizing over the rest
        assert candidate["metrics"]["config"]["learning_rate"] == 5e-2
        assert candidate["metrics"]["config"]["bf16"] and candidate["metrics"]["config"]["k"] == 2
    adapter_dir = registry.local_path(record["candidate"])
    assert is_adapter(adapter_dir) and not (adapter_dir / "model.safetensors").exists()
    assert registry.base_path(record["candidate"]) == registry.local_path("v1")
    assert "kl_to_sft" in record["gate"]  # the gate scored the merged candidate
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert size < (tiny_model / "model.safetensors").stat().st_size
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)  # the base itself is not copied

    rm = registry.get(record["rm"]["version"])
    assert rm["info"]["base"] == "v1" and is_adapter(registry.local_path(rm["version"]))
    rm_tensors = load_file(str(registry.local_path(rm["version"]) / "adapter_model.safetensors"))
    assert all("lora_" in k or ".score." in k for k in rm_tensors)  # adapter + scalar head


def test_the_next_round_continues_the_adapter_and_the_optimizer(
    redis_url, tmp_path, tiny_model, completions
) -> None:
    settings, registry = lora_loop(redis_url, tmp_path, tiny_model)
    config = LoopConfig.from_settings(settings, LORA)
    submit_rankings(redis_url, fresh(completions[:6]))
    first = run_round("first", config, settings)
    submit_rankings(redis_url, fresh(completions[6:12]))
    second = run_round("second", config, settings)

    assert second["start"] == first["candidate"]
    assert second["rm"]["warm_start"] is True  # the reward model's adapter went on too
    meta = registry.get(second["candidate"])
    assert meta["info"]["continued"] is True and meta["info"]["base"] == "v1"
    base = weights(load_causal_lm(tiny_model))
    one = weights(load_causal_lm(registry.local_path(first["candidate"])))
    two = weights(load_causal_lm(registry.local_path(second["candidate"])))
    assert any(not torch.equal(base[k], one[k]) for k in base)  # the first round learned
    assert any(not torch.equal(one[k], two[k]) for k in one)  # and the second went on


def test_an_adapter_version_serves_swaps_without_a_reload_and_rolls_back_exactly(
    redis_url, tmp_path, tiny_model, completions
) -> None:
    settings, registry = lora_loop(redis_url, tmp_path, tiny_model)
    submit_rankings(redis_url, fresh(completions[:6]))
    candidate = run_round("r", LoopConfig.from_settings(settings, LORA), settings)["candidate"]
    base_dir = registry.local_path("v1")
    adapter_dir = registry.local_path(candidate)
    prompt = [3, 4, 5]
    greedy = SamplingOptions(n=1, temperature=0, max_tokens=6)

    async def answer(engine: HFEngine) -> tuple[str, str]:
        text, version = "", ""
        async for delta in engine.generate("req", prompt, greedy):
            text, version = text + delta.text, delta.version
        return text, version

    async def run() -> list[tuple[str, str]]:
        engine = HFEngine(base_dir, "v1", settings)
        await engine.start()
        served = [await answer(engine)]
        base_model = engine._model
        await engine.swap(adapter_dir, candidate, base_dir)
        assert engine._model is base_model  # the base stayed loaded: only the adapter came
        served.append(await answer(engine))
        await engine.swap(base_dir, "v1")  # rollback to the bare base
        served.append(await answer(engine))
        await engine.shutdown()
        return served

    before, with_adapter, after = asyncio.run(run())
    assert before[1] == "v1" and with_adapter[1] == candidate and after == before

    merged = load_merged(adapter_dir, base_dir)
    out = export_version(registry, candidate, tmp_path / "export")
    exported = load_causal_lm(out)
    assert not is_adapter(out) and (out / "config.json").is_file()
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(exported.state_dict()[name], tensor), name


def test_a_lora_reward_model_loads_merged_and_scores_as_it_was_trained(
    tiny_model, completions, tmp_path
) -> None:
    from learn.modeling import LoraOptions
    from learn.reward import RewardConfig, load_reward_model, score, train_reward_model
    from tests.learn.loop_helpers import shorter_first

    events = [
        {"messages": c.messages, "candidates": c.candidates, "ranking": shorter_first(c.candidates)}
        for c in completions
    ]
    config = RewardConfig(rankings_per_batch=4, warmup_steps=1, learning_rate=1e-2)
    metrics = train_reward_model(
        events[:8], tiny_model, tmp_path / "rm", config, events[8:], LoraOptions(rank=4), tiny_model
    )
    assert is_adapter(tmp_path / "rm") and metrics["warm_start"] is False
    rm = load_reward_model(tmp_path / "rm")
    assert rm.config.reward_mean == pytest.approx(metrics["reward_mean"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    pairs = [(e["messages"], answer) for e in events[:8] for answer in e["candidates"]]
    rewards = score(rm, tokenizer, [m for m, _ in pairs], [a for _, a in pairs], normalize=False)
    # the merged model gives the training answers the rewards the trained adapter gave them
    assert rewards.mean().item() == pytest.approx(metrics["reward_mean"], abs=1e-4)
    assert rewards.std().item() == pytest.approx(metrics["reward_std"], rel=1e-3)
