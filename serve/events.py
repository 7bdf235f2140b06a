"""What crosses from serve/ to learn/: the feedback event, rankings, and the loop's Redis keys.

The API writes one :class:`FeedbackEvent` per ranking to the Stream ``loopchat:feedback``
(``serve.feedback``); the learner reads it back through :class:`FeedbackLog`, records its
rounds under ``loopchat:loop:*`` and, after each round, trims the stream to its retention
(:meth:`FeedbackLog.trim`: never a ranking the learner still needs). Both sides take the
event's shape, the ranking rules and every key name from here, so they cannot drift apart.
Nothing here imports training code or FastAPI.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, NotRequired, TypedDict

import redis

from serve.store import key

Messages = list[dict[str, str]]


class FeedbackEvent(TypedDict):
    """One ranking, self-contained: everything a learner needs, with no completion to look up
    (completions expire; rankings are training data for good)."""

    id: str  # "fb-<hex>", also the dedupe value of (completion, identity)
    completion_id: str
    messages: Messages  # the prompt conversation the candidates answer
    candidates: list[str]  # the answers' text, from the stored completion (never the client)
    ranking: list[list[int]]  # best-to-worst tie groups of candidate indices
    all_bad: bool
    user: str | None  # the client's label (free to choose: not who sent it)
    identity: str  # who sent it (serve.identity): a key's hash or an address; absent in old events
    comment: str | None
    version: str  # live's checkpoint when the candidates were produced (system_fingerprint)
    versions: NotRequired[list[str]]  # per candidate (two in an A/B mixed slate); older: none
    time: float  # unix time of the ranking


# --- the feedback stream and the loop's keys ---------------------------------------------------

STREAM = key("feedback")  # the Stream of FeedbackEvents, one per ranking
TRIMMED = key("feedback", "trimmed")  # counter: rankings trimmed from the stream (all-time totals)
GROUP = "learner"  # the consumer group learning rounds read through
SINCE_ROUND = key("loop", "since_round")  # rankings since the last triggered round
ROUNDS = key("loop", "rounds")  # JSON round records, oldest first
LAST_ID = key("loop", "last_id")  # newest stream id a committed round consumed
COUNTED = key("loop", "counted")  # stream ids committed but not yet acked
ROUND_LOCK = key("loop", "lock")  # one round at a time
HELDOUT = key("loop", "heldout")  # JSON ids the last round held out: the next one trains on them
LEARNER_STATE = key("loop", "learner")  # JSON {learner, version, history}: where to continue
UNUSABLE = key("loop", "unusable")  # hash: consumed rankings that order nothing, by reason
WORKERS = key("workers")  # sorted set: learning worker name -> unix time of its last heartbeat

MISSED_BEATS = 3  # a worker whose last heartbeat is older than this many intervals is dead


def stream_order(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream entry id ``"<ms>-<seq>"``."""
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def round_key(round_id: str) -> str:
    """The committed record of one round (what makes a redelivered round a replay)."""
    return key("loop", "round", round_id)


# --- rankings ---------------------------------------------------------------------------------


def normalise_ranking(ranking: list[int | list[int]]) -> list[list[int]]:
    """Best-to-worst tie groups: a bare index is a group of one (a flat list means no ties)."""
    return [list(item) if isinstance(item, list) else [item] for item in ranking]


def ranking_problem(groups: list[list[int]], n_candidates: int, all_bad: bool) -> str | None:
    """What is wrong with a ranking of ``n_candidates`` candidates, or None when it is valid.

    A ranking names every candidate exactly once; an empty ranking is only allowed as
    "all bad" (nothing to order, but still a signal).
    """
    if not groups:
        if all_bad:
            return None
        return "ranking is empty; send a best-to-worst order, or [] with all_bad: true"
    valid = f"the completion has {n_candidates} candidates, indices 0..{n_candidates - 1}"
    seen: set[int] = set()
    for position, group in enumerate(groups):
        if not group:
            return f"ranking[{position}] is an empty tie group"
        for index in group:
            if not 0 <= index < n_candidates:
                return f"ranking names candidate {index}, but {valid}"
            if index in seen:
                return f"ranking names candidate {index} more than once"
            seen.add(index)
    missing = sorted(set(range(n_candidates)) - seen)
    if missing:
        names = ", ".join(map(str, missing))
        return f"ranking is missing candidate(s) {names}; {valid}, each named exactly once"
    return None


