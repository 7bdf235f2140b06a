"""``/admin/*`` and ``loopchat checkpoints | promote | rollback | unpin`` on a real Redis and
registry.

The routes are exercised on the real app (its lifespan starts the HF engine on the tiny model)
through FastAPI's in-process client, which is far cheaper than a server process per test; the
CLI runs its real entry point with settings from the environment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.admin import AdminAuthError, LoginThrottle
from serve.app import create_app
from serve.cli import main as loopchat
from serve.events import STREAM
from serve.registry import Registry
from serve.settings import Settings
from serve.store import key, sync_client

TOKEN = "admin-test-token"
ROUTES = [
    ("GET", "/admin/checkpoints"),
    ("POST", "/admin/checkpoints/v1/promote"),
    ("POST", "/admin/rollback"),
    ("POST", "/admin/unpin"),
    ("GET", "/admin/loop"),
    ("GET", "/admin/history"),
    ("GET", "/admin/leaderboard"),
]


def settings_for(
    tmp_path: Path, redis_url: str, model: Path, token: str | None, failures: int = 100
) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        model=str(model),
        engine="hf",
        admin_token=token,
        admin_login_failures=failures,
    )


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, tiny_model: Path) -> Settings:
    return settings_for(tmp_path, redis_url, tiny_model, TOKEN)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


@pytest.fixture
def registry(settings: Settings, redis_url: str) -> Registry:
    return Registry.from_settings(settings, sync_client(redis_url))


def test_admin_routes_answer_401_without_and_403_with_a_wrong_token(api: TestClient) -> None:
    for method, path in ROUTES:
        missing = api.request(method, path, headers={"Authorization": ""})
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "invalid_admin_token"
        assert api.request(method, path, headers={"Authorization": "Basic x"}).status_code == 401
        wrong = api.request(method, path, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 403, path
        assert wrong.json()["error"]["type"] == "permission_error"
    assert api.get("/admin/checkpoints").status_code == 200


def test_wrong_admin_tokens_from_one_address_are_throttled(
    tmp_path: Path, redis_url: str, tiny_model: Path
) -> None:
    app = create_app(settings_for(tmp_path, redis_url, tiny_model, TOKEN, failures=3))
    with TestClient(app) as client:
        guesses = [
            client.get("/admin/checkpoints", headers={"Authorization": f"Bearer guess-{i}"})
            for i in range(4)
        ]
        assert [g.status_code for g in guesses] == [403, 403, 403, 429]
        right = client.get("/admin/checkpoints", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 429  # even the right token, until the minute is over
        error = right.json()["error"]
        assert error["type"] == "rate_limit_error" and "retry in" in error["message"]


def test_the_login_throttle_forgets_failures_older_than_a_minute() -> None:
    now = [0.0]
    throttle = LoginThrottle(2, clock=lambda: now[0])
    for _ in range(2):
        with pytest.raises(AdminAuthError):
            throttle.check("secret", "guess", "1.2.3.4")
    with pytest.raises(AdminAuthError) as refused:
        throttle.check("secret", "secret", "1.2.3.4")
    assert refused.value.status == 429 and throttle.retry_after("1.2.3.4") == 60.0
    throttle.check("secret", "secret", "5.6.7.8")  # another address is not affected
    now[0] = 60.0
    throttle.check("secret", "secret", "1.2.3.4")  # a minute later
    with pytest.raises(AdminAuthError):
        throttle.check("secret", None, "1.2.3.4")  # no token is no guess: not counted
    assert throttle.retry_after("1.2.3.4") == 0.0


def test_admin_routes_are_closed_until_a_token_is_configured(
    tmp_path: Path, redis_url: str, tiny_model: Path
) -> None:
    app = create_app(settings_for(tmp_path, redis_url, tiny_model, None))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        for method, path in ROUTES:
            reply = client.request(method, path)
            assert reply.status_code == 403, path
            assert "LOOPCHAT_ADMIN_TOKEN" in reply.json()["error"]["message"]


def test_checkpoints_lists_the_aliases_and_every_version(
    api: TestClient, registry: Registry, tiny_model: Path
) -> None:
    rm = registry.register(tiny_model, "reward", "v1", {"heldout_accuracy": 0.75})
    v2 = registry.register(tiny_model, "ppo", "v1", {"kl": 0.02}, {"reward_model": rm})
    registry.record_gate(v2, {"passed": True, "reasons": []})
    registry.set_candidate(v2)
    body = api.get("/admin/checkpoints").json()
    assert {k: body[k] for k in ("live", "candidate", "previous", "pin")} == {
        "live": "v1",
        "candidate": "v2",
        "previous": None,
        "pin": None,
    }
    assert [v["version"] for v in body["versions"]] == ["v1", "rm-1", "v2"]
    assert all(
        set(v) == {"version", "kind", "parent", "created_at", "metrics", "gate"}
        for v in body["versions"]
    )
    assert body["versions"][2] | {"created_at": 0} == {
        "version": "v2",
        "kind": "ppo",
        "parent": "v1",
        "created_at": 0,
        "metrics": {"kl": 0.02},
        "gate": {"passed": True, "reasons": []},
    }


def test_non_finite_metrics_are_reported_as_null(
    api: TestClient, registry: Registry, tiny_model: Path
) -> None:
    registry.register(tiny_model, "ppo", "v1", {"kl": float("nan"), "reward_mean": float("inf")})
    reply = api.get("/admin/checkpoints")
    assert reply.status_code == 200
    assert reply.json()["versions"][-1]["metrics"] == {"kl": None, "reward_mean": None}


def test_promote_refuses_unknown_versions_reward_models_and_failed_gates(
    api: TestClient, registry: Registry, tiny_model: Path
) -> None:
    unknown = api.post("/admin/checkpoints/v42/promote")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_version"
    rm = registry.register(tiny_model, "reward", "v1", {})
    not_policy = api.post(f"/admin/checkpoints/{rm}/promote")
    assert not_policy.status_code == 409 and not_policy.json()["error"]["code"] == "not_a_policy"
    v2 = registry.register(tiny_model, "ppo", "v1", {})
    registry.record_gate(v2, {"passed": False, "reasons": ["agrees with users less than v1"]})
    failed = api.post(f"/admin/checkpoints/{v2}/promote")
    assert failed.status_code == 409 and failed.json()["error"]["code"] == "gate_failed"
    assert "agrees with users less than v1" in failed.json()["error"]["message"]
    assert registry.alias("live") == "v1"
    no_reason = api.post(f"/admin/checkpoints/{v2}/promote", json={"force": True})
    assert no_reason.status_code == 400 and no_reason.json()["error"]["param"] == "reason"
    forced = api.post(
        f"/admin/checkpoints/{v2}/promote", json={"force": True, "reason": "trust me", "by": "al"}
    )
    assert forced.status_code == 200
    assert forced.json() == {"live": "v2", "candidate": None, "previous": "v1", "pin": None}
    last = registry.history()[-1]
    assert (last["reason"], last["forced"], last["by"]) == ("trust me", True, "al@testclient")
    assert api.post(f"/admin/checkpoints/{v2}/promote", json={"by": ""}).status_code == 422


def wait_serving(api: TestClient, version: str, timeout: float = 60) -> None:
    """Until the app's engine serves ``version``: a test leaves no swap running behind it."""
    deadline = time.monotonic() + timeout
    while api.get("/health").json()["version"] != version:
        assert time.monotonic() < deadline, f"never swapped to {version}"
        time.sleep(0.05)


