"""The learner's consumer-group view of the feedback stream (contract 2), on the real Redis."""

from __future__ import annotations

import time

from serve.events import GROUP, STREAM, FeedbackLog
from serve.store import sync_client
from tests.serve.feedback_helpers import make_completion, store_rankings


def _store(redis_url: str, count: int) -> list[str]:
    """Store ``count`` rankings; returns their feedback ids in order."""
    items = [(make_completion(3, user=f"u{i}"), {"ranking": [2, 0, 1]}) for i in range(count)]
    return [r.id for r in store_rankings(redis_url, items)]


def test_read_new_delivers_each_ranking_once_and_ack_clears_pending(redis_url: str) -> None:
    ids = _store(redis_url, 5)  # stored before the group exists: the group still sees them
    client = sync_client(redis_url)
    log = FeedbackLog(client)
    log.ensure_group()
    log.ensure_group()  # idempotent

    first = log.read_new("worker-1", count=3)
    rest = log.read_new("worker-1", count=10)
    assert [event["id"] for _, event in first + rest] == ids
    assert log.read_new("worker-1", count=10, block_ms=50) == []
    assert client.xpending(STREAM, GROUP)["pending"] == 5

    assert log.ack([entry_id for entry_id, _ in first]) == 3
    assert client.xpending(STREAM, GROUP)["pending"] == 2
    assert log.ack([]) == 0


def test_read_new_creates_the_group_when_missing(redis_url: str) -> None:
    _store(redis_url, 2)
    log = FeedbackLog(sync_client(redis_url))
    assert len(log.read_new("worker-1", count=10)) == 2


def test_reclaim_takes_over_what_a_dead_consumer_held(redis_url: str) -> None:
    ids = _store(redis_url, 4)
    client = sync_client(redis_url)
    log = FeedbackLog(client)
    dead = log.read_new("dead-worker", count=10)
    log.ack([dead[0][0]])  # it finished one ranking, then died holding three

    assert log.read_new("live-worker", count=10) == []  # new reads never see them again
    assert log.reclaim("live-worker", min_idle_ms=60_000) == []  # not idle long enough yet
    time.sleep(0.2)
    reclaimed = log.reclaim("live-worker", min_idle_ms=100)
    assert [event["id"] for _, event in reclaimed] == ids[1:]
    consumers = {c["name"]: c["pending"] for c in client.xinfo_consumers(STREAM, GROUP)}
    assert consumers == {"dead-worker": 0, "live-worker": 3}

    log.ack([entry_id for entry_id, _ in reclaimed])
    assert client.xpending(STREAM, GROUP)["pending"] == 0


def test_events_and_length_see_every_ranking_whatever_the_group_did(redis_url: str) -> None:
    ids = _store(redis_url, 5)
    log = FeedbackLog(sync_client(redis_url))
    log.ack([entry_id for entry_id, _ in log.read_new("worker-1", count=10)])

    assert log.length() == 5
    everything = log.events()
    assert [event["id"] for _, event in everything] == ids
    assert [event["id"] for _, event in log.events(count=2)] == ids[:2]
    assert [event["id"] for _, event in log.events(start=everything[3][0])] == ids[3:]
    assert [event["id"] for _, event in log.iter_events(page=2)] == ids
    assert everything[0][1]["ranking"] == [[2], [0], [1]]


def test_newest_and_get_read_only_the_rankings_asked_for(redis_url: str) -> None:
    ids = _store(redis_url, 7)
    log = FeedbackLog(sync_client(redis_url))
    entry_ids = [entry_id for entry_id, _ in log.events()]

    assert [event["id"] for _, event in log.newest(3, page=2)] == ids[4:]
    assert [event["id"] for _, event in log.newest(50, page=2)] == ids
    assert [event["id"] for _, event in log.get([entry_ids[5], entry_ids[1], "1-0"])] == [
        ids[1],
        ids[5],
    ]  # in stream order; an id the stream does not hold is left out
    assert log.get([]) == []


def test_trim_keeps_the_newest_and_every_ranking_the_learner_still_needs(redis_url: str) -> None:
    ids = _store(redis_url, 10)
    client = sync_client(redis_url)
    log = FeedbackLog(client)
    assert log.trim(keep=2) == 0  # no group yet: nothing was consumed, everything is needed
    delivered = log.read_new("worker-1", count=6)
    log.ack([entry_id for entry_id, _ in delivered[:4]])  # 4, 5 stay pending; 6..9 undelivered

    assert log.trim(keep=2) == 4  # only the four consumed ones may go, whatever `keep` says
    assert [event["id"] for _, event in log.events()] == ids[4:]
    log.ack([entry_id for entry_id, _ in delivered[4:]])
    rest = log.read_new("worker-1", count=3)  # 6, 7, 8 consumed; 9 never delivered
    log.ack([entry_id for entry_id, _ in rest])
    held_out = rest[1][0]  # 7: held out by the round that consumed it, trained on next round

    assert log.trim(keep=2, keep_ids=[held_out]) == 3
    assert [event["id"] for _, event in log.events()] == ids[7:]
    assert log.trim(keep=2) == 1
    assert [event["id"] for _, event in log.events()] == ids[8:]
    assert log.trim(keep=2) == 0
    assert (log.length(), log.trimmed_count(), log.total()) == (2, 8, 10)


def test_trim_drops_more_than_one_page_and_counts_every_one(redis_url: str) -> None:
    from serve.events import TRIM_PAGE

    count = TRIM_PAGE + 5
    _store(redis_url, count)
    log = FeedbackLog(sync_client(redis_url))
    log.ack([entry_id for entry_id, _ in log.read_new("worker-1", count=count)])

    assert log.trim(keep=3) == count - 3
    assert (log.length(), log.trimmed_count(), log.total()) == (3, count - 3, count)
