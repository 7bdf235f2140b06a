"""OpenAI-compatible routes: chat completions and the model list."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from serve.errors import APIError, error_json, error_responses, retry_headers
from serve.guards import request_identity, require_client_key
from serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

router = APIRouter(
    prefix="/v1", dependencies=[Depends(require_client_key)], responses=error_responses(401)
)

# One server-sent event as a schema-driven client parses it (each ``data`` is a chunk's JSON).
SSE_EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}

COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ChatCompletionResponse,
        "description": "The completion; with `stream: true`, server-sent events of "
        "ChatCompletionChunk ending in `data: [DONE]`.",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    },
    **error_responses(404, 429, 503),
}

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and so its generation) if the client disconnects."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone
    return task.result()


@router.post("/chat/completions", response_model=None, responses=COMPLETION_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, identity: str = Depends(request_identity)
) -> Response:
    try:
        result = await until_disconnect(
            request, request.app.state.chat.create_chat_completion(body, identity)
        )
    except ClientGone:
        return Response(status_code=499)
    if isinstance(result, ErrorResponse):
        return error_json(result, retry_headers(result))
    if hasattr(result, "__aiter__"):
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.model_dump())


def _served(request: Request) -> ModelCard:
    app = request.app
    return ModelCard(id=app.state.settings.model_name, created=int(app.state.started_at))


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_served(request)])


@router.get("/models/{model}", responses=error_responses(404))
async def get_model(model: str, request: Request) -> ModelCard:
    card = _served(request)
    if model != card.id:
        raise APIError(
            404, f"The model {model!r} does not exist.", param="model", code="model_not_found"
        )
    return card


unknown_v1 = APIRouter(include_in_schema=False)


@unknown_v1.api_route(
    "/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], response_model=None
)
async def unknown_endpoint(path: str, request: Request) -> NoReturn:
    """The rest of ``/v1``: a 404 naming the path, or a 405 naming the methods the path allows.
    Every other unknown path gets the app-wide handler's bare "Not Found" / "Method Not Allowed",
    in the same shape; OpenAI clients get these more helpful messages."""
    allowed = sorted(
        method
        for route in request.app.routes
        if isinstance(route, APIRoute)
        and route.endpoint is not unknown_endpoint
        and route.path_regex.match(request.url.path)
        for method in route.methods
    )
    if allowed:
        raise APIError(
            405,
            f"{request.method} is not allowed on {request.url.path} (use {', '.join(allowed)}).",
            headers={"Allow": ", ".join(allowed)},
        )
    raise APIError(404, f"Unknown endpoint {request.url.path}.", type="not_found_error")
