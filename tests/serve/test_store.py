"""``PipelinedScripts``: concurrent script calls share a trip, each keeping its own reply."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from serve.store import PipelinedScripts, async_client

ECHO = "return {KEYS[1], ARGV[1]}"
REFUSE_BAD = "if ARGV[1] == 'bad' then return redis.error_reply('bad argument') end return ARGV[1]"


def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    redis_url: str,
) -> None:
    name = f"pipelined-{uuid.uuid4().hex[:8]}"

    async def run() -> tuple[list, list[str]]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True, client_name=name)
        scripts = PipelinedScripts(client)
        echo = scripts.register(ECHO)
        replies = await asyncio.gather(*(scripts.run(echo, [f"k{i}"], [i]) for i in range(50)))
        names = [entry["name"] for entry in await client.client_list()]
        await client.aclose()
        return replies, names

    replies, names = asyncio.run(run())
    assert replies == [[f"k{i}", str(i)] for i in range(50)]
    assert names.count(name) == 1  # called one at a time, fifty calls would open fifty


def test_an_error_in_one_call_is_raised_to_that_caller_only(redis_url: str) -> None:
    async def run() -> list:
        client = async_client(redis_url)
        scripts = PipelinedScripts(client)
        refuse_bad = scripts.register(REFUSE_BAD)
        calls = [scripts.run(refuse_bad, [], [arg]) for arg in ("ok-1", "bad", "ok-2")]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await client.aclose()
        return results

    first, bad, last = asyncio.run(run())
    assert (first, last) == ("ok-1", "ok-2")
    assert isinstance(bad, redis.ResponseError) and "bad argument" in str(bad)


def test_a_script_redis_does_not_know_yet_is_loaded_and_run(redis_url: str) -> None:
    """A fresh script is unknown to Redis (as every script is after a restart): NOSCRIPT is
    answered by loading it and running the calls again, each exactly once."""
    source = f"-- {uuid.uuid4().hex}\nreturn redis.call('INCR', KEYS[1])"

    async def run() -> list:
        client = async_client(redis_url)
        scripts = PipelinedScripts(client)
        incr = scripts.register(source)
        replies = await asyncio.gather(*(scripts.run(incr, ["counted"], []) for _ in range(3)))
        await client.aclose()
        return replies

    assert sorted(asyncio.run(run())) == [1, 2, 3]
    assert redis.Redis.from_url(redis_url).get("counted") == b"3"


def test_a_failed_connection_is_raised_to_every_caller() -> None:
    async def run() -> list:
        client = async_client("redis://127.0.0.1:1/0")  # nothing listens there
        scripts = PipelinedScripts(client)
        echo = scripts.register(ECHO)
        calls = [scripts.run(echo, ["k"], [i]) for i in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await client.aclose()
        return results

    results = asyncio.run(run())
    assert len(results) == 3
    for result in results:
        with pytest.raises(redis.ConnectionError):
            raise result


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_the_embedded_redis_states_its_durability_and_restarts_with_its_data(
    tmp_path, fsync: str
) -> None:
    """LOOPCHAT_REDIS_FSYNC reaches the server; writes are refused rather than lost when a
    snapshot fails; nothing is evicted; a killed server restarts in place with its data."""
    import psutil

    from serve.store import EmbeddedRedis

    server = EmbeddedRedis(tmp_path, fsync)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        config = client.config_get("*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == fsync
        assert config["stop-writes-on-bgsave-error"] == "yes"
        assert config["maxmemory"] == "0" and config["maxmemory-policy"] == "noeviction"

        client.set("kept", "yes")
        victim = psutil.Process(server.pid())
        victim.kill()
        victim.wait(10)
        assert not server.alive()
        server.restart()
        assert server.alive() and client.get("kept") == "yes"
    finally:
        client.shutdown(nosave=True)
        client.close()
