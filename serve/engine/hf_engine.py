"""The transformers engine: a token loop in worker threads, for where vLLM cannot run.

It is also the baseline the benchmarks compare vLLM against. The loop is written out rather
than calling ``generate`` because each candidate needs its own random generator (seed + i,
as vLLM does) for reproducible yet distinct candidates, and ``generate`` only has the global
one, which concurrent requests would share. Each request runs in a thread of its own and hands
its deltas to the event loop, which therefore never waits on torch.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from serve.adapters import load_merged
from serve.engine.base import Engine, RawDelta, SamplingOptions, TokenLogprobs

WORKERS = 4  # requests generated at the same time (each in a thread of its own)


def load_model(model_dir: str) -> PreTrainedModel:
    """The checkpoint in fp32 eval mode (CPU)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """One token id from a row of logits: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # keep the smallest prefix whose mass reaches top_p; the most likely token always stays,
    # also when top_p is below float32's resolution (a top_p of 1e-300 is 0 in float32)
    keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    keep[0] = True
    sorted_probs = sorted_probs * keep
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])


def token_logprobs(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """``token``'s entry from a row of the model's log-softmax, with the ``top`` most likely.

    The row is the raw distribution, before temperature and top_p, as vLLM reports by default
    (``logprobs_mode="raw_logprobs"``, see :class:`serve.engine.base.TokenLogprobs`): the same
    numbers whichever engine serves, and whatever the request's sampling settings.
    """
    best = logprobs.topk(top)
    pairs = zip(best.indices.tolist(), best.values.tolist(), strict=True)
    return TokenLogprobs(token, float(logprobs[token]), tuple(pairs))


class Detokenizer:
    """Incremental text of one candidate that never shows a stop string or half a character.

    Text that could still turn into a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._prefix = 0  # ids[_prefix:_read] decode to the end of ``text`` already
        self._read = 0
        self._searched = 0  # text before this index holds no stop string

    def _decode_new(self) -> str | None:
        """The text the ids after ``_read`` add, decoding a short window (with the previous
        token as context, so a word's leading space comes out right) instead of everything:
        each token costs the same however long the answer is. None while a multi-byte
        character is incomplete."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        full = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return None
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(prefix) :]

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return the text now safe to show and whether a stop string appeared."""
        self.ids.append(token_id)
        new = self._decode_new()
        if new is None:  # a multi-byte character is not complete yet
            return "", False
        self.text += new
        text = self.text
        start = max(0, self._searched - self.longest + 1)  # only where a new match can be
        hits = [pos for s in self.stop if (pos := text.find(s, start)) >= 0]
        self._searched = len(text)
        if hits:
            return self._take(min(hits)), True
        held = max(
            (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        return self._take(len(text) - held), False

    def flush(self) -> str:
        """Everything not shown yet (the candidate ended without a stop string)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        self.text += decode(self.ids[self._prefix :], skip_special_tokens=True)[len(prefix) :]
        self._prefix = self._read = len(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a candidate: the tokenizer's eos and the generation config's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def generate_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    options: SamplingOptions,
    cancel: threading.Event,
    emit: Callable[[RawDelta], None],
) -> None:
    """Sample ``options.n`` candidates as one batch with a KV cache, emitting deltas as they come.

    Runs in a worker thread; returns early when ``cancel`` is set.
    """
    n = options.n
    generators = []
    for i in range(n):
        gen = torch.Generator()
        if options.seed is None:
            gen.seed()
        else:
            gen.manual_seed(options.seed + i)
        generators.append(gen)
    stops = eos_ids(model, tokenizer)
    top = options.logprobs
    texts = [Detokenizer(tokenizer, options.stop) for _ in range(n)]
    running = set(range(n))
    input_ids = torch.tensor([prompt_ids] * n, dtype=torch.long)
    cache = None
    with torch.inference_mode():
        for step in range(options.max_tokens):
            if cancel.is_set():
                return
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
            logprobs = None if top is None else torch.log_softmax(logits.float(), dim=-1)
            next_ids = []
            for i in range(n):
                token = sample_token(logits[i], options.temperature, options.top_p, generators[i])
                next_ids.append(token)
                if i not in running:
                    continue
                steps = () if top is None else (token_logprobs(logprobs[i], token, top),)
                if token in stops:
                    text, reason = texts[i].flush(), "stop"
                else:
                    text, stopped = texts[i].push(token)
                    reason = "stop" if stopped else None
                    if reason is None and step == options.max_tokens - 1:
                        text, reason = text + texts[i].flush(), "length"
                if reason is not None:
                    running.discard(i)
                emit((i, text, 1, reason, steps))
            if not running:
                return
            input_ids = torch.tensor(next_ids, dtype=torch.long).unsqueeze(1)


class HFEngine(Engine):
    """transformers model in this process; a swap replaces the model object."""

    name = "hf"
    concurrency = WORKERS  # one request per worker thread; the rest wait in the executor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: PreTrainedModel | None = None
        self._executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="hf-engine")
        self._cancel: dict[str, threading.Event] = {}

    async def start(self) -> None:
        # Requests already run in parallel threads; intra-op threads on top of them oversubscribe
        # the cores (measured: 9x slower for the nano model on a busy 2-core machine).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
        self._model = await asyncio.to_thread(load_model, self.base_dir)
        await self.start_adapter()

    async def shutdown(self) -> None:
        for event in self._cancel.values():
            event.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._model = None

    def problem(self) -> str | None:
        return "no model loaded (not started, or shut down)" if self._model is None else None

    async def abort(self, request_id: str) -> None:
        if event := self._cancel.get(request_id):
            event.set()

    async def _reload(self, model_dir: str) -> None:
        self._model = await asyncio.to_thread(load_model, model_dir)

    async def _load_adapter(self, adapter_dir: str, version: str) -> PreTrainedModel:
        """The base with the adapter merged in, as a model object of its own: requests hold
        the object they started with, so the switch needs no drain."""
        return await asyncio.to_thread(load_merged, adapter_dir, self.base_dir)

    async def _stream(
        self, request_id: str, prompt_ids: list[int], options: SamplingOptions, adapter: Any
    ) -> AsyncGenerator[RawDelta, None]:
        model = adapter if adapter is not None else self._model
        if model is None:
            raise RuntimeError("HFEngine.start() was not awaited")
        loop = asyncio.get_running_loop()
        # Never full: the thread emits at most one delta per candidate per step, then None. So a
        # slow reader costs the answer's memory, not a worker: the thread finishes and frees its
        # place for the next request, and the deltas wait here (vLLM merges a slow reader's).
        queue: asyncio.Queue[RawDelta | None] = asyncio.Queue(options.n * options.max_tokens + 1)
        cancel = self._cancel[request_id] = threading.Event()

        def run() -> None:
            try:
                generate_candidates(
                    model,
                    self.tokenizer,
                    prompt_ids,
                    options,
                    cancel,
                    lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
                )
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        done = loop.run_in_executor(self._executor, run)
        try:
            while (item := await queue.get()) is not None:
                yield item
            await done  # re-raises what went wrong in the thread
        finally:
            cancel.set()
            self._cancel.pop(request_id, None)
