"""The engine interface: what the serving layer needs from vLLM or transformers, and no more.

Both engines take a rendered prompt (token ids) and stream :class:`Delta` objects, one candidate
text piece at a time (with its tokens' log-probabilities when asked, :class:`TokenLogprobs`).
The base class owns what must behave identically whichever engine runs: hot swap. A swap closes
the door to new requests, waits until every request admitted under the old weights has finished
(so none fails and none mixes two versions), lets the engine load the new weights, then reopens.
Every delta carries the version that was live when its request was admitted, which is the
version that produced all of its tokens.

Admission is bounded: an engine generates ``concurrency`` requests at once and lets at most
``LOOPCHAT_MAX_WAITING`` more wait (in its executor's queue, vLLM's scheduler, or at a swap's
closed door); :meth:`Engine.generate` refuses the next one at once with :class:`EngineBusy`
(answered 503 with ``Retry-After``) instead of queueing it without end.

Adapter versions (``serve.adapters``) swap without draining: the engine keeps its base weights,
loads the new adapter beside the old one, then switches in one step; a request runs to the end
on the adapter (and version) it was admitted with, so old and new answers overlap safely and no
request waits for a swap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import decoders
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from serve.adapters import is_adapter
from serve.metrics import SWAP_SECONDS
from serve.settings import Settings

log = logging.getLogger("loopchat.serve")


class EngineRequestError(ValueError):
    """The engine refused a request's parameters: the client's mistake (answered 400)."""


class EngineBusy(RuntimeError):
    """As many requests wait for the engine as ``LOOPCHAT_MAX_WAITING`` allows (answered 503)."""


class SwapTimeout(RuntimeError):
    """A weight swap did not finish in ``swap_timeout_s``; the old version keeps serving."""


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample the ``n`` candidates of one request (OpenAI's parameters, validated).

    With a ``seed``, candidate ``i`` is sampled with seed ``seed + i`` (vLLM's rule), so the
    candidates differ from each other yet a repeated request gets the same ones.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # None: no log-probabilities; k: each token's and the k most likely at its position
    logprobs: int | None = None
    # a JSON Schema (as JSON text) the answer must follow: constrained decoding
    json_schema: str | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the ``top`` most likely tokens at its position
    (``(token id, log-probability)``, most likely first).

    Both engines report the model's own distribution, before temperature and ``top_p`` (vLLM's
    default ``logprobs_mode="raw_logprobs"``), so the numbers do not depend on how the answer was
    sampled, and a token top_p left out still has a finite log-probability. Under a
    ``json_schema`` (vLLM) it is the distribution over the tokens the grammar allows.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# What an engine streams: (index, text, new tokens, finish_reason, the new tokens' logprobs)
RawDelta = tuple[int, str, int, str | None, tuple[TokenLogprobs, ...]]


@dataclass(frozen=True)
class Delta:
    """New output of one candidate: text since its previous delta, how it ended (if it did),
    and, when asked, the log-probabilities of its new tokens (whose text may come later: a
    half character or a possible stop string is held back)."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None
    version: str
    logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass
class Usage:
    """Token counts of one request, as OpenAI reports them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class _Admission:
    """Requests admitted and not finished yet; a swap waits for ``active`` to reach zero.

    ``in_flight`` also counts requests accepted but not started yet (a stream whose client
    has not read it, a request waiting at a swap's closed door): the bound applies to it.
    """

    active: int = 0
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.active += 1
        self.idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()


def context_length(model_dir: str | Path, settings: Settings) -> int:
    """The context served: the setting, capped by what the model's positions allow."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return min(settings.max_model_len, int(config.get("max_position_embeddings", 1 << 30)))


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer: its chat template renders prompts for both engines."""
    return AutoTokenizer.from_pretrained(str(model_dir))


class _Slot:
    """One admitted request's place in the engine's count; given back once, however it ends."""

    def __init__(self, admission: _Admission) -> None:
        self._admission: _Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.in_flight -= 1
            self._admission = None


class TokenPieces:
    """Each token's own text and exact bytes, as OpenAI's logprobs show them.

    A token may hold part of a character (byte-level BPE splits UTF-8 anywhere): its ``bytes``
    are the real ones, so a client joining the bytes of an answer's tokens gets its text, and
    its text is those bytes decoded with replacement. Vocabularies that are not byte-level fall
    back to the UTF-8 of the token decoded alone. ``special`` ids (the end-of-turn token) are
    left out of the answer's text, so a choice's logprobs leave them out too.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.special = frozenset(tokenizer.all_special_ids)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()} if byte_level else {}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """``(text, bytes)`` of one token."""
        if (found := self._cache.get(token_id)) is None:
            found = self._cache[token_id] = self._piece(token_id)
        return found

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self.special:  # its text is its name (never byte-encoded)
            return piece, list(piece.encode())
        if piece and self._byte_of and all(c in self._byte_of for c in piece):
            raw = bytes(self._byte_of[c] for c in piece)
            return raw.decode(errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id])
        return text, list(text.encode())


