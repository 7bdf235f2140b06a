"""``POST /v1/feedback`` against a real server process: the validation matrix and the stream.

One server for the module (many API keys, small limits); Redis is emptied once when it starts,
so each test uses an API key (an identity: the rate limit and the dedupe count it) and
completions of its own, and looks events up by completion id.
"""

from __future__ import annotations

import asyncio
import itertools
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
from serve.identity import key_identity
from serve.store import Completion, sync_client
from tests.conftest import TEST_REDIS_URL, Server, start_server
from tests.serve.feedback_helpers import make_completion, save_completions

pytestmark = pytest.mark.slow  # starts real processes

KEYS = [f"key-{i:03d}" for i in range(200)]
KEY_A = KEYS[0]  # the first test's key, by name
RATE, MAX_COMMENT, MAX_BODY = 5, 50, 4096
_unused_keys = itertools.count(1)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    env = {
        "LOOPCHAT_API_KEYS": ",".join(KEYS),
        "LOOPCHAT_FEEDBACK_RATE": str(RATE),
        "LOOPCHAT_MAX_COMMENT_CHARS": str(MAX_COMMENT),
        "LOOPCHAT_MAX_BODY_BYTES": str(MAX_BODY),
        "LOOPCHAT_ROUND_EVERY": "1000000",
    }
    started = start_server(tiny_model, tmp_path_factory.mktemp("feedback"), TEST_REDIS_URL, env=env)
    yield started
    started.stop()


def fresh_key() -> str:
    """An API key no test used yet: an identity of its own."""
    return KEYS[next(_unused_keys)]