def test_an_ungated_version_is_409_unless_forced_with_a_reason(
    api: TestClient, registry: Registry, tiny_model: Path
) -> None:
    v2 = registry.register(tiny_model, "ppo", "v1", {})
    refused = api.post(f"/admin/checkpoints/{v2}/promote")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_gated"
    assert registry.alias("live") == "v1"
    forced = api.post(f"/admin/checkpoints/{v2}/promote", json={"force": True, "reason": "hotfix"})
    assert forced.status_code == 200 and registry.history()[-1]["forced"] is True
    wait_serving(api, v2)


def test_rollback_pins_and_unpin_lifts_it(
    api: TestClient, registry: Registry, tiny_model: Path
) -> None:
    v2 = registry.register(tiny_model, "ppo", "v1", {})
    registry.record_gate(v2, {"passed": True, "reasons": []})
    assert api.post(f"/admin/checkpoints/{v2}/promote").status_code == 200
    wait_serving(api, v2)
    rolled = api.post("/admin/rollback", json={"reason": "bad answers", "by": "carol"}).json()
    assert rolled["live"] == "v1" and rolled["pin"]["by"] == "carol@testclient"
    assert api.get("/admin/checkpoints").json()["pin"]["version"] == "v1"
    lifted = api.post("/admin/unpin", json={"reason": "fixed"})
    assert lifted.status_code == 200 and lifted.json()["pin"] is None
    assert registry.history()[-1]["action"] == "unpin"
    wait_serving(api, "v1")


