"""Hot swap in real ``loopchat up`` processes: live weights change under load, nothing fails.

The API processes of one module share one Redis database and one checkpoint store, as replicas
do in a deployment; each follows the registry's ``live`` alias on its own. Four checkpoints
(``v1``–``v4``) are the tiny model re-initialised with four seeds, so their greedy answers
differ; each engine's greedy answer per version is recorded first, one request at a time, and
every later answer is checked against the answer of the version its ``system_fingerprint`` names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from openai import AsyncOpenAI

from serve.engine.hf_engine import HFEngine
from serve.hotswap import following_live
from serve.registry import NonFiniteWeights, Registry
from serve.settings import Settings
from serve.store import async_client, sync_client
from tests.conftest import TEST_REDIS_URL, Server, start_server
from tests.serve.checkpoint_helpers import passed, poisoned, variant

TOKEN = "hotswap-admin-token"
PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]
GREEDY = {"temperature": 0, "max_tokens": 8}
VERSIONS = ["v1", "v2", "v3", "v4"]  # the tiny model with seeds 1..4


def ask(server: Server) -> tuple[str, str]:
    """(system_fingerprint, answer) of one greedy completion."""
    reply = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "loopchat", "messages": PROMPT, **GREEDY},
        timeout=60,
    )
    reply.raise_for_status()
    body = reply.json()
    return body["system_fingerprint"], body["choices"][0]["message"]["content"]


def admin(server: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.request(method, f"{server.url}/admin{path}", headers=headers, timeout=30, **kwargs)


def wait_serving(server: Server, version: str, timeout: float = 60) -> None:
    """Until the process's engine serves ``version`` (it follows the alias by itself)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/health", timeout=10).json()["version"] == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"{server.url} did not swap to {version} within {timeout}s")


@dataclass
class Cluster:
    """API processes on one Redis and one checkpoint store."""

    data_dir: Path
    models: dict[int, Path]
    registry: Registry
    servers: dict[str, Server] = field(default_factory=dict)
    answers: dict[str, dict[str, str]] = field(default_factory=dict)

    def start(self, engine: str, model: Path | None = None) -> Server:
        """Start an ``engine`` process; ``model`` (``--model``) only matters if nothing is live."""
        server = start_server(
            model or self.models[1],
            self.data_dir,
            TEST_REDIS_URL,
            engine=engine,
            env={
                "LOOPCHAT_ADMIN_TOKEN": TOKEN,
                "LOOPCHAT_CHAT_RATE": str(10**6),
            },  # many clients, one address
        )
        self.servers[engine] = server
        return server

    def serve(self, engine: str) -> tuple[Server, dict[str, str]]:
        """The ``engine`` process (started on first use) and its greedy answer per version."""
        if engine not in self.servers:
            server = self.start(engine)
            answers = self.answers[engine] = {}
            for version in VERSIONS:
                self.registry.promote(version, by="test", reason="record greedy answers")
                wait_serving(server, version)
                fingerprint, answers[version] = ask(server)
                assert fingerprint == version
            assert len(set(answers.values())) == len(VERSIONS), answers
        return self.servers[engine], self.answers[engine]

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    data_dir = tmp_path_factory.mktemp("hotswap")
    models = {seed: variant(tiny_model, seed, data_dir / f"seed-{seed}") for seed in range(1, 5)}
    registry = Registry(
        sync_client(TEST_REDIS_URL), str(data_dir / "checkpoints"), data_dir / "cache"
    )
    passed(registry, registry.ensure_live(models[1])[0])  # swapped back to: gated like the rest
    for seed in range(2, 5):
        passed(registry, registry.register(models[seed], "ppo", "v1", {"seed": seed}))
    cluster = Cluster(data_dir, models, registry)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@dataclass
class Outcome:
    """One streamed response as a client saw it."""

    fingerprints: set[str]
    text: str
    finish_reason: str | None


async def stream_until(base_url: str, stop: asyncio.Event, outcomes: list, errors: list) -> None:
    """One client: greedy streaming requests back to back until ``stop`` is set."""
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    async with client:
        while not stop.is_set():
            try:
                stream = await client.chat.completions.create(
                    model="loopchat", messages=PROMPT, stream=True, **GREEDY
                )
                fingerprints, text, finish = set(), "", None
                async for chunk in stream:
                    fingerprints.add(chunk.system_fingerprint)
                    for choice in chunk.choices:
                        text += choice.delta.content or ""
                        finish = choice.finish_reason or finish
                outcomes.append(Outcome(fingerprints, text, finish))
            except Exception as exc:  # any failure at all is what this test counts
                errors.append(repr(exc))


@pytest.mark.slow
def test_twenty_streaming_clients_see_no_failure_through_five_swaps(
    cluster: Cluster, engine: str
) -> None:
    server, answers = cluster.serve(engine)
    cluster.registry.promote("v1", by="test", reason="start")
    wait_serving(server, "v1")
    swaps = ["v2", "v3", "v4", "v1", "v2"]

    async def scenario() -> tuple[list[Outcome], list[str], dict[str, int]]:
        stop, outcomes, errors = asyncio.Event(), [], []
        clients = [
            asyncio.create_task(stream_until(server.base_url, stop, outcomes, errors))
            for _ in range(20)
        ]
        served_after: dict[str, int] = {}
        for step, version in enumerate(swaps):
            await asyncio.sleep(0.5)  # let requests pile up under the old weights
            before = len(outcomes)
            await asyncio.to_thread(
                cluster.registry.promote, version, by="test", reason=f"swap {step + 1}"
            )
            deadline = time.monotonic() + 60
            while not any(version in o.fingerprints for o in outcomes[before:]):
                assert time.monotonic() < deadline, f"{version} never answered after its promotion"
                await asyncio.sleep(0.05)
            served_after[f"{step + 1}:{version}"] = len(outcomes) - before
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)
        return outcomes, errors, served_after

    outcomes, errors, served_after = asyncio.run(scenario())
    assert errors == []
    assert len(outcomes) >= 100, f"only {len(outcomes)} responses"
    for outcome in outcomes:
        assert len(outcome.fingerprints) == 1, outcome  # one version per response
        (version,) = outcome.fingerprints
        assert outcome.text == answers[version], (version, outcome.text)
        assert outcome.finish_reason in ("stop", "length")
    assert {v for o in outcomes for v in o.fingerprints} == set(VERSIONS)
    assert len(served_after) == len(swaps)