def ranking_pairs(groups: list[list[int]]) -> Iterator[tuple[int, int]]:
    """(better, worse) candidate pairs a ranking implies; members of one tie group give none."""
    for position, better_group in enumerate(groups):
        for worse_group in groups[position + 1 :]:
            for better in better_group:
                for worse in worse_group:
                    yield better, worse


def count_pairs(groups: list[list[int]]) -> int:
    return sum(1 for _ in ranking_pairs(groups))


def has_preference(event: FeedbackEvent) -> bool:
    """Whether a ranking orders at least two answers (all-bad or all-tied rankings don't)."""
    return next(ranking_pairs(normalise_ranking(event["ranking"])), None) is not None


def unusable_reason(event: FeedbackEvent) -> str | None:
    """Why a ranking cannot train a pairwise learner (``all_bad``, ``all_tied``), or None.

    Such rankings are still stored and counted (``feedback stats``, the ops page): they say
    something about the answers, just nothing about which is better.
    """
    if has_preference(event):
        return None
    return "all_bad" if event.get("all_bad") else "all_tied"


# --- reading the stream -------------------------------------------------------------------------

TRIM_PAGE = 1000  # most rankings one trim script drops (it holds them in Redis's memory meanwhile)

# Drop the oldest rankings beyond the newest ARGV[1], only among those older than ARGV[2] (the
# oldest the learner still needs), at most ARGV[3] at once, and count them in KEYS[2]. KEYS:
# stream, trimmed counter. Answers how many went. The victims are exactly the oldest ones, so
# an exact MAXLEN drops them and nothing else (entries added meanwhile are newer).
_TRIM_LUA = """
local length = redis.call('XLEN', KEYS[1])
local excess = length - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local old = redis.call('XRANGE', KEYS[1], '-', '(' .. ARGV[2], 'COUNT',
                       math.min(excess, tonumber(ARGV[3])))
if #old == 0 then return 0 end
local dropped = redis.call('XTRIM', KEYS[1], 'MAXLEN', length - #old)
redis.call('INCRBY', KEYS[2], dropped)
return dropped
"""


