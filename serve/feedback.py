"""Rankings in: ``POST /v1/feedback`` becomes one event on the feedback stream.

``FeedbackService`` (async, API process) turns a ranking into one self-contained
``serve.events.FeedbackEvent``. The candidates' text, the prompt and the version come from the
stored completion, never from the client, so a ranking cannot be forged into training data. A
ranking costs two round trips to Redis, each one Lua script (shared with concurrent requests'
scripts in one pipeline, ``serve.store.PipelinedScripts``): the first logs the post in the rate
limit and reads the completion; the second checks for a duplicate, appends the event, counts
it for the loop trigger and, for a mixed slate of online A/B, records its cross-version pairs
(``serve.ab``), atomically: two racing posts of the same (completion, identity) store
exactly one event, and the event is in Redis before the 201 goes out. The learner's side of the
stream is ``serve.events.FeedbackLog``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

import orjson
import redis.asyncio as aioredis

from serve.ab import KEEP_RANKINGS, mixed_record
from serve.ab import RANKINGS as AB_RANKINGS
from serve.events import (
    SINCE_ROUND,
    STREAM,
    FeedbackEvent,
    count_pairs,
    normalise_ranking,
    ranking_problem,
)
from serve.loop_trigger import CLAIM_ROUND_LUA, LoopTrigger
from serve.protocol import ErrorResponse, FeedbackRequest, FeedbackResponse
from serve.settings import Settings
from serve.store import (
    RATE_WINDOW_LUA,
    Completion,
    PipelinedScripts,
    completion_key,
    key,
    rate_window_key,
)

logger = logging.getLogger(__name__)

# Log one post in the sender's sliding rate-limit window and read the completion it ranks.
# KEYS: window, completion; ARGV: now, the post's id. Answers {posts in the window, completion
# JSON or nil}. A script rather than a MULTI pipeline: the same single round trip, at a
# fraction of the client's CPU (one command to pack and one reply to parse, not seven).
_ADMIT = (
    RATE_WINDOW_LUA
    + """
return {rate_window(KEYS[1], tonumber(ARGV[1]), ARGV[2]), redis.call('GET', KEYS[2])}
"""
)

# Refuse a second ranking of (completion, identity), or append the event, count it for the loop
# trigger and (a mixed slate of online A/B: ARGV[5] not empty) append its cross-version pairs
# to the A/B list, keeping its newest ARGV[6], atomically: all or nothing. KEYS: dedupe,
# stream, loop counter, A/B list; ARGV: event JSON, event id, dedupe TTL, round_every, pairs
# record or "", A/B list length kept. Answers {1, entry id, 1 if this ranking claimed a round}
# or {0, the earlier event id, 0}. The XADD comes first so that a failing XADD leaves no dedupe
# key behind (the user may retry) and counts nothing. The same call run twice (redis-py resends
# a command whose reply a dropped connection lost) finds its own event id and answers stored,
# so the user gets 201 for their ranking, not 409; the retry claims no round a second time.
STORE_ONCE_LUA = (
    CLAIM_ROUND_LUA
    + """
local previous = redis.call('GET', KEYS[1])
if previous == ARGV[2] then
  return {1, previous, 0}
elseif previous then
  return {0, previous, 0}
