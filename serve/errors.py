"""Every error leaves the API in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``

Handlers here turn request-parsing failures, unknown routes, raised :class:`APIError` and
anything unexpected into that shape, so a client never sees a stack trace or an HTML page. A
Redis that is down, restarting or refusing writes is a 503 with ``Retry-After`` (a moment's
outage, not a server bug), and so is a chat request that finds the engine's waiting room full.
Schema violations are 422 and name the field in ``param``; a body that is not JSON is 400.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.logsafe import printable
from serve.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("loopchat.serve")


class APIError(Exception):
    """Raised by routes and dependencies to answer with an OpenAI-shaped error."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.response = ErrorResponse.make(status_code, message, type=type, param=param, code=code)
        self.headers = headers or {}


ERROR_MEANINGS = {
    400: "Bad request: a body that is not JSON, or a parameter this server does not support.",
    401: "Missing or wrong bearer token.",
    403: "Wrong admin token, or admin access disabled.",
    404: "Unknown model, completion, version or endpoint.",
    409: "Conflict: already ranked; a promotion or rollback refused.",
    413: "The request body or comment is over its limit.",
    422: "A field is invalid (``param`` names it).",
    429: "Over this API key's (or address's) rate limit.",
    503: "Busy or briefly unavailable (the engine's waiting room is full, or Redis is "
    "restarting): retry after `Retry-After` seconds.",
}

RETRY_AFTER = {"Retry-After": "1"}  # a 503's: a full waiting room or a Redis restart clears soon


def retry_headers(error: ErrorResponse) -> dict[str, str] | None:
    """``Retry-After`` for a 503 (worth retrying in a moment), nothing for other errors."""
    return RETRY_AFTER if error.status_code == 503 else None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for routes that may answer these statuses, in OpenAI's error shape
    (body-parsing failures, 400/413/422, are possible on every route and always included)."""
    return {
        status: {"model": ErrorBody, "description": ERROR_MEANINGS[status]}
        for status in sorted({400, 413, 422, *statuses})
    }


def error_json(error: ErrorResponse, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.model_dump(), status_code=error.status_code, headers=headers)


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"`` (OpenAI's param style).

    Parts naming a member of a union type (``str``, ``list[str]``) are not fields and are left out.
    """
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in UNION_TAGS:
            path += f".{part}" if path else part
    return path or None


UNION_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def validation_error(exc: RequestValidationError) -> ErrorResponse:
    # a union reports one error per member; "not a string" says less than "too many items"
    first = min(exc.errors(), key=lambda e: str(e.get("type", "")).endswith("_type"))
    if first.get("type") == "json_invalid":
        return ErrorResponse.make(
            400,
            f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
            code="invalid_json",
        )
    param = field_path(tuple(first.get("loc", ())))
    if param is None and first.get("type") == "missing":
        return ErrorResponse.make(422, "A JSON request body is required.", code="missing_body")
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return ErrorResponse.make(422, message, param=param, code=first.get("type"))


# Replies of a Redis that is loading its data, refusing writes after a failed snapshot
# (stop-writes-on-bgsave-error), out of memory under noeviction, or a read-only replica.
_REFUSALS = ("LOADING", "MISCONF", "OOM", "READONLY")


def storage_unavailable(exc: redis.RedisError) -> bool:
    """Whether ``exc`` means Redis cannot be used right now (worth a retry), not a bug."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_REFUSALS)


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.response.status_code == 401 else {}
        return error_json(exc.response, {**headers, **exc.headers})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_json(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = ErrorResponse.make(exc.status_code, str(exc.detail), type=kind)
        return error_json(error, dict(exc.headers or {}))

    @app.exception_handler(redis.RedisError)
    async def _storage(request: Request, exc: redis.RedisError) -> JSONResponse:
        if not storage_unavailable(exc):
            return await _unexpected(request, exc)
        log.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, exc)
        error = ErrorResponse.make(
            503,
            "Storage is unavailable for a moment (Redis is restarting or refusing writes); "
            "nothing was stored by this request unless a retry finds it. Retry shortly.",
            type="server_error",
            code="storage_unavailable",
        )
        return error_json(error, RETRY_AFTER)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, printable(request.url.path))
        error = ErrorResponse.make(
            500, "Internal server error (details are in the server log).", type="server_error"
        )
        return error_json(error)
