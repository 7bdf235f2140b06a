"""The checkpoint registry on a real S3 API: moto's server mode in a process of its own.

The store is reached the way a deployment reaches it, through ``AWS_ENDPOINT_URL``; outages
are real: the TCP link to the server is cut mid-upload (connections reset, new ones refused),
then restored or not.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import httpx
import pytest
import redis

from serve.registry import (
    METADATA_FILE,
    CheckpointStoreError,
    Registry,
    backoff_delays,
    is_transient,
)
from serve.store import sync_client
from tests.conftest import free_port
from tests.serve.checkpoint_helpers import same_files

pytest.importorskip("s3fs")
BUCKET = "loopchat-test"


class MotoS3:
    """A moto S3 server in a process of its own, reached through :class:`Cuttable`."""

    def __init__(self, log: Path) -> None:
        port = free_port()
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        with open(log, "wb") as fh:
            self.process = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"moto did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        self.link = Cuttable(port)
        self.url = f"http://127.0.0.1:{self.link.port}"

    def stop(self) -> None:
        self.link.cut()
        self.process.kill()
        self.process.wait()


class Cuttable:
    """A TCP relay to a local port whose link can be cut (connections reset, new ones
    refused: what clients see while an object store restarts) and restored, the store's data
    intact."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    """moto with an empty bucket; the endpoint comes from ``AWS_ENDPOINT_URL`` (what a
    deployment sets). botocore and s3fs try each request once here, so what a test of an
    outage sees is the registry's own retries."""
    import s3fs

    server = MotoS3(tmp_path / "moto.log")
    for name, value in {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.filesystem("s3").mkdir(BUCKET)
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return sync_client(redis_url)


def s3_registry(client: redis.Redis, cache: Path, retries: int = 3) -> Registry:
    return Registry(client, f"s3://{BUCKET}/ckpt", cache, retries=retries, retry_delay_s=0.2)


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    assert backoff_delays(1, 0.5, 8) == []
    assert backoff_delays(4, 0.5, 8) == [0.5, 1.0, 2.0]
    assert backoff_delays(7, 1.0, 8) == [1, 2, 4, 8, 8, 8]


def test_only_errors_that_may_pass_are_transient() -> None:
    from botocore.exceptions import EndpointConnectionError

    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(OSError(5, "InternalError"))
    assert not is_transient(FileNotFoundError("v3/config.json"))
    assert not is_transient(PermissionError("AccessDenied"))
    assert not is_transient(ValueError("bad"))


def test_a_version_in_s3_is_fetched_by_another_host(
    s3: MotoS3, client: redis.Redis, tiny_model: Path, tmp_path: Path
) -> None:
    writer = s3_registry(client, tmp_path / "worker-cache")
    assert not writer.is_local
    version = writer.ensure_live(tiny_model)[0]
    reader = s3_registry(client, tmp_path / "api-cache")
    local = reader.local_path(version)
    assert local == tmp_path / "api-cache" / version
    assert same_files(local, tiny_model)
    assert fsspec.filesystem("s3").exists(f"{BUCKET}/ckpt/{version}/{METADATA_FILE}")


def test_a_store_cut_off_mid_upload_is_retried_until_the_version_is_whole(
    s3: MotoS3, client: redis.Redis, tiny_model: Path, tmp_path: Path
) -> None:
    registry = s3_registry(client, tmp_path / "cache", retries=8)
    registry.ensure_live(tiny_model)
    real_put = registry.fs.put_file
    cut: list[float] = []

    def put_then_cut(*args: object, **kwargs: object) -> None:
        real_put(*args, **kwargs)
        if not cut:  # the store goes away after the first file, for 2 s
            cut.append(time.monotonic())
            s3.link.cut()
            threading.Timer(2.0, s3.link.restore).start()

    registry.fs.put_file = put_then_cut  # type: ignore[method-assign]
    version = registry.register(tiny_model, "ppo", "v1", {})
    assert cut and time.monotonic() - cut[0] >= 2.0
    assert version == "v2" and [m["version"] for m in registry.versions()] == ["v1", "v2"]
    other = s3_registry(client, tmp_path / "other-cache")
    assert same_files(other.local_path("v2"), tiny_model)


def test_an_upload_that_keeps_failing_registers_nothing(
    s3: MotoS3, client: redis.Redis, tiny_model: Path, tmp_path: Path
) -> None:
    registry = s3_registry(client, tmp_path / "cache", retries=3)
    registry.ensure_live(tiny_model)
    real_put = registry.fs.put_file

    def put_then_cut(*args: object, **kwargs: object) -> None:
        real_put(*args, **kwargs)
        s3.link.cut()  # down for longer than every retry

    registry.fs.put_file = put_then_cut  # type: ignore[method-assign]
    with pytest.raises(CheckpointStoreError, match="failed 3 times"):
        registry.register(tiny_model, "ppo", "v1", {})
    s3.link.restore()
    assert [m["version"] for m in registry.versions()] == ["v1"]
    assert registry.aliases() == {"live": "v1", "candidate": None, "previous": None}
    store = fsspec.filesystem("s3")
    store.invalidate_cache()
    assert not store.exists(f"{BUCKET}/ckpt/v2/{METADATA_FILE}")
    # the store is back: the orphan's name is never handed out again
    registry.fs.put_file = real_put  # type: ignore[method-assign]
    assert registry.register(tiny_model, "ppo", "v1", {}) == "v3"
    assert same_files(s3_registry(client, tmp_path / "other").local_path("v3"), tiny_model)
