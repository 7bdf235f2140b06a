"""The FastAPI application: routes, error shape, and the lifespan that wires the shared state.

``create_app(settings)`` builds the app; its lifespan connects Redis (embedded when no URL is
configured), makes sure the registry has a live version (the first start registers the
configured or built-in model), starts the engine on it and exposes on ``app.state``:
``settings``, ``redis`` (async client), ``redis_url``, ``registry``, ``engine``, ``chat``.
Things that start with the app are entered into one exit stack, so they stop in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from serve.engine import make_engine
from serve.errors import install_error_handlers
from serve.feedback import FeedbackService
from serve.guards import BodySizeLimit
from serve.hotswap import following_live
from serve.registry import Registry
from serve.routes import admin, feedback, health, openai
from serve.serving import ChatService
from serve.settings import Settings
from serve.store import CompletionStore, async_client, resolve_redis_url, sync_client

log = logging.getLogger("loopchat.serve")


def initial_model(settings: Settings) -> Path:
    """The model to register when nothing is live yet: ``--model``, else the built-in one."""
    if settings.model:
        return Path(settings.model)
    from learn.builtin import ensure_builtin_model  # trains once on first use, then cached

    return ensure_builtin_model(settings.data_dir)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        app.state.redis_url = url = resolve_redis_url(settings)
        app.state.redis = async_client(url)
        stack.push_async_callback(app.state.redis.aclose)
        await app.state.redis.ping()

        registry = Registry.from_settings(settings, sync_client(url))
        stack.callback(registry.client.close)
        app.state.registry = registry
        model_dir = await asyncio.to_thread(initial_model, settings)
        version, local_dir = await asyncio.to_thread(registry.ensure_live, model_dir)

        engine = make_engine(settings.engine, local_dir, version, settings)
        await engine.start()
        stack.push_async_callback(engine.shutdown)
        app.state.engine = engine
        app.state.chat = ChatService(
            engine, CompletionStore(app.state.redis, settings.completion_ttl), settings
        )
        app.state.feedback = FeedbackService(app.state.redis, settings)
        await stack.enter_async_context(following_live(registry, engine, app.state.redis))
        app.state.started_at = time.time()
        log.info("serving %s (%s engine) from %s", version, engine.name, local_dir)
        yield


def create_app(settings: Settings | None = None) -> FastAPI:
    """The loopchat API (and, mounted by ``ui``, its pages) for ``settings``."""
    settings = settings or Settings()
    app = FastAPI(title="loopchat", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(feedback.router)  # first: the busiest route, matched before the others
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(openai.unknown_v1)  # after every /v1 router: OpenAI-shaped 404/405
    from ui.ops import mount_ops  # gradio: imported only when an app is built

    mount_ops(app)  # before any page mounted at "/", which would shadow /ops
    from ui.chat import mount_chat

    mount_chat(app)  # last: the mount at "/" catches every path not matched above
    return app
