"""Both engines in-process: sampling, stop strings, seeds, and hot swap with requests in flight."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve.engine import make_engine
from serve.engine.base import Delta, Engine, EngineRequestError, SamplingOptions
from serve.engine.hf_engine import Detokenizer, sample_token
from serve.settings import Settings
from tests.serve.checkpoint_helpers import variant


class CharTokenizer:
    """Decodes ids as characters (id 0 = "é" split in two bytes), for the detokenizer alone."""

    pieces = {0: b"\xc3", 1: b"\xa9"}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces.get(i, bytes([i])) for i in ids).decode(errors="replace")


def push_all(detok: Detokenizer, text: str | bytes) -> tuple[list[str], bool]:
    shown, stopped = [], False
    for token in text.encode() if isinstance(text, str) else text:
        piece, stopped = detok.push(token)
        shown.append(piece)
        if stopped:
            break
    return shown, stopped


def test_detokenizer_cuts_at_the_stop_string_and_never_shows_part_of_it() -> None:
    detok = Detokenizer(CharTokenizer(), ["END"])
    shown, stopped = push_all(detok, "abcENxyENDzzz")
    assert stopped and "".join(shown) == "abcENxy"
    # "E" and "EN" are held back until "x" shows they do not start "END"
    assert shown == ["a", "b", "c", "", "", "ENx", "y", "", "", ""]


def test_detokenizer_waits_for_a_whole_character_and_flushes_the_rest() -> None:
    detok = Detokenizer(CharTokenizer(), ["zz"])
    assert detok.push(ord("a")) == ("a", False)
    assert detok.push(0) == ("", False)  # first byte of "é"
    assert detok.push(1) == ("é", False)
    assert detok.push(ord("z")) == ("", False)
    assert detok.flush() == "z"


def test_sample_token_is_greedy_at_zero_temperature_and_respects_top_p() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, 0.0, 1.0, gen) == 1
    draws = {sample_token(logits, 1.0, 0.9, gen) for _ in range(200)}
    assert draws == {1, 2}  # p = .51, .46, .03, .00: only {1, 2} are needed to reach 0.9
    assert {sample_token(logits, 1.0, 1e-6, gen) for _ in range(50)} == {1}


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46])  # all 0 in float32
def test_a_top_p_below_float32_resolution_still_keeps_the_most_likely_token(top_p: float) -> None:
    """A valid ``top_p`` (> 0) the schemathesis fuzzer sent was a 500: no token was kept."""
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    gen = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, top_p, gen) for _ in range(20)} == {1}


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two checkpoints with the same tokenizer and different greedy answers."""
    root = tmp_path_factory.mktemp("swap-models")
    return variant(tiny_model, 1, root / "a"), variant(tiny_model, 2, root / "b")


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def engine_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for a module's engine (vLLM's client belongs to the loop it started on)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(
    engine_kind: str,
    models: tuple[Path, Path],
    loop: asyncio.AbstractEventLoop,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Engine]:
    settings = Settings(data_dir=tmp_path_factory.mktemp(f"engine-{engine_kind}"))
    engine = make_engine(engine_kind, models[0], "v1", settings)
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.shutdown())


def prompt(engine: Engine, text: str) -> list[int]:
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]


async def run(engine: Engine, request_id: str, text: str, options: SamplingOptions) -> list[Delta]:
    return [d async for d in engine.generate(request_id, prompt(engine, text), options)]


def texts(deltas: list[Delta], n: int) -> list[str]:
    out = [""] * n
    for d in deltas:
        out[d.index] += d.text
    return out


GREEDY = SamplingOptions(n=1, temperature=0.0, max_tokens=24)


def test_seeded_candidates_differ_from_each_other_and_repeat_exactly(
    engine: Engine, loop: asyncio.AbstractEventLoop
) -> None:
    options = SamplingOptions(n=4, temperature=1.0, max_tokens=12, seed=11)
    first = texts(loop.run_until_complete(run(engine, "s1", "hello", options)), 4)
    again = texts(loop.run_until_complete(run(engine, "s2", "hello", options)), 4)
    other = texts(
        loop.run_until_complete(
            run(
                engine, "s3", "hello", SamplingOptions(n=4, temperature=1.0, max_tokens=12, seed=12)
            )
        ),
        4,
    )
    assert first == again
    assert len(set(first)) == 4
    assert other != first


