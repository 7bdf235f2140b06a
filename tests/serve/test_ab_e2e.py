"""Online A/B end to end through HTTP: a real ``loopchat up`` on a real Redis.

``v1`` (the tiny model) is live; ``v2`` (the tiny model with another seed) is registered as a
candidate whose gate passed, as a learning round leaves it. The server loads it into its
candidate engine by itself (the registry's channel), its answers appear in ranked slates beside
live's, simulated users prefer them, and auto-promote makes ``v2`` live by its win rate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from serve.registry import Registry
from serve.settings import Settings
from serve.store import sync_client
from tests.conftest import Server, start_server
from tests.serve.checkpoint_helpers import variant
from tests.serve.logprobs_helpers import check_logprobs

TOKEN = "ab-admin-token"
MIN_RANKINGS = 8
ASK = {"model": "loopchat", "n": 4, "max_tokens": 4, "temperature": 1.0}


def chat(server: Server, **extra: object) -> dict:
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    reply = httpx.post(
        f"{server.base_url}/chat/completions",
        json={**ASK, "messages": messages, **extra},
        timeout=60,
    )
    reply.raise_for_status()
    return reply.json()


def admin(server: Server, path: str) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    reply = httpx.get(f"{server.url}/admin{path}", headers=headers, timeout=60)
    reply.raise_for_status()
    return reply.json()


def mixed_slate(server: Server, timeout: float = 60, **extra: object) -> dict:
    """The first completion whose answers come from two versions (the candidate is loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = chat(server, **extra)
        if len({c["version"] for c in body["choices"]}) == 2:
            return body
        time.sleep(0.2)
    raise AssertionError(f"no mixed slate within {timeout}s:\n{server.log.read_text()[-3000:]}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_candidate_answers_in_slates_make_it_live_by_win_rate(
    engine: str, tiny_model: Path, redis_url: str, tmp_path: Path
) -> None:
    """With ``vllm`` live answers come from vLLM and the candidate's from the transformers
    engine beside it (the default deployment); with ``hf`` both are transformers."""
    data_dir = tmp_path / "data"
    env = {
        "LOOPCHAT_ADMIN_TOKEN": TOKEN,
        "LOOPCHAT_AUTO_PROMOTE": "1",
        "LOOPCHAT_AB_SHARE": "1",  # every ranked turn mixed: a short test
        "LOOPCHAT_AB_MIN_RANKINGS": str(MIN_RANKINGS),
        "LOOPCHAT_FEEDBACK_RATE": "100000",
    }
    server = start_server(tiny_model, data_dir, redis_url, engine, env=env, timeout=600)
    try:
        registry = Registry.from_settings(
            Settings(data_dir=data_dir, redis_url=redis_url), sync_client(redis_url)
        )
        assert chat(server)["system_fingerprint"] == "v1"
        assert {c["version"] for c in chat(server)["choices"]} == {"v1"}  # no candidate yet
        v2 = registry.register(variant(tiny_model, 2, tmp_path / "v2"), "rloo", "v1", {})
        registry.record_gate(v2, {"passed": False, "reasons": ["not yet"]})
        registry.set_candidate(v2)
        time.sleep(1)
        assert {c["version"] for c in chat(server)["choices"]} == {"v1"}  # gate not passed
        registry.record_gate(v2, {"passed": True, "reasons": []})

        first = mixed_slate(server)
        assert first["system_fingerprint"] == "v1"  # clients reading only this see live
        scored = mixed_slate(server, logprobs=True, top_logprobs=2)  # from both engines
        for choice in scored["choices"]:
            check_logprobs(choice["message"]["content"], choice["logprobs"]["content"], top=2)
        if engine == "vllm":  # the candidate's engine (HF) cannot constrain: live's alone
            objects = chat(server, response_format={"type": "json_object"})
            assert {c["version"] for c in objects["choices"]} == {"v1"}
        single = chat(server, n=1)  # one answer is no ranked turn: live's alone
        assert [c["version"] for c in single["choices"]] == ["v1"]
        stream = httpx.post(
            f"{server.base_url}/chat/completions",
            json={**ASK, "messages": [{"role": "user", "content": "hi"}], "stream": True},
            timeout=60,
        )
        chunks = [
            json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")
        ]
        streamed = {c["index"]: c["version"] for chunk in chunks for c in chunk["choices"]}
        assert set(streamed.values()) == {"v1", "v2"} and len(streamed) == 4

        body, promoted_after = first, None
        for ranked in range(1, 60):
            versions = [c["version"] for c in body["choices"]]
            ranking = [[i for i, v in enumerate(versions) if v == "v2"]]
            ranking.append([i for i, v in enumerate(versions) if v == "v1"])
            posted = httpx.post(
                f"{server.base_url}/feedback",
                json={"completion_id": body["id"], "ranking": ranking, "user": f"u{ranked}"},
                timeout=30,
            )
            assert posted.status_code == 201, posted.text
            if ranked == MIN_RANKINGS // 2:
                board = admin(server, "/leaderboard")
                rows = {row["version"]: row for row in board["versions"]}
                assert set(rows) == {"v1", "v2"} and board["live"] == "v1"
                assert rows["v2"]["strength"] > 0 == rows["v1"]["strength"]
                assert rows["v2"]["win_rate_vs_live"]["estimate"] == 1.0
                assert board["test"]["action"] == "wait"  # below the minimum
            time.sleep(0.1)  # the referee runs after the ranking, in the background
            if registry.alias("live") == "v2":
                promoted_after = ranked
                break
            body = chat(server)
            assert len({c["version"] for c in body["choices"]}) == 2
        assert promoted_after is not None and promoted_after >= MIN_RANKINGS
        event = registry.history()[-1]
        assert (event["action"], event["version"], event["by"]) == ("promote", "v2", "ab")
        assert "win rate 1.000" in event["reason"] and "against v1" in event["reason"]

        board = admin(server, "/leaderboard")
        rows = {row["version"]: row for row in board["versions"]}
        assert board["live"] == "v2" and board["candidate"] is None and board["test"] is None
        assert rows["v1"]["strength"] < 0 == rows["v2"]["strength"]
        assert rows["v1"]["win_rate_vs_live"]["estimate"] == 0.0
        [decision] = board["decisions"]
        assert decision["action"] == "promote" and decision["interval"][0] >= 0.5
        deadline = time.monotonic() + 60
        while chat(server)["system_fingerprint"] != "v2":  # the hot swap follows
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert {c["version"] for c in chat(server)["choices"]} == {"v2"}  # A/B is over
        unauthorised = httpx.get(f"{server.url}/admin/leaderboard", timeout=30)
        assert unauthorised.status_code == 401
    finally:
        server.stop()
