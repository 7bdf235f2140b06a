"""Request guards shared by every route: client API keys, the caller's identity and the
request body's size and time."""

from __future__ import annotations

import asyncio

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import APIError, error_json
from serve.identity import client_identity, matching_key
from serve.protocol import ErrorResponse


async def require_client_key(request: Request) -> str | None:
    """FastAPI dependency: the caller's API key (``Authorization: Bearer …``), or None when
    ``LOOPCHAT_API_KEYS`` is unset. A wrong or missing key is a 401.

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency in a worker
    thread, and that hop per request was a tenth of the feedback route's CPU time.
    """
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent
    sent = token.strip().encode("latin-1")
    key = matching_key(sent, keys) if scheme.lower() == "bearer" else None
    if key is not None:
        return key
    raise APIError(
        401,
        "Missing or incorrect API key: send `Authorization: Bearer <key>`.",
        code="invalid_api_key",
    )


async def request_identity(
    request: Request, api_key: str | None = Depends(require_client_key)
) -> str:
    """FastAPI dependency: who the request is from (``serve.identity``): the API key's hash, or
    the client address when keys are off. What dedupe, rate limits and learning caps count."""
    return client_identity(api_key, request.client.host if request.client else None)


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before any route runs,
    one that has not fully arrived within ``timeout_s`` is answered 408.

    The body is read up to the limit and replayed to the app, so chunked uploads without a
    Content-Length are bounded too; later ``receive`` calls (disconnects) pass straight through.
    The deadline covers the whole body: a client trickling a byte at a time (slowloris) holds a
    connection and its buffer for ``timeout_s`` at most.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(
                    receive(), deadline - asyncio.get_running_loop().time()
                )
            except TimeoutError:
                await self._too_slow(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ErrorResponse.make(
            413,
            f"The request body is larger than the limit of {self.max_bytes} bytes.",
            code="request_too_large",
        )
        await error_json(error)(scope, receive, send)

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ErrorResponse.make(
            408,
            f"The request body did not arrive within {self.timeout_s:g} seconds.",
            code="request_timeout",
        )
        await error_json(error, {"Connection": "close"})(scope, receive, send)