def client_with(server: Server, key: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    """A client with a key of its own (``api.key``)."""
    key = fresh_key()
    with client_with(server, key) as client:
        client.key = key  # type: ignore[attr-defined]
        yield client


def saved(n: int, key: str, **fields: str | None) -> Completion:
    """A completion of ``n`` candidates made with ``key``, stored in the server's Redis."""
    completion = make_completion(n, identity=key_identity(key), **fields)
    save_completions(TEST_REDIS_URL, completion)
    return completion


def rank(
    api: httpx.Client, completion_id: str, ranking: object, **fields: object
) -> httpx.Response:
    """POST a ranking (with a made-up ``user`` label unless one is given)."""
    body = {"completion_id": completion_id, "ranking": ranking, **fields}
    body.setdefault("user", f"user-{uuid.uuid4().hex[:8]}")
    return api.post("/v1/feedback", json=body)


def events_of(completion_id: str) -> list[dict]:
    log = FeedbackLog(sync_client(TEST_REDIS_URL))
    return [event for _, event in log.events() if event["completion_id"] == completion_id]


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"]


def test_ranking_of_a_real_completion_is_stored_as_one_self_contained_event(
    server: Server,
) -> None:
    client = OpenAI(base_url=server.base_url, api_key=KEY_A)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    answer = client.chat.completions.create(
        model="loopchat", messages=messages, n=3, max_tokens=6, user="ann"
    )
    before = time.time()
    with client_with(server, KEY_A) as api:
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
        "identity": key_identity(KEY_A),  # who sent it: the key's hash, never the key
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
    completion = saved(4, api.key)
    response = rank(api, completion.id, ranking, all_bad=all_bad)
    assert response.status_code == 201, response.text
    assert response.json()["pairs"] == pairs
    [event] = events_of(completion.id)
    assert (event["ranking"], event["all_bad"]) == (stored, all_bad)
    assert event["candidates"] == completion.candidates


def test_unknown_expired_or_foreign_completion_is_404(server: Server, api: httpx.Client) -> None:
    expiring = make_completion(2, identity=key_identity(api.key))
    save_completions(TEST_REDIS_URL, expiring, ttl=1)
    foreign = saved(2, fresh_key())  # made with another key
    time.sleep(1.5)
    for completion_id, headers in [
        ("chatcmpl-does-not-exist", {}),
        (expiring.id, {}),
        (foreign.id, {}),
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


def test_the_same_key_ranking_a_completion_twice_is_409_whatever_user_it_names(
    api: httpx.Client,
) -> None:
    completion = saved(2, api.key)
    body = {"completion_id": completion.id, "ranking": [1, 0], "user": "bob"}
    first = api.post("/v1/feedback", json=body)
    assert first.status_code == 201
    again = api.post("/v1/feedback", json={**body, "ranking": [0, 1]})
    assert_error(again, 409, "completion_id", "already ranked", first.json()["id"])
    other_label = api.post("/v1/feedback", json={**body, "user": "cy"})
    assert_error(other_label, 409, "completion_id", "already ranked", first.json()["id"])
    assert [(e["user"], e["ranking"]) for e in events_of(completion.id)] == [("bob", [[1], [0]])]


def test_one_key_posting_under_invented_user_names_is_one_identity(server: Server) -> None:
    """The `user` field is a label: a key inventing a name per ranking still has one rate limit
    and one identity in every stored event, and other keys are not limited by it."""
    spoofer, bystander = fresh_key(), fresh_key()
    with client_with(server, spoofer) as api, client_with(server, bystander) as other:
        completions = [saved(2, spoofer) for _ in range(RATE + 1)]
        statuses = [
            rank(api, c.id, [0, 1], user=f"sockpuppet-{i}").status_code
            for i, c in enumerate(completions)
        ]
        assert statuses == [201] * RATE + [429]
        events = [e for c in completions for e in events_of(c.id)]
        assert {e["identity"] for e in events} == {key_identity(spoofer)}
        assert len({e["user"] for e in events}) == RATE  # the labels are kept, as labels
        assert rank(other, saved(2, bystander).id, [1, 0]).status_code == 201


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
    completion = saved(3, api.key)
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


def test_more_rankings_per_minute_than_the_limit_is_429_per_key(
    server: Server, api: httpx.Client
) -> None:
    statuses = [rank(api, "gone", [0], user="eve") for _ in range(RATE + 1)]
    assert [r.status_code for r in statuses] == [404] * RATE + [429]
    assert_error(statuses[-1], 429, None, f"more than {RATE} rankings per minute")
    assert statuses[-1].json()["error"]["type"] == "rate_limit_error"
    other_key = fresh_key()
    completion = saved(2, other_key)
    with client_with(server, other_key) as other:
        assert rank(other, completion.id, [0, 1], user="hal").status_code == 201  # others can
    assert rank(api, saved(2, api.key).id, [0, 1], user="hal").status_code == 429
    assert [event["user"] for event in events_of(completion.id)] == ["hal"]


def test_oversize_comment_or_body_is_413_and_stores_nothing(api: httpx.Client) -> None:
    completion = saved(2, api.key)
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
    completion = saved(2, api.key)
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
    """Each of 100 (completion, key) pairs is posted twice at once: 100 events, no more."""
    keys = [fresh_key() for _ in range(100)]
    completions = [make_completion(3, identity=key_identity(key)) for key in keys]
    save_completions(TEST_REDIS_URL, *completions)
    posts = [
        (key, {"completion_id": c.id, "ranking": [2, 0, 1], "user": f"crowd-{i}-{who}"})
        for i, (key, c) in enumerate(zip(keys, completions, strict=True))
        for who in ("a", "b")
    ]
    log = FeedbackLog(sync_client(TEST_REDIS_URL))
    length_before = log.length()

    async def post_all() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"}
                    )
                    for key, body in posts
                )
            )
        return [r.status_code for r in responses]

    statuses = Counter(asyncio.run(post_all()))
    assert statuses == {201: 100, 409: 100}
    new = log.events(start="-")[length_before:]
    assert len(new) == log.length() - length_before == statuses[201]
    assert Counter((e["completion_id"], e["identity"]) for _, e in new) == Counter(
        (c.id, key_identity(key)) for key, c in zip(keys, completions, strict=True)
    )
