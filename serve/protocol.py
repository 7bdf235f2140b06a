"""OpenAI chat-completions schemas: what clients send and receive, and nothing else.

Limits that do not depend on the deployment are ``Field`` constraints, so a bad request is
rejected with the field named before any work is done. The one conversion to engine terms,
:meth:`ChatCompletionRequest.sampling_options`, lives on the request schema.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from serve.engine.base import SamplingOptions, TokenLogprobs, TokenPieces

Role = Literal["system", "user", "assistant"]


def _encodable(text: str) -> str:
    """JSON may carry a lone surrogate (``"\\ud800"``), which is no character: it cannot be
    stored, tokenized or sent back as UTF-8, so it is refused here with its field named."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"not valid Unicode text (a lone surrogate at index {exc.start})"
        raise ValueError(message) from None
    return text


# Every free text a client sends: valid Unicode, so nothing downstream fails on it.
Text = Annotated[str, AfterValidator(_encodable)]

# Candidate i samples with seed + i, so seed + 16 must stay a valid 64-bit seed; and the bound
# must be exact in a double (JSON Schema numbers are doubles to most readers: with 2**63 - 65 a
# schema-driven client computed its own limit as 2**63 and sent seeds this server refused).
SEED_MAX = 2**53 - 1


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body, as it is sent (and documented in ``/openapi.json``)."""

    error: ErrorInfo


class ErrorResponse(ErrorBody):
    """An error to send: the body and ``status_code``, the HTTP status (not part of the body)."""

    status_code: int = Field(default=400, exclude=True)

    @classmethod
    def make(
        cls,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> ErrorResponse:
        return cls(
            error=ErrorInfo(message=message, type=type, param=param, code=code),
            status_code=status_code,
        )


class StrictBody(BaseModel):
    """A request body: strict types, so ``"n": true`` or ``"top_logprobs": false`` is a 422
    naming the field, not a 1 or a 0 (a schema-violating request is refused, not reinterpreted).
    Unknown extra fields are ignored, as OpenAI's SDKs expect."""

    model_config = ConfigDict(strict=True)


class TextPart(StrictBody):
    """A text content part (``content`` may be a list of these, as the OpenAI API allows)."""

    type: Literal["text"]
    text: Text


class ChatMessage(StrictBody):
    role: Role
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(StrictBody):
    include_usage: bool = False


class JSONSchemaFormat(StrictBody):
    """``response_format.json_schema``, as OpenAI defines it. The answer always follows the
    schema (constrained decoding), so ``strict`` changes nothing."""

    name: Text = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    """``response_format``: ``text``, or JSON (an object, or what ``json_schema`` describes) on
    the vLLM engine; the HF engine refuses JSON (``Engine.unsupported``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs json_schema (its name and schema)")
        return self

    def schema_text(self) -> str | None:
        """The JSON Schema (as JSON text) the answer must follow, or None for plain text;
        ``json_object`` asks for any JSON object."""
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.type == "json_schema" and self.json_schema is not None:
            return json.dumps(self.json_schema.schema_)
        return None


class ChatCompletionRequest(StrictBody):
    """``POST /v1/chat/completions``. Unknown extra fields are ignored, as OpenAI's SDKs expect.

    ``n`` is bounded here by what any deployment allows; the serving layer applies the
    configured ``max_n``. ``tools`` and ``tool_choice`` are declared so that asking for what
    this server cannot do is refused naming the field (:meth:`unsupported`) instead of being
    ignored with a 200; so is a JSON ``response_format`` on an engine without constrained
    decoding (``Engine.unsupported``).
    """

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "model": "loopchat",
                    "messages": [{"role": "user", "content": "What is 12 + 30?"}],
                    "n": 2,
                    "max_tokens": 8,
                },
                {
                    "model": "loopchat",
                    "messages": [{"role": "user", "content": "Hello!"}],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ]
        },
    )

    model: Text = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    n: int | None = Field(default=None, ge=1, le=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(default=None, max_length=256)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    @field_validator("temperature")
    @classmethod
    def _sampled_when_several(cls, value: float | None, info: ValidationInfo) -> float | None:
        """Greedy decoding gives one answer: n > 1 identical candidates cannot be ranked."""
        if value == 0 and (info.data.get("n") or 1) > 1:
            raise ValueError("must be above 0 when n > 1 (greedy candidates are all the same)")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        """As OpenAI: alternatives are part of the logprobs, which must be asked for."""
        if value and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return value

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, why)`` for the first thing asked that this server does not do, or None.

        The served models are plain chat models without tool calls.
        """
        if self.tools or self.tool_choice not in (None, "none"):
            param = "tools" if self.tools else "tool_choice"
            return param, "tool calls are not supported by this server's models"
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (current name) or ``max_tokens`` (older name)."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def prompt_messages(self) -> list[dict[str, str]]:
        """Plain role/content dicts: what the chat template renders and the store keeps."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def sampling_options(self, max_tokens: int) -> SamplingOptions:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingOptions(
            n=self.n or 1,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=max_tokens,
            stop=tuple(s for s in stop if s),
            seed=self.seed,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            json_schema=self.response_format.schema_text() if self.response_format else None,
        )


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


# OpenAI's floor for a log-probability (JSON has no -Infinity): a token the grammar forbids
LOGPROB_FLOOR = -9999.0


class TopLogprob(BaseModel):
    """A token and its log-probability; ``bytes`` are its exact UTF-8 bytes (a token may hold
    part of a character: joining the bytes of an answer's tokens gives its text)."""

    token: str
    logprob: float = Field(ge=LOGPROB_FLOOR, le=0)
    bytes: list[int] | None

    @classmethod
    def of(cls, token_id: int, logprob: float, pieces: TokenPieces, **more: Any) -> Self:
        token, raw = pieces(token_id)
        return cls(token=token, logprob=min(0.0, max(logprob, LOGPROB_FLOOR)), bytes=raw, **more)


class TokenLogprob(TopLogprob):
    """One token of an answer, with the ``top_logprobs`` most likely tokens at its position."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """``choices[i].logprobs``: one entry per token of the answer's text, in order (special
    tokens such as the end of turn are no text and are left out). The log-probabilities are
    the model's own distribution, before temperature and top_p, on both engines."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None

    @classmethod
    def of(cls, steps: Iterable[TokenLogprobs], pieces: TokenPieces) -> ChoiceLogprobs:
        content = [
            TokenLogprob.of(
                step.token_id,
                step.logprob,
                pieces,
                top_logprobs=[TopLogprob.of(t, lp, pieces) for t, lp in step.top],
            )
            for step in steps
            if step.token_id not in pieces.special
        ]
        return cls(content=content)


class Choice(BaseModel):
    """One answer; ``version`` (an extension field) is the checkpoint that wrote it — in a
    mixed slate of online A/B not necessarily ``system_fingerprint``, which stays live's."""

    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    version: str | None = None


class ChatCompletionResponse(BaseModel):
    """The reply; ``id`` is the completion id feedback refers to, ``system_fingerprint`` the
    live checkpoint version (each choice's ``version`` says which one wrote it)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None  # of the tokens whose text this chunk brings
    version: str | None = None  # the checkpoint writing this choice (as on ``Choice``)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loopchat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackRequest(StrictBody):
    """``POST /v1/feedback``: candidate indices best to worst; an inner list is a tie group.

    Whether the indices fit the completion (each once, none missing) is checked against the
    stored completion by ``serve.feedback``; the comment's length limit is a setting.
    """

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "examples": [{"completion_id": "chatcmpl-…", "ranking": [[1], [0]], "user": "me"}]
        },
    )

    completion_id: Text = Field(min_length=1, max_length=128)
    ranking: list[StrictInt | list[StrictInt]] = Field(max_length=64)
    all_bad: bool = False
    user: Text | None = Field(default=None, max_length=256)
    comment: Text | None = None


class FeedbackResponse(BaseModel):
    """The stored ranking's id and how many (better, worse) pairs it gives the reward model."""

    id: str
    pairs: int


class HealthPart(BaseModel):
    """One part of the service in ``GET /health``; a ``required`` part that is ``down`` makes
    the answer a 503."""

    status: Literal["ok", "down"]
    required: bool = True
    detail: str | None = None
    workers: int | None = Field(default=None, description="Live learning workers (worker part).")


class HealthResponse(BaseModel):
    """``GET /health``: 200 with every part ok, 503 naming the ``failing`` parts (also as an
    OpenAI-shaped ``error`` whose ``param`` is the first of them)."""

    status: Literal["ok", "unavailable"]
    version: str
    engine: str
    parts: dict[str, HealthPart]
    failing: list[str] = Field(default_factory=list)
    error: ErrorInfo | None = None
