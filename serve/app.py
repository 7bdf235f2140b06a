"""The FastAPI application: routes, error shape, and the lifespan that wires the shared state.

``create_app(settings, pages=..., default_model=...)`` builds the app; its lifespan connects
Redis (embedded when no URL is configured), makes sure the registry has a live version (the first
start registers the configured or default model), starts the engine on it and exposes on
``app.state``: ``settings``, ``redis`` (async client), ``redis_url``, ``registry``, ``engine``,
``candidate`` (the online A/B candidate's engine holder), ``chat``, ``feedback`` (and, from
creation, ``login_throttle``: wrong admin tokens per address). Things that start with the app
are entered into one exit stack, so they stop in reverse order.

This module imports nothing above ``serve``: the pages (``ui``) and the built-in model
(``learn``) are handed in by the composition root, ``loopchat up`` (``serve.cli.up.build_app``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI

from serve.ab import Referee, RefereeTask
from serve.admin import LoginThrottle
from serve.engine import make_engine
from serve.errors import install_error_handlers
from serve.feedback import FeedbackService
from serve.guards import BodySizeLimit
from serve.hotswap import CandidateFollower, following_live
from serve.registry import Registry
from serve.routes import admin, feedback, health, openai
from serve.serving import ChatService
from serve.settings import Settings
from serve.store import CompletionStore, async_client, resolve_redis_url, sync_client

log = logging.getLogger("loopchat.serve")

PageMounter = Callable[[FastAPI], None]
"""Mounts one page (or a set of routes) on the app, under a path of its own."""

ModelSource = Callable[[Settings], Path]
"""The directory of the model to serve on a first start, when no model is configured."""


def initial_model(settings: Settings, default_model: ModelSource | None) -> Path:
    """The model to register when nothing is live yet: ``settings.model``, else the default."""
    if settings.model:
        return Path(settings.model)
    if default_model is None:
        raise RuntimeError(
            "no version is live and no model is configured: "
            "set LOOPCHAT_MODEL (loopchat up --model DIR) to the model to serve first"
        )
    return default_model(settings)


@asynccontextmanager
async def lifespan(app: FastAPI, default_model: ModelSource | None) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        app.state.redis_url = url = resolve_redis_url(settings)
        app.state.redis = async_client(url)
        stack.push_async_callback(app.state.redis.aclose)
        await app.state.redis.ping()

        registry = Registry.from_settings(settings, sync_client(url))
        stack.callback(registry.client.close)
        app.state.registry = registry
        first_model = partial(initial_model, settings, default_model)  # only if nothing is live
        version, local_dir = await asyncio.to_thread(registry.ensure_live, first_model)

        base_dir = await asyncio.to_thread(registry.base_path, version)  # adapter versions
        engine = make_engine(settings.engine, local_dir, version, settings, base_dir)
        await engine.start()
        stack.push_async_callback(engine.shutdown)
        app.state.engine = engine
        # Online A/B: a second (transformers) engine on the gate-passed candidate, if any.
        candidate = CandidateFollower(
            registry, settings, lambda d, v, b: make_engine("hf", d, v, settings, b)
        )
        stack.push_async_callback(candidate.aclose)
        app.state.candidate = candidate
        app.state.chat = ChatService(
            engine,
            CompletionStore(app.state.redis, settings.completion_ttl),
            settings,
            candidate=lambda: candidate.engine,
        )
        referee = RefereeTask(Referee(registry, settings))
        stack.push_async_callback(referee.aclose)
        app.state.feedback = FeedbackService(
            app.state.redis,
            settings,
            on_mixed_ranking=referee.poke if settings.auto_promote else None,
        )
        await stack.enter_async_context(
            following_live(registry, engine, app.state.redis, candidate=candidate)
        )
        app.state.started_at = time.time()
        log.info("serving %s (%s engine) from %s", version, engine.name, local_dir)
        yield


def create_app(
    settings: Settings | None = None,
    *,
    pages: Sequence[PageMounter] = (),
    default_model: ModelSource | None = None,
) -> FastAPI:
    """The loopchat API for ``settings``, with ``pages`` mounted beside it.

    Without pages it is the API alone (what in-process tests use). ``default_model`` gives the
    model to register on a first start when ``settings.model`` is unset; with neither, such a
    start fails with a message saying what to configure.
    """
    settings = settings or Settings()
    app = FastAPI(
        title="loopchat", version="0.1.0", lifespan=partial(lifespan, default_model=default_model)
    )
    app.state.settings = settings
    app.state.login_throttle = LoginThrottle(settings.admin_login_failures)
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.include_router(feedback.router)  # first: the busiest route, matched before the others
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(openai.unknown_v1)  # after every /v1 router: it matches all of /v1/*
    for mount in pages:  # each under a path of its own: their order does not matter
        mount(app)
    return app
