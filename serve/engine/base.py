"""The engine interface: what the serving layer needs from vLLM or transformers, and no more.

Both engines take a rendered prompt (token ids) and stream :class:`Delta` objects, one candidate
text piece at a time. The base class owns what must behave identically whichever engine runs:
hot swap. A swap closes the door to new requests, waits until every request admitted under the
old weights has finished (so none fails and none mixes two versions), lets the engine load the
new weights, then reopens. Every delta carries the version that was live when its request was
admitted, which is the version that produced all of its tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from serve.settings import Settings

log = logging.getLogger("loopchat.serve")


class EngineRequestError(ValueError):
    """The engine refused a request's parameters: the client's mistake (answered 400)."""


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


@dataclass(frozen=True)
class Delta:
    """New output of one candidate: text since its previous delta, and how it ended (if it did)."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None
    version: str


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
    """Requests admitted and not finished yet; a swap waits for this to reach zero."""

    active: int = 0
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


class Engine(ABC):
    """A text generator over one checkpoint at a time, swappable while it serves."""

    name: str
    drain_seconds: float = 30.0

    def __init__(self, model_dir: str | Path, version: str, settings: Settings) -> None:
        self.model_dir = str(model_dir)
        self.version = version
        self.settings = settings
        self.max_model_len = context_length(model_dir, settings)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(model_dir)
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

    @abstractmethod
    def _stream(
        self, request_id: str, prompt_ids: list[int], options: SamplingOptions
    ) -> AsyncGenerator[tuple[int, str, int, str | None], None]:
        """Raw deltas ``(index, text, new tokens, finish_reason)`` of every candidate."""

    @abstractmethod
    async def _reload(self, model_dir: str) -> None:
        """Replace the weights with those in ``model_dir``; called with no request running."""

    async def generate(
        self, request_id: str, prompt_ids: list[int], options: SamplingOptions
    ) -> AsyncIterator[Delta]:
        """Stream the candidates' deltas, each tagged with the version generating them.

        Closing or cancelling the iterator (client disconnect) aborts the request.
        """
        if options.n > 1 and options.temperature == 0:
            raise EngineRequestError("n > 1 needs temperature > 0 (greedy answers are all equal)")
        await self._open.wait()
        version = self.version
        self._admitted.enter()
        stream = self._stream(request_id, prompt_ids, options)
        finished = False
        try:
            async for index, text, tokens, reason in stream:
                yield Delta(index, text, tokens, reason, version)
            finished = True
        finally:
            try:
                await stream.aclose()
                if not finished:
                    await self.abort(request_id)
            finally:
                self._admitted.leave()

    async def swap(self, model_dir: str | Path, version: str) -> None:
        """Serve ``model_dir`` as ``version`` from now on; in-flight requests finish first.

        The tokenizer stays: the versions one deployment swaps between share it. Requests still
        open after ``drain_seconds`` are clients reading slowly; their tokens were generated
        (vLLM pauses in "wait" mode) or are generated (HF keeps its model object) by the old
        weights, so their version tags stay true and the swap goes ahead.
        """
        async with self._swap_lock:
            self._open.clear()
            try:
                try:
                    await asyncio.wait_for(self._admitted.idle.wait(), self.drain_seconds)
                except TimeoutError:
                    log.warning("swapping with %d slow readers still open", self._admitted.active)
                # A load that hangs (a stuck mount, a wedged engine) must not hold requests
                # back for ever: they wait for the swap, so it gets a deadline.
                try:
                    await asyncio.wait_for(
                        self._reload(str(model_dir)), self.settings.swap_timeout_s
                    )
                except TimeoutError:
                    raise SwapTimeout(
                        f"loading {version} took over {self.settings.swap_timeout_s:g} s; "
                        f"still serving {self.version}"
                    ) from None
                self.model_dir, self.version = str(model_dir), version
            finally:
                self._open.set()
