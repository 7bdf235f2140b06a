"""``/admin/*``: checkpoints, promotion, rollback, the A/B leaderboard and the learning loop.

Every route needs ``Authorization: Bearer <LOOPCHAT_ADMIN_TOKEN>`` (401 without, 403 wrong, 403
when no token is configured). The logic is :class:`serve.admin.AdminService`, shared with the
``/ops`` page and the CLI. Routes are plain ``def``: registry calls block (sync Redis, the
checkpoint store), so FastAPI runs them in its thread pool, off the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from serve.admin import AdminAuthError, AdminService
from serve.errors import APIError, error_responses
from serve.protocol import StrictBody, Text
from serve.registry import (
    NoPrevious,
    PromotionRefused,
    ReasonRequired,
    RegistryError,
    UnknownVersion,
)


def require_admin(request: Request) -> None:
    """Dependency: the caller presents the admin token (and has not guessed wrong too often)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else None
    address = request.client.host if request.client else "unknown"
    try:
        request.app.state.login_throttle.check(
            request.app.state.settings.admin_token, presented, address
        )
    except AdminAuthError as exc:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(exc.status)
        code = "too_many_failures" if exc.status == 429 else "invalid_admin_token"
        raise APIError(exc.status, str(exc), type=kind or "permission_error", code=code) from None


def admin_service(request: Request) -> AdminService:
    return AdminService(request.app.state.registry, request.app.state.settings)


Admin = Annotated[AdminService, Depends(admin_service)]


router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=error_responses(401, 403, 429),
)


class AdminAction(StrictBody):
    """Optional body of rollback and unpin: who and why, kept in the registry's history."""

    reason: Text = Field(default="", max_length=1000)
    by: Text = Field(default="admin", min_length=1, max_length=100)


class PromoteAction(AdminAction):
    """Optional body of promote. ``force`` promotes past a failed or missing gate (never past
    non-finite weights); it needs a ``reason`` and is marked ``forced`` in the history."""

    force: bool = False


def registry_error(exc: RegistryError) -> APIError:
    """404 for an unknown version, 409 for a refused promotion or rollback, 400 otherwise."""
    if isinstance(exc, UnknownVersion):
        return APIError(404, str(exc), type="not_found_error", param="version", code=exc.code)
    if isinstance(exc, ReasonRequired):
        return APIError(400, str(exc), param="reason", code=exc.code)
    status = 409 if isinstance(exc, PromotionRefused | NoPrevious) else 400
    return APIError(status, str(exc), param="version", code=exc.code)


def operator(request: Request, action: AdminAction) -> str:
    """Who acts, for the history: the body's ``by`` and the address it came from (the admin
    token is shared, so the address is what tells two holders apart)."""
    address = request.client.host if request.client else "unknown"
    return f"{action.by}@{address}"


@router.get("/checkpoints")
def list_checkpoints(admin: Admin) -> dict[str, Any]:
    return admin.checkpoints()


@router.post("/checkpoints/{version}/promote", responses=error_responses(404, 409))
def promote(
    version: str,
    admin: Admin,
    request: Request,
    body: PromoteAction | None = None,
    force: Annotated[bool, Query(description="the same as the body's force")] = False,
) -> dict[str, Any]:
    action = body or PromoteAction()
    try:
        return admin.promote(
            version, by=operator(request, action), reason=action.reason, force=action.force or force
        )
    except RegistryError as exc:
        raise registry_error(exc) from None


@router.post("/rollback", responses=error_responses(409))
def rollback(admin: Admin, request: Request, body: AdminAction | None = None) -> dict[str, Any]:
    action = body or AdminAction()
    try:
        return admin.rollback(by=operator(request, action), reason=action.reason)
    except RegistryError as exc:
        raise registry_error(exc) from None


@router.post("/unpin")
def unpin(admin: Admin, request: Request, body: AdminAction | None = None) -> dict[str, Any]:
    """Lift a rollback's pin: automatic promotion (the loop's auto-promote) may resume."""
    action = body or AdminAction()
    return admin.unpin(by=operator(request, action), reason=action.reason)


@router.get("/history")
def history(admin: Admin) -> list[dict]:
    return admin.history()


@router.get("/leaderboard")
def leaderboard(admin: Admin) -> dict[str, Any]:
    return admin.leaderboard()


@router.get("/loop")
def loop(
    admin: Admin,
    rounds: Annotated[int, Query(ge=0, le=1000, description="recent round records")] = 20,
) -> dict[str, Any]:
    return admin.loop_status(rounds)
