"""Adapter versions on both engines: the base stays loaded, a swap to another adapter (or back
to the bare base) happens without draining, in-flight requests finish on the adapter they were
admitted with and are labelled with its version, and a rollback answers exactly as before."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.adapters import is_adapter, learns_with_lora, load_merged, parameter_count
from serve.engine import make_engine
from serve.engine.base import Delta, SamplingOptions
from serve.metrics import REGISTRY
from serve.settings import Settings

GREEDY = SamplingOptions(n=1, temperature=0.0, max_tokens=12)


def make_adapter(base: Path, seed: int, out: Path) -> Path:
    """A LoRA adapter with random (not zero) B matrices: answers other than the base's."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_model, 1, root / "a"), make_adapter(tiny_model, 2, root / "b")


def test_parameter_count_reads_the_safetensors_headers(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert parameter_count(tiny_model) == sum(p.numel() for p in model.parameters())
    assert learns_with_lora(tiny_model, 0)
    assert not learns_with_lora(tiny_model, parameter_count(tiny_model))


@pytest.mark.parametrize("kind", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_adapter_swaps_under_load_fail_nothing_label_every_answer_and_roll_back_exactly(
    kind: str, tiny_model: Path, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, lora_above=0, lora_rank=4)
    engine = make_engine(kind, tiny_model, "v1", settings)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
        tokenize=True, return_dict=False,
    )  # fmt: skip

    async def answer(request_id: str) -> tuple[str, set[str]]:
        deltas: list[Delta] = []
        async for delta in engine.generate(request_id, list(prompt), GREEDY):
            deltas.append(delta)
        return "".join(d.text for d in deltas), {d.version for d in deltas}

    async def scenario() -> dict[str, object]:
        await engine.start()
        seen: dict[str, object] = {"base": await answer("b0")}
        in_flight = [asyncio.create_task(answer(f"load{i}")) for i in range(6)]
        await asyncio.sleep(0)  # admitted under v1
        await engine.swap(adapters[0], "v2", tiny_model)
        after = [asyncio.create_task(answer(f"after{i}")) for i in range(3)]
        seen["in_flight"] = await asyncio.gather(*in_flight)
        seen["after"] = await asyncio.gather(*after)
        await engine.swap(adapters[1], "v3", tiny_model)
        seen["b"] = await answer("b1")
        for round_trip in range(3):  # back and forth under load, as promotions and rollbacks go
            for adapter, version in ((adapters[0], "v2"), (adapters[1], "v3")):
                load = [
                    asyncio.create_task(answer(f"rt{round_trip}{version}{i}")) for i in range(3)
                ]
                await asyncio.sleep(0)
                await engine.swap(adapter, version, tiny_model)
                await asyncio.gather(*load)  # every request admitted before the swap finishes
        await engine.swap(adapters[0], "v2", tiny_model)  # rollback to v2
        seen["back"] = await answer("b2")
        await engine.swap(tiny_model, "v1")  # rollback to the bare base
        seen["base_again"] = await answer("b3")
        await engine.shutdown()
        return seen

    def switches(kind: str) -> float:
        return REGISTRY.get_sample_value("loopchat_swap_seconds_count", {"kind": kind}) or 0.0

    before = {kind: switches(kind) for kind in ("adapter", "weights")}
    seen = asyncio.run(scenario())
    # all ten switches (the bare base included) were adapter switches: the base never reloaded
    assert switches("adapter") - before["adapter"] == 10
    assert switches("weights") == before["weights"]
    base_text = seen["base"][0]
    assert all(versions == {"v1"} and text == base_text for text, versions in seen["in_flight"])
    a_text = seen["after"][0][0]
    assert all(versions == {"v2"} and text == a_text for text, versions in seen["after"])
    assert a_text != base_text and seen["b"][1] == {"v3"} and seen["b"][0] != a_text
    assert seen["back"] == (a_text, {"v2"})
    assert seen["base_again"] == (base_text, {"v1"})

    # the adapter's answer is the merged model's own greedy answer
    merged = load_merged(adapters[0], tiny_model)
    ids = torch.tensor([prompt])
    out = merged.generate(ids, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    expected = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    assert a_text.replace("\ufffd", "") == expected.replace("\ufffd", "")
    assert is_adapter(adapters[0])


def test_a_server_starting_on_a_live_adapter_serves_it_over_its_base(
    tiny_model: Path, adapters: tuple[Path, Path], tmp_path: Path, redis_url: str
) -> None:
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.registry import Registry
    from serve.store import sync_client

    settings = Settings(
        data_dir=tmp_path, redis_url=redis_url, engine="hf", model=str(tiny_model), lora_above=0
    )
    registry = Registry.from_settings(settings, sync_client(redis_url))
    registry.ensure_live(tiny_model)
    version = registry.register(adapters[0], "rloo", "v1", {}, {"base": "v1"})
    registry.record_gate(version, {"passed": True, "reasons": ["test"]})
    registry.promote(version, by="test", reason="adapter live before the server starts")
    request = {
        "model": "loopchat", "temperature": 0, "max_tokens": GREEDY.max_tokens,
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
    }  # fmt: skip
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/chat/completions", json=request).json()
    assert answer["system_fingerprint"] == version

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    prompt = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)  # fmt: skip
    out = load_merged(adapters[0], tiny_model).generate(
        torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False
    )
    expected = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    served = answer["choices"][0]["message"]["content"]
    assert served.replace("\ufffd", "") == expected.replace("\ufffd", "")
