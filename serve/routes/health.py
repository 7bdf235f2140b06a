"""Liveness and Prometheus metrics (no API key: load balancers and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve import metrics

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    engine = request.app.state.engine
    return {"status": "ok", "version": engine.version, "engine": engine.name}


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}
    },
)
async def prometheus_metrics(request: Request) -> Response:
    metrics.set_live_version(request.app.state.engine.version)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
