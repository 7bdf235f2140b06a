"""Health and Prometheus metrics (no API key: load balancers and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve import health as checks
from serve import metrics
from serve.protocol import HealthResponse

router = APIRouter()


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "A required part is down."}},
)
async def health(request: Request) -> JSONResponse:
    result = await checks.check(request.app.state)
    status = 503 if result.failing else 200
    return JSONResponse(result.model_dump(mode="json", exclude_none=True), status_code=status)


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