class FeedbackLog:
    """The learner's view of the feedback stream, through the consumer group ``learner``.

    Entries are ``(stream entry id, event dict)``. ``client`` must decode responses
    (``serve.store.sync_client``). The stream keeps the newest rankings up to its retention
    (:meth:`trim`); ``trimmed`` counts the ones dropped, so all-time totals survive trimming.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str = STREAM,
        group: str = GROUP,
        trimmed: str = TRIMMED,
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.trimmed = trimmed
        self._trim = client.register_script(_TRIM_LUA)

    def ensure_group(self) -> None:
        """Create the group (and the stream) if missing; starts from the first ranking ever."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @staticmethod
    def _decode(
        entries: list[tuple[str, dict[str, str] | None]],
    ) -> list[tuple[str, FeedbackEvent]]:
        return [(entry_id, json.loads(fields["event"])) for entry_id, fields in entries if fields]

    def _in_group(self, command: Callable[[], Any]) -> Any:
        """Run a group command, creating the group first if Redis does not know it (yet)."""
        try:
            return command()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        self.ensure_group()
        return command()

    def read_new(
        self, consumer: str, count: int, block_ms: int | None = None
    ) -> list[tuple[str, FeedbackEvent]]:
        """Entries never delivered to the group; they stay pending for ``consumer`` until acked."""
        reply = self._in_group(
            partial(
                self.client.xreadgroup,
                self.group,
                consumer,
                {self.stream: ">"},
                count=count,
                block=block_ms,
            )
        )
        return self._decode(reply[0][1]) if reply else []

    def reclaim(self, consumer: str, min_idle_ms: int) -> list[tuple[str, FeedbackEvent]]:
        """Take over every entry another consumer has held unacked for ``min_idle_ms``."""
        claimed: list[tuple[str, FeedbackEvent]] = []
        cursor = "0-0"
        while True:
            reply = self._in_group(
                partial(
                    self.client.xautoclaim,
                    self.stream,
                    self.group,
                    consumer,
                    min_idle_ms,
                    start_id=cursor,
                    count=100,
                )
            )
            cursor, entries = reply[0], reply[1]
            claimed += self._decode(entries)
            if cursor == "0-0":
                return claimed

    def ack(self, ids: list[str]) -> int:
        """Mark entries as used; returns how many were pending."""
        return self.client.xack(self.stream, self.group, *ids) if ids else 0

    def events(
        self, start: str = "-", end: str = "+", count: int | None = None
    ) -> list[tuple[str, FeedbackEvent]]:
        """Stored rankings in stream order (all of them by default), regardless of the group."""
        return self._decode(self.client.xrange(self.stream, start, end, count=count))

    def iter_events(self, page: int = 1000) -> Iterator[tuple[str, FeedbackEvent]]:
        """Every stored ranking, read ``page`` at a time so a long stream never sits in memory."""
        start = "-"
        while batch := self.events(start, "+", count=page):
            yield from batch
            start = f"({batch[-1][0]}"

    def get(self, entry_ids: Iterable[str]) -> list[tuple[str, FeedbackEvent]]:
        """The stored rankings of ``entry_ids`` (those still kept), in stream order."""
        wanted = sorted(set(entry_ids), key=stream_order)
        with self.client.pipeline(transaction=False) as pipe:
            for entry_id in wanted:
                pipe.xrange(self.stream, entry_id, entry_id, count=1)
            replies = pipe.execute() if wanted else []
        return [entry for reply in replies for entry in self._decode(reply)]

    def newest(self, count: int, page: int = 1000) -> list[tuple[str, FeedbackEvent]]:
        """The newest ``count`` rankings, oldest first, read from the end ``page`` at a time."""
        entries: list[tuple[str, dict[str, str] | None]] = []
        end = "+"
        while len(entries) < count:
            want = min(page, count - len(entries))
            batch = self.client.xrevrange(self.stream, end, "-", count=want)
            entries += batch
            if len(batch) < want:
                break
            end = f"({batch[-1][0]}"
        return self._decode(entries[::-1])

    def length(self) -> int:
        """Rankings the stream keeps now."""
        return self.client.xlen(self.stream)

    def trimmed_count(self) -> int:
        """Rankings trimmed from the stream beyond its retention, ever."""
        return int(self.client.get(self.trimmed) or 0)

    def total(self) -> int:
        """Rankings ever stored: those kept plus those trimmed (one consistent reading)."""
        with self.client.pipeline(transaction=True) as pipe:
            length, trimmed = pipe.xlen(self.stream).get(self.trimmed).execute()
        return length + int(trimmed or 0)

    def oldest_needed(self, keep_ids: Iterable[str] = ()) -> str | None:
        """The oldest entry id the learning group still needs, or None when it needs them all.

        Needed: what is pending in the group (delivered, not acked: a dead round's), what was
        never delivered to it, and ``keep_ids`` (rankings a committed round held out, which the
        next one trains on). With no group yet nothing was consumed, so every entry is needed.
        """
        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:  # no stream yet
            return None
        group = next((g for g in groups if g["name"] == self.group), None)
        if group is None:
            return None
        ms, seq = stream_order(group["last-delivered-id"])
        needed = [f"{ms}-{seq + 1}", *keep_ids]  # the first id after the last one delivered
        if group["pending"]:
            needed.append(self.client.xpending(self.stream, self.group)["min"])
        return min(needed, key=stream_order)

    def trim(self, keep: int, keep_ids: Iterable[str] = ()) -> int:
        """Drop the oldest rankings beyond the newest ``keep``, but none the learner still needs
        (:meth:`oldest_needed`): the stream may stay longer than ``keep`` until it has consumed
        them. Returns how many were dropped; they are added to the ``trimmed`` counter in the
        same step, so :meth:`total` never goes down."""
        oldest = self.oldest_needed(keep_ids)
        if oldest is None:
            return 0
        dropped = 0
        while step := int(self._trim([self.stream, self.trimmed], [keep, oldest, TRIM_PAGE])):
            dropped += step
        return dropped