end
local entry = redis.call('XADD', KEYS[2], '*', 'event', ARGV[1])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ARGV[5] and ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[5])
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[6]), -1)
end
return {1, entry, claim_round(KEYS[3], tonumber(ARGV[4]))}
"""
)


def _error(status: int, message: str, param: str | None, code: str) -> ErrorResponse:
    kind = {404: "not_found_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    return ErrorResponse.make(status, message, type=kind, param=param, code=code)


class FeedbackService:
    """The logic behind ``POST /v1/feedback`` (the route only parses and serialises)."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        on_mixed_ranking: Callable[[], None] | None = None,
    ) -> None:
        """``on_mixed_ranking`` is called after storing a ranking of a mixed slate (the A/B
        referee's cue)."""
        self.client = client
        self.settings = settings
        self.on_mixed_ranking = on_mixed_ranking
        self._scripts = PipelinedScripts(client)
        self._admit_script = self._scripts.register(_ADMIT)
        self._store_once = self._scripts.register(STORE_ONCE_LUA)
        self.trigger = LoopTrigger(client, settings)

    async def _admit(
        self, identity: str, completion_id: str, post_id: str
    ) -> tuple[bool, Completion | None]:
        """Log post ``post_id`` by ``identity`` and fetch the completion it ranks, in one round
        trip. Returns whether ``identity`` made more than the limit in the last minute (a
        sliding window, ``RATE_WINDOW_LUA``), and the stored completion (None if missing or
        expired)."""
        window = rate_window_key("feedback", identity)
        count, raw = await self._scripts.run(
            self._admit_script, [window, completion_key(completion_id)], [time.time(), post_id]
        )
        return count > self.settings.feedback_rate, Completion.from_json(raw) if raw else None

    async def submit(
        self, request: FeedbackRequest, identity: str
    ) -> FeedbackResponse | ErrorResponse:
        """Validate ``request`` against its stored completion and store it as one event.

        ``identity`` is who sent it, as the server established (``serve.identity``): the one
        ranking per completion, the rate limit and the event's ``identity`` are that, whatever
        ``user`` label the request carries.
        """
        post_id = secrets.token_hex(16)  # the post's entry in the rate limit, and its event's id
        over_rate, completion = await self._admit(identity, request.completion_id, post_id)
        if over_rate:
            return _error(
                429,
                f"more than {self.settings.feedback_rate} rankings per minute from this API key "
                "or address; retry in a minute",
                None,
                "rate_limit_exceeded",
            )
        if request.comment is not None and len(request.comment) > self.settings.max_comment_chars:
            return _error(
                413,
                f"comment is {len(request.comment)} characters; the limit is "
                f"{self.settings.max_comment_chars}",
                "comment",
                "comment_too_long",
            )
        if completion is None or (self.settings.api_keys and completion.identity != identity):
            # Someone else's completion is reported as missing, so ids cannot be probed.
            return _error(
                404,
                f"completion {request.completion_id!r} does not exist or has expired",
                "completion_id",
                "completion_not_found",
            )
        groups = normalise_ranking(request.ranking)
        problem = ranking_problem(groups, len(completion.candidates), request.all_bad)
        if problem:
            return _error(422, problem, "ranking", "invalid_ranking")

        user = request.user if request.user is not None else completion.user
        versions = completion.candidate_versions()
        event: FeedbackEvent = {
            "id": f"fb-{post_id}",
            "completion_id": completion.id,
            "messages": completion.messages,
            "candidates": completion.candidates,
            "ranking": groups,
            "all_bad": request.all_bad,
            "user": user,
            "identity": identity,
            "comment": request.comment,
            "version": completion.version,
            "versions": versions,
            "time": time.time(),
        }
        dedupe = key("ranked", completion.id, identity)
        mixed = mixed_record(event["id"], groups, versions) if len(set(versions)) > 1 else ""
        stored, value, claimed_round = await self._scripts.run(
            self._store_once,
            [dedupe, STREAM, SINCE_ROUND, AB_RANKINGS],
            [
                orjson.dumps(event),
                event["id"],
                self.settings.completion_ttl,
                self.settings.round_every,
                mixed,
                KEEP_RANKINGS,
            ],
        )
        if not stored:
            return _error(
                409,
                f"completion {completion.id!r} was already ranked by this API key or address "
                f"(ranking {value})",
                "completion_id",
                "already_ranked",
            )
        if mixed and self.on_mixed_ranking is not None:
            self.on_mixed_ranking()
        if claimed_round:
            try:
                await self.trigger.send_claimed_round()
            except Exception:  # the ranking is stored: answer 201 whatever became of the round
                logger.exception("loop trigger failed after storing ranking %s", event["id"])
        return FeedbackResponse(id=event["id"], pairs=count_pairs(groups))
