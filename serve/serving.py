"""Chat completions: from a validated request to a response, an error, or an SSE stream.

The HTTP route and the Gradio page both call :meth:`ChatService.create_chat_completion`, so a
completion is rendered, generated, counted and stored the same way whoever asked. A completion
is stored (all candidates, the prompt, the version) before the client receives the end of the
answer, so a ranking that follows can always find it.

Rendering the chat template and tokenizing run in a thread: a prompt as long as the body limit
allows takes a noticeable time to tokenize, and on the event loop it would stall every other
request meanwhile. An engine with ``LOOPCHAT_MAX_WAITING`` requests waiting already refuses the
next one (``serve.engine.base.EngineBusy``): that is a 503 (``Retry-After`` set by the route),
before any answer starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import numpy as np
from jinja2 import TemplateError

from serve import metrics
from serve.arena import split_slate
from serve.engine.base import (
    Delta,
    Engine,
    EngineBusy,
    EngineRequestError,
    SamplingOptions,
    TokenLogprobs,
    Usage,
)
from serve.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    ErrorResponse,
    UsageInfo,
)
from serve.settings import Settings
from serve.store import (
    RATE_WINDOW_LUA,
    Completion,
    CompletionStore,
    PipelinedScripts,
    rate_window_key,
)

log = logging.getLogger("loopchat.serve")

ChatResult = ChatCompletionResponse | ErrorResponse | AsyncGenerator[str, None]


@dataclass
class _Job:
    """One request that passed every check, and what has been generated for it so far."""

    id: str
    request: ChatCompletionRequest
    identity: str
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    options: SamplingOptions
    version: str
    candidate_slots: frozenset[int] = frozenset()  # answers the A/B candidate writes
    texts: list[str] = field(init=False)
    finish: list[str | None] = field(init=False)
    versions: list[str] = field(init=False)
    logprobs: list[list[TokenLogprobs]] = field(init=False)  # each answer's, when asked
    usage: Usage = field(init=False)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        n = self.options.n
        self.texts, self.finish, self.versions = [""] * n, [None] * n, [self.version] * n
        self.logprobs = [[] for _ in range(n)]
        self.usage = Usage(prompt_tokens=len(self.prompt_ids))

    def add(self, delta: Delta) -> None:
        self.texts[delta.index] += delta.text
        self.logprobs[delta.index] += delta.logprobs
        self.usage.completion_tokens += delta.tokens
        self.versions[delta.index] = delta.version
        if delta.index not in self.candidate_slots:
            self.version = delta.version
        if delta.finish_reason is not None:
            self.finish[delta.index] = delta.finish_reason
        if self.first_token_at is None and delta.text:
            self.first_token_at = time.monotonic()

    def completion(self) -> Completion:
        return Completion(
            id=self.id,
            messages=self.messages,
            candidates=self.texts,
            version=self.version,
            user=self.request.user,
            identity=self.identity,
            versions=self.versions,
        )


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


# KEYS: the identity's window; ARGV: now, the request's id. Answers requests in the window.
_CHAT_ADMIT = RATE_WINDOW_LUA + "return rate_window(KEYS[1], tonumber(ARGV[1]), ARGV[2])"


async def merge_deltas(
    parts: list[tuple[AsyncIterator[Delta], list[int]]],
) -> AsyncGenerator[Delta, None]:
    """Deltas of several engines' streams as they come, each renumbered to its answer's slot
    (``slots[i]`` for a stream's candidate ``i``). A failing stream fails the merge; closing it
    closes (and so aborts) every stream. A pump waits while the queue is full, so the merge holds
    as many deltas as it has streams: a slow reader's backlog stays in the engines (each bounds
    its own)."""
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue(maxsize=len(parts))

    async def pump(stream: AsyncIterator[Delta], slots: list[int]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    await queue.put(replace(delta, index=slots[delta.index]))
        except Exception as exc:
            await queue.put(exc)
        else:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(stream, slots)) for stream, slots in parts]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ChatService:
    """Serves chat completions from one engine and records every completion in the store.

    With ``candidate`` (online A/B), a share ``ab_share`` of requests for several answers gets
    a mixed slate: some answers from the candidate's engine, the rest from live's, in random
    slots (``serve.arena.split_slate``), each answer tagged with its version.
    """

    def __init__(
        self,
        engine: Engine,
        store: CompletionStore,
        settings: Settings,
        candidate: Callable[[], Engine | None] | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.candidate = candidate
        self._rng = np.random.default_rng()
        self._scripts = PipelinedScripts(store.client)
        self._admit = self._scripts.register(_CHAT_ADMIT)

    async def create_chat_completion(
        self, request: ChatCompletionRequest, identity: str
    ) -> ChatResult:
        """A full response, an error, or (``stream=True``) SSE strings ending in ``[DONE]``.

        ``identity`` is who asks (``serve.identity``): the rate limit counts it, and the stored
        completion records it so that only the same identity can rank it when keys are on.
        """
        job = await self._over_rate(identity) or await self._prepare(request, identity)
        if isinstance(job, _Job) and (refused := await self.engine.unsupported(job.options)):
            job = _unsupported(*refused)
        if isinstance(job, ErrorResponse):
            metrics.REQUESTS.labels(outcome="error").inc()
            return job
        try:
            deltas = self._deltas(job)
        except EngineBusy as exc:
            metrics.REQUESTS.labels(outcome="busy").inc()
            return ErrorResponse.make(
                503,
                f"The server is busy ({exc}); retry shortly.",
                type="server_error",
                code="server_busy",
            )
        if request.stream:
            return self._stream(job, deltas)
        try:
            return await self._complete(job, deltas)
        except EngineRequestError as exc:
            return ErrorResponse.make(400, str(exc), code="invalid_parameters")

    def _deltas(self, job: _Job) -> AsyncIterator[Delta]:
        """Live's answers, or (a ranked turn drawn for A/B) a mixed slate of live's and the
        candidate's; the job learns which slots are the candidate's. JSON output asked of a
        candidate engine that cannot constrain its answers is live's alone."""
        candidate = self.candidate() if self.candidate is not None else None
        n = job.options.n
        if (
            candidate is None
            or n < 2
            or candidate.version == self.engine.version
            or candidate.busy()  # A/B is optional: the turn goes to live alone
            or (job.options.json_schema is not None and not candidate.json_output)
            or self._rng.random() >= self.settings.ab_share
        ):
            return self.engine.generate(job.id, job.prompt_ids, job.options)
        live_slots, candidate_slots = split_slate(n, self._rng)
        job.candidate_slots = frozenset(candidate_slots)
        seed = job.options.seed
        live_options = replace(job.options, n=len(live_slots))
        candidate_options = replace(
            job.options,
            n=len(candidate_slots),
            seed=None if seed is None else seed + len(live_slots),  # no answer shares a seed
        )
        return merge_deltas(
            [
                (self.engine.generate(job.id, job.prompt_ids, live_options), live_slots),
                (
                    candidate.generate(f"{job.id}-ab", job.prompt_ids, candidate_options),
                    candidate_slots,
                ),
            ]
        )

    async def _over_rate(self, identity: str) -> ErrorResponse | None:
        """A 429 when ``identity`` made more than ``chat_rate`` requests in the last minute."""
        window = rate_window_key("chat", identity)
        count = await self._scripts.run(self._admit, [window], [time.time(), uuid.uuid4().hex])
        if count <= self.settings.chat_rate:
            return None
        return ErrorResponse.make(
            429,
            f"more than {self.settings.chat_rate} chat requests per minute from this API key or "
            "address; retry in a minute",
            type="rate_limit_error",
            code="rate_limit_exceeded",
        )

    async def _prepare(self, request: ChatCompletionRequest, identity: str) -> _Job | ErrorResponse:
        if request.model != self.settings.model_name:
            return ErrorResponse.make(
                404,
                f"The model {request.model!r} does not exist; this server serves "
                f"{self.settings.model_name!r}.",
                param="model",
                code="model_not_found",
            )
        if unsupported := request.unsupported():
            return _unsupported(*unsupported)
        if (request.n or 1) > self.settings.max_n:
            return ErrorResponse.make(
                422,
                f"n: at most {self.settings.max_n} candidates per request.",
                param="n",
                code="less_than_equal",
            )
        messages = request.prompt_messages()
        try:
            prompt_ids = await asyncio.to_thread(self._tokenize, messages)
        except TemplateError as exc:
            return ErrorResponse.make(400, f"messages: cannot render: {exc}", param="messages")
        max_tokens = self._max_tokens(request, len(prompt_ids))
        if isinstance(max_tokens, ErrorResponse):
            return max_tokens
        job_id = f"chatcmpl-{uuid.uuid4().hex}"
        return _Job(
            job_id,
            request,
            identity,
            messages,
            prompt_ids,
            request.sampling_options(max_tokens),
            self.engine.version,
        )

    def _tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids, rendered with the chat template (in a worker thread)."""
        tokenizer = self.engine.tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def _max_tokens(self, request: ChatCompletionRequest, prompt_len: int) -> int | ErrorResponse:
        """Tokens to generate: as asked (or the default, capped by the room left in context)."""
        room = self.engine.max_model_len - prompt_len
        asked = request.requested_max_tokens
        if room < 1 or (asked is not None and asked > room):
            wants = f" plus {asked} completion tokens" if asked is not None else ""
            return ErrorResponse.make(
                400,
                f"This model's maximum context length is {self.engine.max_model_len} tokens; "
                f"the messages have {prompt_len} tokens{wants}. Shorten the conversation"
                + (" or ask for fewer tokens." if asked is not None else "."),
                param="max_tokens" if room >= 1 else "messages",
                code="context_length_exceeded",
            )
        return asked if asked is not None else min(self.settings.max_tokens_default, room)

    async def _generate(self, job: _Job, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """Run the engine into ``job``; store the completion before the caller sees the end.

        The delta that finishes the last candidate is held until the completion is stored: a
        client that ranks as soon as it sees every ``finish_reason`` finds the completion.
        """
        outcome = "aborted"
        stored = -1  # how many deltas the stored completion holds
        added = 0
        try:
            async with aclosing(deltas):
                async for delta in deltas:
                    job.add(delta)
                    added += 1
                    if delta.finish_reason is not None and None not in job.finish:
                        await self.store.save(job.completion())
                        stored = added
                    yield delta
            if stored != added:
                await self.store.save(job.completion())
            outcome = "ok"
        finally:
            metrics.REQUESTS.labels(outcome=outcome).inc()
            if outcome == "ok":
                metrics.PROMPT_TOKENS.inc(job.usage.prompt_tokens)
                metrics.COMPLETION_TOKENS.inc(job.usage.completion_tokens)
                stream = "true" if job.request.stream else "false"
                metrics.LATENCY.labels(stream=stream).observe(time.monotonic() - job.started)
                if job.first_token_at is not None:
                    metrics.TIME_TO_FIRST_TOKEN.observe(job.first_token_at - job.started)

    async def _complete(self, job: _Job, deltas: AsyncIterator[Delta]) -> ChatCompletionResponse:
        async with aclosing(self._generate(job, deltas)) as events:
            async for _ in events:
                pass
        return ChatCompletionResponse(
            id=job.id,
            model=self.settings.model_name,
            system_fingerprint=job.version,
            choices=[
                Choice(
                    index=i,
                    message=AssistantMessage(content=text),
                    finish_reason=reason,
                    logprobs=self._logprobs(job, steps),
                    version=version,
                )
                for i, (text, reason, version, steps) in enumerate(
                    zip(job.texts, job.finish, job.versions, job.logprobs, strict=True)
                )
            ],
            usage=_usage(job.usage),
        )

    def _logprobs(self, job: _Job, steps: list[TokenLogprobs]) -> ChoiceLogprobs | None:
        """A choice's ``logprobs`` from its tokens' (None unless the request asked)."""
        if job.options.logprobs is None:
            return None
        return ChoiceLogprobs.of(steps, self.engine.pieces)

    async def _stream(self, job: _Job, deltas: AsyncIterator[Delta]) -> AsyncGenerator[str, None]:
        """A chunk per delta that brings text or an end, with the logprobs of the tokens since
        the answer's previous chunk (a token whose text is held back comes with the chunk that
        shows it)."""
        created = int(time.time())
        announced: set[int] = set()
        pending: list[list[TokenLogprobs]] = [[] for _ in range(job.options.n)]

        def chunk(choices: list[ChunkChoice], usage: UsageInfo | None = None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=job.id,
                    created=created,
                    model=self.settings.model_name,
                    system_fingerprint=job.version,
                    choices=choices,
                    usage=usage,
                ).model_dump_json()
            )

        try:
            async with aclosing(self._generate(job, deltas)) as events:
                async for delta in events:
                    if delta.index not in announced:  # OpenAI's order: the role comes first
                        announced.add(delta.index)
                        role = DeltaMessage(role="assistant", content="")
                        first = ChunkChoice(index=delta.index, delta=role, version=delta.version)
                        yield chunk([first])
                    pending[delta.index] += delta.logprobs
                    if delta.text or delta.finish_reason:
                        content = DeltaMessage(content=delta.text)
                        choice = ChunkChoice(
                            index=delta.index,
                            delta=content,
                            finish_reason=delta.finish_reason,
                            logprobs=self._logprobs(job, pending[delta.index]),
                            version=delta.version,
                        )
                        pending[delta.index] = []
                        yield chunk([choice])
        except EngineRequestError as exc:  # the status line is sent: report in the stream
            yield sse(
                ErrorResponse.make(400, str(exc), code="invalid_parameters").model_dump_json()
            )
        except Exception:
            log.exception("chat completion %s failed while streaming", job.id)
            error = ErrorResponse.make(
                500, "Generation failed (details are in the server log).", type="server_error"
            )
            yield sse(error.model_dump_json())
        else:
            if job.request.include_usage:
                yield chunk([], _usage(job.usage))
        yield sse("[DONE]")


def _unsupported(param: str, why: str) -> ErrorResponse:
    """The 400 for something asked that this server (or its engine) does not do."""
    return ErrorResponse.make(400, f"{param}: {why}.", param=param, code="unsupported_parameter")


def _usage(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )
