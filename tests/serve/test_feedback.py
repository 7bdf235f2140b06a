"""``POST /v1/feedback`` against a real server process: the validation matrix and the stream.

One server for the module (API keys on, small limits); Redis is emptied once when it starts,
so each test uses completions and users of its own and looks events up by completion id.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from openai import OpenAI

from serve.events import FeedbackLog
from serve.feedback import STORE_ONCE_LUA
from serve.store import Completion, sync_client
from tests.conftest import TEST_REDIS_URL, Server, start_server
from tests.serve.feedback_helpers import make_completion, save_completions

pytestmark = pytest.mark.slow  # starts real processes

KEY_A, KEY_B = "key-a", "key-b"
RATE, MAX_COMMENT, MAX_BODY = 5, 50, 4096


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = {
        "LOOPCHAT_API_KEYS": f"{KEY_A},{KEY_B}",
        "LOOPCHAT_FEEDBACK_RATE": str(RATE),
        "LOOPCHAT_MAX_COMMENT_CHARS": str(MAX_COMMENT),
        "LOOPCHAT_MAX_BODY_BYTES": str(MAX_BODY),
        "LOOPCHAT_ROUND_EVERY": "1000000",
    }
    started = start_server(tiny_model, tmp_path_factory.mktemp("feedback"), TEST_REDIS_URL, env=env)
    yield started
    started.stop()


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        yield client


def saved(n: int, **fields: str | None) -> Completion:
    """A completion of ``n`` candidates made with key A, stored in the server's Redis."""
    completion = make_completion(n, api_key=KEY_A, **fields)
    save_completions(TEST_REDIS_URL, completion)
    return completion


def rank(
    api: httpx.Client, completion_id: str, ranking: object, **fields: object
) -> httpx.Response:
    """POST a ranking by a user of its own unless ``user`` is given (the rate limit is per user)."""
    body = {"completion_id": completion_id, "ranking": ranking, **fields}
    body.setdefault("user", f"user-{uuid.uuid4().hex[:8]}")
    return api.post("/v1/feedback", json=body)


def events_of(completion_id: str) -> list[dict]:
    log = FeedbackLog(sync_client(TEST_REDIS_URL))
    return [event for _, event in log.events() if event["completion_id"] == completion_id]


def assert_error(response: httpx.Response, status: int, param: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"]


def test_ranking_of_a_real_completion_is_stored_as_one_self_contained_event(
    server: Server, api: httpx.Client
) -> None:
    client = OpenAI(base_url=server.base_url, api_key=KEY_A)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    answer = client.chat.completions.create(
        model="loopchat", messages=messages, n=3, max_tokens=6, user="ann"
    )
    before = time.time()
    response = api.post(
        "/v1/feedback",
        json={"completion_id": answer.id, "ranking": [[2], [0, 1]], "comment": "close call"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["pairs"] == 2 and body["id"].startswith("fb-")

    [event] = events_of(answer.id)
    assert event == {
        "id": body["id"],
        "completion_id": answer.id,
        "messages": messages,
        "candidates": [choice.message.content for choice in answer.choices],
        "ranking": [[2], [0, 1]],
        "all_bad": False,
        "user": "ann",  # the completion's user when the ranking names none
        "comment": "close call",
        "version": answer.system_fingerprint,
        "versions": [choice.version for choice in answer.choices],  # no candidate: all live's
        "time": event["time"],
    }
    assert set(event["versions"]) == {answer.system_fingerprint}
    assert before <= event["time"] <= time.time()


@pytest.mark.parametrize(
    ("ranking", "all_bad", "pairs", "stored"),
    [
        ([3, 1, 0, 2], False, 6, [[3], [1], [0], [2]]),  # flat list: no ties, C(4, 2) pairs
        ([[0, 1], [2, 3]], False, 4, [[0, 1], [2, 3]]),  # no pair inside a tie group
        ([[0, 1, 2, 3]], False, 0, [[0, 1, 2, 3]]),  # all equally good
        ([2, [0, 3], 1], False, 5, [[2], [0, 3], [1]]),  # bare indices mixed with groups
        ([], True, 0, []),  # all bad, nothing to order
        ([1, 0, 2, 3], True, 6, [[1], [0], [2], [3]]),  # all bad, yet still ordered
    ],
)
def test_ties_and_all_bad_are_stored_normalised_with_their_pair_count(
    api: httpx.Client, ranking: list, all_bad: bool, pairs: int, stored: list
) -> None:
    completion = saved(4)
    response = rank(api, completion.id, ranking, all_bad=all_bad)
    assert response.status_code == 201, response.text
    assert response.json()["pairs"] == pairs
    [event] = events_of(completion.id)
    assert (event["ranking"], event["all_bad"]) == (stored, all_bad)
    assert event["candidates"] == completion.candidates


def test_unknown_expired_or_foreign_completion_is_404(server: Server, api: httpx.Client) -> None:
    expiring = make_completion(2, api_key=KEY_A)
    save_completions(TEST_REDIS_URL, expiring, ttl=1)
    foreign = saved(2)  # made with key A
    time.sleep(1.5)
    for completion_id, headers in [
        ("chatcmpl-does-not-exist", {}),
        (expiring.id, {}),
        (foreign.id, {"Authorization": f"Bearer {KEY_B}"}),
    ]:
        body = {"completion_id": completion_id, "ranking": [0, 1], "user": "dan"}
        response = api.post("/v1/feedback", json=body, headers=headers)
        assert_error(response, 404, "completion_id", completion_id, "does not exist or has expired")
        assert response.json()["error"]["type"] == "not_found_error"
    no_key = httpx.post(
        f"{server.url}/v1/feedback", json={"completion_id": foreign.id, "ranking": [0, 1]}
    )
    assert no_key.status_code == 401
    assert events_of(foreign.id) == []


def test_the_same_user_ranking_a_completion_twice_is_409(api: httpx.Client) -> None:
    completion = saved(2)
    body = {"completion_id": completion.id, "ranking": [1, 0], "user": "bob"}
    first = api.post("/v1/feedback", json=body)
    assert first.status_code == 201
    again = api.post("/v1/feedback", json={**body, "ranking": [0, 1]})
    assert_error(again, 409, "completion_id", "already ranked", first.json()["id"])
    other_user = api.post("/v1/feedback", json={**body, "user": "cy"})
    assert other_user.status_code == 201
    assert [(e["user"], e["ranking"]) for e in events_of(completion.id)] == [
        ("bob", [[1], [0]]),
        ("cy", [[1], [0]]),
    ]


@pytest.mark.parametrize(
    ("ranking", "all_bad", "words"),
    [
        ([0, 1], False, ["missing candidate(s) 2", "3 candidates"]),
        ([[0], [1, 2], [1]], False, ["candidate 1 more than once"]),
        ([0, 1, 3], False, ["candidate 3", "indices 0..2"]),
        ([-1, 0, 1, 2], False, ["candidate -1", "indices 0..2"]),
        ([[0], [], [1, 2]], False, ["ranking[1] is an empty tie group"]),
        ([], False, ["ranking is empty", "all_bad"]),
        ([0, 1], True, ["missing candidate(s) 2"]),  # all_bad does not excuse a partial order
    ],
)
def test_malformed_ranking_is_422_saying_what_is_wrong(
    api: httpx.Client, ranking: list, all_bad: bool, words: list[str]
) -> None:
    completion = saved(3)
    user = f"gil-{uuid.uuid4().hex[:8]}"
    response = rank(api, completion.id, ranking, all_bad=all_bad, user=user)
    assert_error(response, 422, "ranking", *words)
    assert response.json()["error"]["code"] == "invalid_ranking"
    assert events_of(completion.id) == []
    fixed = rank(api, completion.id, [0, 1, 2], user=user)
    assert fixed.status_code == 201  # a refused ranking does not count as the user's one


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"ranking": [0, 1]}, "completion_id"),
        ({"completion_id": "x"}, "ranking"),
        ({"completion_id": "x", "ranking": ["0", 1]}, "ranking[0]"),
        ({"completion_id": "x", "ranking": [True, 0]}, "ranking[0]"),
        ({"completion_id": "x", "ranking": 3}, "ranking"),
        ({"completion_id": "x", "ranking": [0, 1], "all_bad": "maybe"}, "all_bad"),
    ],
)
def test_body_of_the_wrong_shape_is_422_naming_the_field(
    api: httpx.Client, body: dict, param: str
) -> None:
    response = api.post("/v1/feedback", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"].startswith(param)


def test_more_rankings_per_minute_than_the_limit_is_429_per_user(api: httpx.Client) -> None:
    statuses = [rank(api, "gone", [0], user="eve") for _ in range(RATE + 1)]
    assert [r.status_code for r in statuses] == [404] * RATE + [429]
    assert_error(statuses[-1], 429, "user", f"more than {RATE} rankings per minute")
    completion = saved(2)
    assert rank(api, completion.id, [0, 1], user="hal").status_code == 201  # others still can
    assert rank(api, completion.id, [0, 1], user="eve").status_code == 429
    assert [event["user"] for event in events_of(completion.id)] == ["hal"]


def test_oversize_comment_or_body_is_413_and_stores_nothing(api: httpx.Client) -> None:
    completion = saved(2)
    body = {"completion_id": completion.id, "ranking": [0, 1], "user": "fay"}
    long_comment = api.post("/v1/feedback", json={**body, "comment": "x" * (MAX_COMMENT + 1)})
    assert_error(long_comment, 413, "comment", f"the limit is {MAX_COMMENT}")
    huge = api.post("/v1/feedback", json={**body, "comment": "y" * MAX_BODY})
    assert huge.status_code == 413, huge.text
    assert huge.json()["error"]["code"] == "request_too_large"
    assert events_of(completion.id) == []
    fits = api.post("/v1/feedback", json={**body, "comment": "z" * MAX_COMMENT})
    assert fits.status_code == 201


def test_a_lone_surrogate_in_the_comment_is_422_and_the_ranking_can_be_sent_again(
    api: httpx.Client,
) -> None:
    completion = saved(2)
    body = f'{{"completion_id": "{completion.id}", "ranking": [1, 0], "user": "gil", '
    bad = api.post(
        "/v1/feedback",
        content=(body + '"comment": "half a pair \\ud83d"}').encode(),
        headers={"content-type": "application/json"},
    )
    assert_error(bad, 422, "comment", "lone surrogate")
    assert events_of(completion.id) == []
    fixed = (body + '"comment": "a whole one \\ud83d\\ude00"}').encode()
    good = api.post("/v1/feedback", content=fixed, headers={"content-type": "application/json"})
    assert good.status_code == 201, good.text
    assert [event["comment"] for event in events_of(completion.id)] == ["a whole one \U0001f600"]


def test_one_post_run_twice_by_a_client_retry_is_stored_once_and_answered_stored(
    redis_url: str,
) -> None:
    """redis-py resends a command whose reply a dropped connection lost: the user who sent one
    ranking must get 201 for it, not 409, and the stream must hold it once."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    scope = uuid.uuid4().hex
    keys = [f"test:{scope}:ranked", f"test:{scope}:stream", f"test:{scope}:count"]

    def store(event_id: str) -> list:
        return client.eval(STORE_ONCE_LUA, 3, *keys, f'{{"id": "{event_id}"}}', event_id, 60, 1000)

    first, retried, other_post = store("fb-1"), store("fb-1"), store("fb-2")
    assert first[0] == 1 and retried == [1, "fb-1", 0]
    assert other_post == [0, "fb-1", 0]  # a second ranking by the same user is still refused
    assert client.xlen(keys[1]) == 1 and client.get(keys[2]) == "1"
    client.delete(*keys)
    client.close()


def test_200_concurrent_posts_store_exactly_one_event_per_201(server: Server) -> None:
    """Each of 100 (completion, user) pairs is posted twice at once: 100 events, no more."""
    completions = [make_completion(3, api_key=KEY_A) for _ in range(50)]
    save_completions(TEST_REDIS_URL, *completions)
    bodies = [
        {"completion_id": c.id, "ranking": [2, 0, 1], "user": f"crowd-{i}-{who}"}
        for i, c in enumerate(completions)
        for who in ("a", "b")
    ] * 2
    log = FeedbackLog(sync_client(TEST_REDIS_URL))
    length_before = log.length()

    async def post_all() -> list[int]:
        headers = {"Authorization": f"Bearer {KEY_A}"}
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=server.url, headers=headers, timeout=120, limits=limits
        ) as client:
            responses = await asyncio.gather(
                *(client.post("/v1/feedback", json=body) for body in bodies)
            )
        return [r.status_code for r in responses]

    statuses = Counter(asyncio.run(post_all()))
    assert statuses == {201: 100, 409: 100}
    new = log.events(start="-")[length_before:]
    assert len(new) == log.length() - length_before == statuses[201]
    assert Counter((e["completion_id"], e["user"]) for _, e in new) == Counter(
        (b["completion_id"], b["user"]) for b in bodies[:100]
    )