def test_a_nan_checkpoint_is_refused_and_never_goes_live(cluster: Cluster, engine: str) -> None:
    server, answers = cluster.serve(engine)
    cluster.registry.promote("v3", by="test", reason="start")
    wait_serving(server, "v3")
    bad = cluster.registry.register(
        poisoned(cluster.models[1], 5, cluster.data_dir / f"nan-{engine}"), "ppo", "v3", {}
    )
    cluster.registry.record_gate(bad, {"passed": True, "reasons": ["gate bypassed"]})
    for query in ("", "?force=true"):
        reply = admin(server, "POST", f"/checkpoints/{bad}/promote{query}")
        assert reply.status_code == 409
        assert reply.json()["error"]["code"] == "non_finite_weights"
    with pytest.raises(NonFiniteWeights):
        cluster.registry.promote(bad, by="test", reason="straight to the registry", force=True)
    time.sleep(0.5)  # a swap, had one been announced, would have happened by now
    assert cluster.registry.alias("live") == "v3"
    assert ask(server) == ("v3", answers["v3"])
    assert all(event["version"] != bad for event in cluster.registry.history())


def test_rollback_gives_the_previous_versions_greedy_answers_exactly(
    cluster: Cluster, engine: str
) -> None:
    server, answers = cluster.serve(engine)
    for version in ("v2", "v4"):
        assert admin(server, "POST", f"/checkpoints/{version}/promote").status_code == 200
        wait_serving(server, version)
    assert ask(server) == ("v4", answers["v4"])
    reply = admin(server, "POST", "/rollback", json={"reason": "v4 answers worse", "by": "op"})
    assert reply.status_code == 200 and reply.json()["live"] == "v2"
    wait_serving(server, "v2")
    assert ask(server) == ("v2", answers["v2"])
    assert cluster.registry.history()[-1] | {"time": 0} == {
        "time": 0,
        "action": "rollback",
        "version": "v2",
        "from": "v4",
        "by": "op@127.0.0.1",
        "reason": "v4 answers worse",
        "forced": False,
    }


def test_a_follower_catches_up_at_start_on_a_promotion_it_never_heard(cluster: Cluster) -> None:
    """Pub/sub keeps nothing for absent listeners: a process must check the alias itself."""
    registry = cluster.registry
    registry.promote("v1", by="test", reason="start")
    engine = HFEngine(registry.local_path("v1"), "v1", Settings(data_dir=cluster.data_dir))

    async def scenario() -> None:
        await engine.start()
        aclient = async_client(TEST_REDIS_URL)
        try:
            await asyncio.to_thread(registry.promote, "v4", by="test", reason="while not listening")
            async with following_live(registry, engine, aclient, poll_seconds=60):
                deadline = time.monotonic() + 30
                while engine.version != "v4":
                    assert time.monotonic() < deadline, "the follower never caught up"
                    await asyncio.sleep(0.05)
        finally:
            await aclient.aclose()
            await engine.shutdown()

    asyncio.run(scenario())
    assert engine.model_dir == str(registry.local_path("v4"))


@pytest.mark.slow
def test_registry_and_live_alias_survive_a_server_restart(cluster: Cluster) -> None:
    server, answers = cluster.serve("hf")
    assert admin(server, "POST", "/checkpoints/v3/promote").status_code == 200
    wait_serving(server, "v3")
    before = admin(server, "GET", "/checkpoints").json()
    history = cluster.registry.history()
    assert server.stop() is not None
    # Started again with another --model: the registry, not the flag, says what is live.
    restarted = cluster.start("hf", model=cluster.models[4])
    assert ask(restarted) == ("v3", answers["v3"])
    assert admin(restarted, "GET", "/checkpoints").json() == before
    assert cluster.registry.history() == history


@pytest.mark.slow
def test_embedded_redis_keeps_the_registry_across_a_full_restart(
    tiny_model: Path, tmp_path: Path
) -> None:
    """With no Redis configured, stopping the server stops its embedded Redis too: the live
    version and the registry come back from the data dir's AOF."""
    first_model = variant(tiny_model, 1, tmp_path / "first")
    env = {"LOOPCHAT_ADMIN_TOKEN": TOKEN}
    server = start_server(first_model, tmp_path / "data", None, env=env)
    try:
        fingerprint, answer = ask(server)
        before = admin(server, "GET", "/checkpoints").json()
    finally:
        server.stop()
    assert fingerprint == "v1" and before["live"] == "v1"
    other_model = variant(tiny_model, 2, tmp_path / "other")
    server = start_server(other_model, tmp_path / "data", None, env=env)
    try:
        assert ask(server) == ("v1", answer)
        assert admin(server, "GET", "/checkpoints").json() == before
        assert admin(server, "GET", "/history").json()[0]["action"] == "bootstrap"
    finally:
        server.stop()