def test_rollback_is_409_without_a_previous_version(api: TestClient, registry: Registry) -> None:
    reply = api.post("/admin/rollback")
    assert reply.status_code == 409
    assert reply.json()["error"]["code"] == "no_previous_version"
    assert registry.alias("live") == "v1" and len(registry.history()) == 1


def test_loop_reports_rankings_since_the_last_round_and_round_metrics(
    api: TestClient, settings: Settings, redis_url: str
) -> None:
    client = sync_client(redis_url)
    for i in range(5):
        event = {
            "id": f"f{i}",
            "completion_id": f"c{i}",
            "messages": [],
            "candidates": ["a", "b"],
            "ranking": [[0], [1]],
            "all_bad": False,
            "user": None,
            "comment": None,
            "version": "v1",
            "time": time.time(),
        }
        client.xadd(STREAM, {"event": json.dumps(event)})
    rounds = [
        {
            "round": "r1",
            "status": "done",
            "rankings_new": 3,
            "rankings_total": 3,
            "rm": {"version": "rm-1", "heldout_accuracy": 0.5},
            "policy": {"learner": "dpo", "pairs": 9},
            "gate": {"passed": True, "reasons": [], "kl_to_sft": 0.01},
            "candidate": "v2",
            "promoted": False,
        },
        {"round": "r2", "status": "failed", "error": "RuntimeError: out of memory"},
    ]
    for record in rounds:
        client.rpush(key("loop", "rounds"), json.dumps(record))
    client.set(key("loop", "since_round"), 2)
    client.hset(key("loop", "unusable"), mapping={"all_tied": 3, "all_bad": 1})
    body = api.get("/admin/loop").json()
    assert body == {
        "rankings_total": 5,
        "rankings_since_last_round": 2,
        "round_every": settings.round_every,
        "next_round_in": settings.round_every - 2,
        "round_running": False,
        "auto_promote": False,
        "learner": "rloo",
        "rankings_unusable": {"all_tied": 3, "all_bad": 1},
        "rounds": rounds,
    }
    for limit in (0, 1):  # the last completed round counts even when it is not returned
        body = api.get(f"/admin/loop?rounds={limit}").json()
        assert body["rounds"] == rounds[2 - limit :] and body["rankings_since_last_round"] == 2
    assert api.get("/admin/loop?rounds=5000").status_code == 422


def test_cli_lists_promotes_and_rolls_back(
    registry: Registry,
    settings: Settings,
    tiny_model: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in {"REDIS_URL": redis_url, "DATA_DIR": str(settings.data_dir)}.items():
        monkeypatch.setenv(f"LOOPCHAT_{name}", value)
    registry.ensure_live(tiny_model)
    registry.register(tiny_model, "ppo", "v1", {"kl": 0.03125})
    assert loopchat(["checkpoints"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == ["v1", "sft", "-"]
    assert "live" in table[1] and "kl=0.03125" in table[2]
    capsys.readouterr()
    assert loopchat(["promote", "v2", "--reason", "looks better"]) == 2  # no gate result
    assert "no gate result" in capsys.readouterr().err
    assert loopchat(["promote", "v2", "--force"]) == 2
    assert "needs a reason" in capsys.readouterr().err
    assert loopchat(["promote", "v2", "--force", "--reason", "looks better"]) == 0
    assert "live: v2" in capsys.readouterr().out
    assert registry.history()[-1]["reason"] == "looks better"
    assert registry.history()[-1]["by"].startswith("cli")
    assert registry.history()[-1]["forced"] is True
    assert loopchat(["promote", "v9"]) == 2
    assert capsys.readouterr().err.strip() == "loopchat promote: error: unknown version 'v9'"
    assert loopchat(["rollback", "--reason", "regression"]) == 0
    assert registry.alias("live") == "v1"
    assert "pinned by cli" in capsys.readouterr().out
    assert loopchat(["unpin", "--reason", "fixed"]) == 0
    assert registry.pin() is None and registry.history()[-1]["action"] == "unpin"
    assert loopchat(["rollback"]) == 2
    assert "no previous version" in capsys.readouterr().err
    assert loopchat(["checkpoints", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["live"] == "v1"
