"""``POST /v1/feedback``: a user's best-to-worst ranking of a completion's candidates.

The logic (validation against the stored completion, dedupe, rate limit, the stream write) is
:class:`serve.feedback.FeedbackService`, shared with the chat page.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serve.errors import error_json, error_responses
from serve.guards import request_identity
from serve.protocol import ErrorResponse, FeedbackRequest, FeedbackResponse

router = APIRouter(prefix="/v1", tags=["feedback"])


@router.post(
    "/feedback",
    status_code=201,
    response_model=FeedbackResponse,
    responses=error_responses(401, 404, 409, 429),
)
async def post_feedback(
    body: FeedbackRequest, request: Request, identity: str = Depends(request_identity)
) -> JSONResponse:
    result = await request.app.state.feedback.submit(body, identity)
    if isinstance(result, ErrorResponse):
        return error_json(result)
    return JSONResponse(result.model_dump(), status_code=201)