def test_several_greedy_candidates_are_refused(
    engine: Engine, loop: asyncio.AbstractEventLoop
) -> None:
    with pytest.raises(EngineRequestError):
        loop.run_until_complete(run(engine, "g", "hi", SamplingOptions(n=2, temperature=0.0)))


def test_every_candidate_ends_once_with_a_reason_and_counts_its_tokens(
    engine: Engine, loop: asyncio.AbstractEventLoop
) -> None:
    deltas = loop.run_until_complete(
        run(engine, "c1", "hi", SamplingOptions(n=3, temperature=1.0, max_tokens=5, seed=1))
    )
    for i in range(3):
        mine = [d for d in deltas if d.index == i]
        assert [d.finish_reason for d in mine if d.finish_reason] in (["length"], ["stop"])
        assert mine[-1].finish_reason is not None
        assert 1 <= sum(d.tokens for d in mine) <= 5
    assert {d.version for d in deltas} == {"v1"}


def test_a_stop_string_ends_the_answer_before_it(
    engine: Engine, loop: asyncio.AbstractEventLoop
) -> None:
    full = texts(loop.run_until_complete(run(engine, "t1", "what is 2 + 3?", GREEDY)), 1)[0]
    stop = full.strip()[3:5]
    assert len(stop) == 2, full
    cut = loop.run_until_complete(
        run(
            engine,
            "t2",
            "what is 2 + 3?",
            SamplingOptions(n=1, temperature=0.0, max_tokens=24, stop=(stop,)),
        )
    )
    assert texts(cut, 1)[0] == full[: full.find(stop)]
    assert cut[-1].finish_reason == "stop"


def test_logprobs_are_the_checkpoints_own_as_a_transformers_forward_gives_them(
    engine: Engine, models: tuple[Path, Path], loop: asyncio.AbstractEventLoop
) -> None:
    """Every token comes with its log-probability and the most likely tokens at its position,
    and they are the model's log-softmax before temperature and top_p (vLLM's default
    ``raw_logprobs``, which the HF engine matches): a plain forward of the checkpoint over the
    prompt and the answer gives the same numbers, however the answer was sampled."""
    question = "what is 2 + 3?"
    options = SamplingOptions(n=2, temperature=1.5, top_p=0.8, max_tokens=8, seed=5, logprobs=3)
    deltas = loop.run_until_complete(run(engine, "lp", question, options))
    ids = prompt(engine, question)
    model = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32).eval()
    for i in range(2):
        mine = [d for d in deltas if d.index == i]
        steps = [step for d in mine for step in d.logprobs]
        assert len(steps) == sum(d.tokens for d in mine)
        answer = [step.token_id for step in steps]
        with torch.no_grad():
            logits = model(torch.tensor([ids + answer])).logits[0, len(ids) - 1 : -1]
        for step, row in zip(steps, torch.log_softmax(logits.float(), dim=-1), strict=True):
            assert step.logprob == pytest.approx(row[step.token_id].item(), abs=1e-4)
            assert [lp for _, lp in step.top] == pytest.approx(
                row.topk(3).values.tolist(), abs=1e-4
            )
            assert all(lp == pytest.approx(row[t].item(), abs=1e-4) for t, lp in step.top)
    plain = loop.run_until_complete(run(engine, "no-lp", question, GREEDY))
    assert all(d.logprobs == () for d in plain)


def test_swap_lets_in_flight_requests_finish_on_the_old_version(
    engine: Engine, models: tuple[Path, Path], loop: asyncio.AbstractEventLoop
) -> None:
    """A swap waits for the running request (all of it from v1), new requests get v2's
    answers, and swapping back reproduces v1's greedy answer exactly (no stale cache)."""
    long = SamplingOptions(n=1, temperature=0.0, max_tokens=200)

    async def scenario() -> dict[str, list[Delta]]:
        seen = {"before": await run(engine, "w0", "hello there", GREEDY), "in_flight": []}
        started = asyncio.Event()

        async def long_request() -> None:
            async for delta in engine.generate("w1", prompt(engine, "hello there"), long):
                seen["in_flight"].append(delta)
                started.set()

        task = asyncio.create_task(long_request())
        first = asyncio.create_task(started.wait())
        await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # surfaces a failed request instead of waiting forever
        await engine.swap(models[1], "v2")
        assert task.done(), "swap returned while a request admitted before it still ran"
        seen["after"] = await run(engine, "w2", "hello there", GREEDY)
        await engine.swap(models[0], "v3")
        seen["back"] = await run(engine, "w3", "hello there", GREEDY)
        return seen

    seen = loop.run_until_complete(scenario())
    greedy_v1 = texts(seen["before"], 1)[0]
    in_flight = texts(seen["in_flight"], 1)[0]
    assert {d.version for d in seen["before"] + seen["in_flight"]} == {"v1"}
    assert seen["in_flight"][-1].finish_reason in ("length", "stop")
    assert in_flight.startswith(greedy_v1.rstrip("\ufffd"))
    assert {d.version for d in seen["after"]} == {"v2"}
    assert texts(seen["after"], 1)[0] != greedy_v1
    assert {d.version for d in seen["back"]} == {"v3"}
    assert texts(seen["back"], 1)[0] == greedy_v1
    assert engine.version == "v3"


