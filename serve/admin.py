"""What an operator can see and do: the logic behind ``/admin/*``, the ``/ops`` page and the CLI.

All three front ends call these functions, so a promotion means the same thing whichever one an
operator uses, and the page never touches Redis itself. Everything here is blocking (sync Redis,
the registry's store): routes run it in FastAPI's thread pool.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

from serve.ab import leaderboard
from serve.events import ROUND_LOCK, ROUNDS, SINCE_ROUND, UNUSABLE, FeedbackLog
from serve.registry import Registry
from serve.settings import Settings

# Written by the learning loop (``learn/loop.py`` documents the round record); read here only.

VERSION_FIELDS = ("version", "kind", "parent", "created_at", "metrics", "gate")


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (strict JSON has neither).

    A diverged training run reports NaN metrics; they must not make the admin API fail.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class AdminAuthError(Exception):
    """The caller is not the operator: ``status`` 401 (no token) or 403 (wrong / none set)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_admin_token(configured: str | None, presented: str | None) -> None:
    """Raise ``AdminAuthError`` unless ``presented`` is the configured admin token.

    With no token configured the admin surface is closed rather than open: an operator must
    choose a token before anyone can promote weights in front of users.
    """
    if not configured:
        raise AdminAuthError(
            403, "admin access is disabled: set LOOPCHAT_ADMIN_TOKEN to enable /admin and /ops"
        )
    if not presented:
        raise AdminAuthError(401, "missing admin token (Authorization: Bearer <token>)")
    if not secrets.compare_digest(presented.encode(), configured.encode()):
        raise AdminAuthError(403, "wrong admin token")


class LoginThrottle:
    """Wrong admin tokens per client address, in this process: after ``limit`` in a minute,
    the address is refused (429, whatever token it presents) until the oldest leaves the
    minute. Guessing the token from one address then takes ``limit`` tries a minute."""

    WINDOW_S = 60.0

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float]:
        failures = self._failures.setdefault(address, deque())
        while failures and failures[0] <= self.clock() - self.WINDOW_S:
            failures.popleft()
        if not failures:
            del self._failures[address]  # the map holds only addresses failing right now
        return failures

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: it may now)."""
        failures = self._recent(address)
        if len(failures) < self.limit:
            return 0.0
        return failures[0] + self.WINDOW_S - self.clock()

    def check(self, configured: str | None, presented: str | None, address: str) -> None:
        """:func:`check_admin_token`, refused with 429 while ``address`` is throttled; a wrong
        or missing token counts against it."""
        wait = self.retry_after(address)
        if wait > 0:
            raise AdminAuthError(
                429, f"too many wrong admin tokens from this address; retry in {wait:.0f} s"
            )
        try:
            check_admin_token(configured, presented)
        except AdminAuthError:
            if configured and presented:  # a guess (no token, or access disabled, is none)
                self._failures.setdefault(address, deque()).append(self.clock())
            raise


class AdminService:
    """Checkpoints, promotion, rollback and the learning loop's progress."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    @property
    def client(self) -> redis.Redis:
        return self.registry.client

    def checkpoints(self) -> dict[str, Any]:
        """Aliases, the pin and every version, oldest first (``GET /admin/checkpoints``)."""
        versions = [{f: m.get(f) for f in VERSION_FIELDS} for m in self.registry.versions()]
        return json_safe(
            {**self.registry.aliases(), "pin": self.registry.pin(), "versions": versions}
        )

    def state(self) -> dict[str, Any]:
        """The aliases and the pin: what promote, rollback and unpin answer."""
        return {**self.registry.aliases(), "pin": self.registry.pin()}

    def promote(self, version: str, *, by: str, reason: str, force: bool = False) -> dict[str, Any]:
        """An operator makes ``version`` live (lifting any pin); returns the state after.
        Registry errors propagate (a missing or failed gate without ``force``, ...)."""
        self.registry.promote(version, by=by, reason=reason, force=force)
        return self.state()

    def rollback(self, *, by: str, reason: str) -> dict[str, Any]:
        """Make the previous version live again, pinned; returns the state after."""
        self.registry.rollback(by=by, reason=reason)
        return self.state()

    def unpin(self, *, by: str, reason: str) -> dict[str, Any]:
        """Let automatic promotion resume; returns the state after."""
        self.registry.unpin(by=by, reason=reason)
        return self.state()

    def history(self) -> list[dict]:
        """Every change of the live version, oldest first."""
        return self.registry.history()

    def leaderboard(self) -> dict[str, Any]:
        """Versions by Bradley–Terry strength from mixed slates, the candidate's win-rate test
        and the recent A/B decisions (the ``GET /admin/leaderboard`` body, ``serve.ab``)."""
        return json_safe(leaderboard(self.registry, self.settings))

    def _last_done_round(self, page: int = 50) -> dict | None:
        """The newest completed round record, read back from the end a page at a time."""
        end = -1
        while batch := self.client.lrange(ROUNDS, end - page + 1, end):
            for raw in reversed(batch):
                if (record := json.loads(raw)).get("status") == "done":
                    return record
            end -= page
        return None

    def loop_status(self, rounds: int = 20) -> dict[str, Any]:
        """Rankings since the last round and the last ``rounds`` round records, oldest first.

        Rankings ever stored (those the stream keeps plus those trimmed beyond its retention)
        only grow, so the ones that arrived after the last completed round are that total
        minus the round's ``rankings_total``.
        """
        total = FeedbackLog(self.client).total()
        records = [json.loads(r) for r in self.client.lrange(ROUNDS, -rounds, -1)] if rounds else []
        last_done = self._last_done_round()
        since = total - last_done["rankings_total"] if last_done else total
        counted = int(self.client.get(SINCE_ROUND) or 0)
        return json_safe(
            {
                "rankings_total": total,
                "rankings_since_last_round": max(0, since),
                "round_every": self.settings.round_every,
                "next_round_in": max(0, self.settings.round_every - counted),
                "round_running": bool(self.client.exists(ROUND_LOCK)),
                "auto_promote": self.settings.auto_promote,
                "learner": self.settings.learner,
                "rankings_unusable": {k: int(v) for k, v in self.client.hgetall(UNUSABLE).items()},
                "rounds": records,
            }
        )
