"""What the pages must not allow that Gradio allows by default.

- **CORS.** Gradio's own middleware answers any ``Origin`` with ``Access-Control-Allow-Origin``
  echoed back whenever the host is not ``localhost``, so on a deployed host any web site could
  drive the pages in a visitor's browser. It stands aside when the parent app has a Starlette
  ``CORSMiddleware``; one that allows no origin leaves only same-origin use (the pages' own).
- **Uploads.** ``POST <page>/gradio_api/upload`` stores any file anyone sends, without a
  login; no component of these pages takes a file, so the route is refused.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import error_json
from serve.protocol import ErrorResponse


class NoUploads:
    """ASGI middleware: 403 for Gradio's upload routes under ``prefix``."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix.rstrip("/") + "/gradio_api/upload"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            refused = ErrorResponse.make(
                403,
                "uploads are not accepted: no page here takes a file",
                type="permission_error",
                code="uploads_disabled",
            )
            await error_json(refused)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def lock_down(app: FastAPI, prefix: str) -> None:
    """Before mounting a page at ``prefix``: same-origin only, and no uploads."""
    if not any(m.cls is CORSMiddleware for m in app.user_middleware):
        app.add_middleware(CORSMiddleware, allow_origins=[])
    app.add_middleware(NoUploads, prefix=prefix)
