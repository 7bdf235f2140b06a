"""The service benchmarks' shared parts: statistics, and the Redis a benchmark may use."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from learn.bench.common import bench_redis, latency_stats, percentile
from learn.errors import LearnError


def test_percentiles_interpolate_between_ordered_values() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert percentile([], 50) is None
    assert latency_stats([0.1]) == {"count": 1, "p50_s": 0.1, "p99_s": 0.1}


def test_a_database_holding_loopchat_keys_is_refused_and_left_alone(
    redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("loopchat:registry:seq:policy", 3)
    with pytest.raises(LearnError, match="already holds loopchat keys"):
        with bench_redis(redis_url, tmp_path):
            pass
    assert client.get("loopchat:registry:seq:policy") == b"3"


def test_an_empty_database_is_left_as_found(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("other:app:key", 1)
    with bench_redis(redis_url, tmp_path) as url:
        redis.Redis.from_url(url).xadd("loopchat:feedback", {"event": "{}"})
        redis.Redis.from_url(url).lpush("learn", "a queued round")  # the Celery queue
    assert client.keys() == [b"other:app:key"]


def test_without_a_url_a_private_redis_server_runs_for_the_benchmark(tmp_path: Path) -> None:
    with bench_redis(None, tmp_path) as url:
        assert url.startswith("unix://")
        assert redis.Redis.from_url(url).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url).ping()