def test_a_swapped_in_checkpoint_answers_exactly_as_transformers_does(
    engine: Engine, models: tuple[Path, Path], loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    """The whole new model answers, its tied output head included: vLLM's in-place reload left
    the head packed from the first checkpoint's embeddings on CPU (``serve.engine.vllm_worker``)."""
    words = ["hello there", "good morning", "spell cat", "thanks", "what colour is grass?"]
    reference = make_engine("hf", models[1], "ref", Settings(data_dir=tmp_path))

    async def greedy(target: Engine, tag: str) -> list[str]:
        """Each answer's text, without the half characters the engines render differently."""
        answers = [
            texts(await run(target, f"{tag}{i}", w, GREEDY), 1)[0] for i, w in enumerate(words)
        ]
        return [a.replace("\ufffd", "") for a in answers]

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        await reference.start()
        expected = await greedy(reference, "r")
        await reference.shutdown()
        first = await greedy(engine, "f")
        await engine.swap(models[1], "v-b")
        swapped = await greedy(engine, "s")
        await engine.swap(models[0], "v-a")
        return expected, first, swapped

    expected, first, swapped = loop.run_until_complete(scenario())
    assert first != expected  # the two checkpoints answer differently
    assert swapped == expected


def test_hf_engine_runs_generation_off_the_event_loop(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    """While the HF engine generates, the event loop keeps answering."""
    engine = make_engine("hf", models[0], "v1", Settings(data_dir=tmp_path))

    async def scenario() -> int:
        await engine.start()
        ticks = 0
        done = threading.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        await run(engine, "x", "hello", SamplingOptions(n=4, temperature=1.0, max_tokens=64))
        done.set()
        await tick_task
        await engine.shutdown()
        return ticks

    assert asyncio.run(scenario()) > 10


def test_a_swap_slower_than_its_timeout_is_abandoned_and_serving_goes_on(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    """A load that outlasts ``swap_timeout_s`` (here 10 ms, less than loading even the nano
    model takes; in production a stuck mount or a wedged engine) is given up: the swap raises,
    the request that waited for it and every one after it are served by the old version."""
    from serve.engine.base import SwapTimeout

    settings = Settings(data_dir=tmp_path / "data", swap_timeout_s=0.01)
    engine = make_engine("hf", models[0], "v1", settings)

    async def scenario() -> tuple[list[Delta], list[Delta]]:
        await engine.start()
        try:
            swap = asyncio.create_task(engine.swap(models[1], "v2"))
            await asyncio.sleep(0)  # the swap holds new requests back now
            during = asyncio.create_task(run(engine, "d", "hello there", GREEDY))
            with pytest.raises(SwapTimeout):
                await asyncio.wait_for(swap, 30)
            return await asyncio.wait_for(during, 30), await run(engine, "a", "hi", GREEDY)
        finally:
            await engine.shutdown()

    loop = asyncio.new_event_loop()
    try:
        during, after = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert {d.version for d in during + after} == {"v1"} and engine.version == "v1"
    assert during[-1].finish_reason in ("length", "stop")


def test_detokenizer_work_per_token_does_not_grow_with_the_answer() -> None:
    """Each token decodes a window of a few ids and searches only the new text for the stop
    string, so a 4,000-token answer costs ~4,000 times one token, not 4,000² / 2."""

    class Counting(CharTokenizer):
        decoded = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            Counting.decoded += len(ids)
            return super().decode(ids, skip_special_tokens)

    length = 4000
    detok = Detokenizer(Counting(), ["STOP"])
    shown, stopped = push_all(detok, "ab" * (length // 2) + "STOPcd")
    assert stopped and "".join(shown) == "ab" * (length // 2)
    assert Counting.decoded < 4 * (length + 6)