class Engine(ABC):
    """A text generator over one checkpoint at a time, swappable while it serves."""

    name: str
    drain_seconds: float = 30.0
    concurrency: int = 1  # requests generated at once; up to ``max_waiting`` more wait
    json_output: bool = False  # can constrain answers to a JSON Schema (constrained decoding)

    def __init__(
        self,
        model_dir: str | Path,
        version: str,
        settings: Settings,
        base_dir: str | Path | None = None,
    ) -> None:
        """``model_dir`` is the version's directory; for an adapter version, ``base_dir`` is
        the base model it adapts (the weights actually loaded)."""
        self.model_dir = str(model_dir)
        self.base_dir = str(base_dir or model_dir)
        self.version = version
        self.settings = settings
        self.max_model_len = context_length(self.base_dir, settings)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(self.base_dir)
        self.pieces = TokenPieces(self.tokenizer)
        self._adapter: Any = None  # the engine's handle of the adapter served (None: the base)
        self._open = asyncio.Event()
        self._open.set()
        self._admitted = _Admission()
        self._swap_lock = asyncio.Lock()

    @abstractmethod
    async def start(self) -> None:
        """Load the weights and get ready to generate."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Release the model (and any engine process)."""

    def problem(self) -> str | None:
        """Why the engine cannot generate now, or None when it can (``GET /health``)."""
        return None

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop generating for ``request_id`` (the client went away)."""

    async def unsupported(self, options: SamplingOptions) -> tuple[str, str] | None:
        """``(param, why)`` when this engine cannot serve ``options``, or None; asked before
        anything is generated, so that a stream is refused with a 400 rather than an error
        after its status line. JSON output needs constrained decoding, which only vLLM does."""
        if options.json_schema is not None and not self.json_output:
            why = f"JSON output needs constrained decoding, which the {self.name} engine lacks"
            return "response_format", f"{why} (the vllm engine has it); only 'text'"
        return None

    @abstractmethod
    def _stream(
        self, request_id: str, prompt_ids: list[int], options: SamplingOptions, adapter: Any
    ) -> AsyncGenerator[RawDelta, None]:
        """Raw deltas (:data:`RawDelta`) of every candidate, from the base with ``adapter`` (a
        handle from ``_load_adapter``, or None); logprobs only when ``options.logprobs`` is set."""

    @abstractmethod
    async def _reload(self, model_dir: str) -> None:
        """Replace the weights with those in ``model_dir``; called with no request running."""

    @abstractmethod
    async def _load_adapter(self, adapter_dir: str, version: str) -> Any:
        """Make the adapter ready to serve over the loaded base; returns its handle."""

    async def start_adapter(self) -> None:
        """After ``start``: load the version's adapter when the version is one."""
        if is_adapter(self.model_dir):
            self._adapter = await self._load_adapter(self.model_dir, self.version)

    def busy(self) -> bool:
        """Whether a new request would wait behind ``max_waiting`` others already."""
        waiting = self._admitted.in_flight - self.concurrency
        return waiting >= self.settings.max_waiting

    def generate(
        self, request_id: str, prompt_ids: list[int], options: SamplingOptions
    ) -> AsyncGenerator[Delta, None]:
        """Stream the candidates' deltas, each tagged with the version generating them.

        Raises :class:`EngineBusy` here, before the caller answers anything, when the engine
        is :meth:`busy`; otherwise the request holds its place until its stream ends, is
        closed, or (never started: the client left first) is garbage-collected. Closing or
        cancelling the iterator (client disconnect) aborts the request.
        """
        if self.busy():
            raise EngineBusy(
                f"{self._admitted.in_flight} requests are in flight for the {self.name} engine "
                f"({self.concurrency} generated at once, at most {self.settings.max_waiting} "
                "waiting)"
            )
        self._admitted.in_flight += 1
        slot = _Slot(self._admitted)
        stream = self._generate(request_id, prompt_ids, options, slot)
        weakref.finalize(stream, slot.release)
        return stream

    async def _generate(
        self, request_id: str, prompt_ids: list[int], options: SamplingOptions, slot: _Slot
    ) -> AsyncGenerator[Delta, None]:
        try:
            if options.n > 1 and options.temperature == 0:
                raise EngineRequestError(
                    "n > 1 needs temperature > 0 (greedy answers are all equal)"
                )
            await self._open.wait()
            version, adapter = self.version, self._adapter  # together: what this request runs on
            self._admitted.enter()
            stream = self._stream(request_id, prompt_ids, options, adapter)
            finished = False
            try:
                async for index, text, tokens, reason, logprobs in stream:
                    yield Delta(index, text, tokens, reason, version, logprobs)
                finished = True
            finally:
                try:
                    await stream.aclose()
                    if not finished:
                        await self.abort(request_id)
                finally:
                    self._admitted.leave()
        finally:
            slot.release()

    async def drain(self) -> None:
        """Wait (up to ``drain_seconds``) until every admitted request has finished."""
        try:
            await asyncio.wait_for(self._admitted.idle.wait(), self.drain_seconds)
        except TimeoutError:
            log.warning("going ahead with %d slow readers still open", self._admitted.active)

    async def _within_deadline(self, work: Any, version: str) -> Any:
        """A load that hangs (a stuck mount, a wedged engine) must not hold requests back for
        ever: they wait for the swap, so it gets a deadline."""
        try:
            return await asyncio.wait_for(work, self.settings.swap_timeout_s)
        except TimeoutError:
            raise SwapTimeout(
                f"loading {version} took over {self.settings.swap_timeout_s:g} s; "
                f"still serving {self.version}"
            ) from None

    async def _adapter_for(self, model_dir: str, version: str, base_dir: Any) -> Any:
        """The engine's handle of an adapter version (None for a full-weight version)."""
        if not base_dir:
            return None
        return await self._within_deadline(self._load_adapter(model_dir, version), version)

    async def swap(
        self, model_dir: str | Path, version: str, base_dir: str | Path | None = None
    ) -> None:
        """Serve ``model_dir`` as ``version`` from now on (``base_dir``: the base of an adapter
        version). Over the same base, an adapter (or the bare base) is switched in one step
        without draining; otherwise in-flight requests finish first and the weights reload.

        The tokenizer stays: the versions one deployment swaps between share it. Requests still
        open after ``drain_seconds`` are clients reading slowly; their tokens were generated
        (vLLM pauses in "wait" mode) or are generated (HF keeps its model object) by the old
        weights, so their version tags stay true and the swap goes ahead.
        """
        model_dir, base = str(model_dir), str(base_dir or model_dir)
        async with self._swap_lock:
            started = time.perf_counter()
            if base == self.base_dir:  # same base weights: only the adapter changes
                adapter = await self._adapter_for(model_dir, version, base_dir)
                self.model_dir, self.version, self._adapter = model_dir, version, adapter
                SWAP_SECONDS.labels(kind="adapter").observe(time.perf_counter() - started)
                return
            self._open.clear()
            try:
                await self.drain()
                await self._within_deadline(self._reload(base), version)
                self.base_dir, self._adapter = base, None
                adapter = await self._adapter_for(model_dir, version, base_dir)
                self.model_dir, self.version, self._adapter = model_dir, version, adapter
                SWAP_SECONDS.labels(kind="weights").observe(time.perf_counter() - started)
            finally:
                self._open.set()
