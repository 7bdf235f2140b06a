"""What the service benchmarks share: a private ``loopchat up`` process, statistics, results.

Every service benchmark measures the real thing from outside: it starts ``loopchat up`` as a
child process on 127.0.0.1 (a free port, its own data dir and, unless ``--redis-url`` names one,
its own embedded redis-server), talks to it over HTTP like any client, and stops it. Inherited
``LOOPCHAT_*`` variables are dropped so a run depends only on its flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from learn.errors import LearnError

HOST = "127.0.0.1"  # benchmarks only ever send traffic to this machine


def add_common_arguments(parser: argparse.ArgumentParser, engine: str = "vllm") -> None:
    """Flags every service benchmark takes."""
    parser.add_argument(
        "--model", default=None, help="Model directory to serve (default: the built-in model)."
    )
    parser.add_argument(
        "--out", default="results", help="Folder for the JSON results and PNG plots."
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="An empty Redis database to use (default: a private embedded redis-server).",
    )
    if engine:
        parser.add_argument(
            "--engine", choices=["vllm", "hf"], default=engine, help=f"Engine ({engine})."
        )


def model_dir(arg: str | None) -> Path:
    """``--model``, or the built-in model (trained once into the default data dir, then reused)."""
    if arg:
        path = Path(arg).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise LearnError(f"--model {arg}: not a Hugging Face model directory")
        return path
    from learn.bootstrap import ensure_builtin_model
    from serve.settings import Settings

    return ensure_builtin_model(Settings().data_dir)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_stats(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """Count, p50 and p99 of latencies in seconds."""
    return {
        "count": len(seconds),
        "p50_s": percentile(seconds, 50),
        "p99_s": percentile(seconds, 99),
    }


# Read when the chosen benchmark's module imports this one, i.e. before it loads the machine:
# what else was running. The load when the result is written is mostly the benchmark's own.
LOAD_AT_START = os.getloadavg()[0]


def machine() -> dict[str, Any]:
    """Where a result was measured (numbers only mean something next to this)."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m_at_start": round(LOAD_AT_START, 2),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }


def write_result(out: str | Path, name: str, result: dict[str, Any]) -> Path:
    """Write ``<out>/<name>.json`` (stamped with time and machine) and return its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    stamped = {"benchmark": name, "time": time.time(), "machine": machine(), **result}
    path.write_text(json.dumps(stamped, indent=2) + "\n")
    return path


def figure(rows: int = 1, cols: int = 2, width: float = 11, height: float = 4) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(width, height), squeeze=False)


def save_figure(fig: Any, out: str | Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = Path(out) / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MemoryPeak:
    """Peak resident memory of a process tree, sampled in a thread: the API process with its
    engine core, and the learning worker (a child running ``serve.cli worker``) apart."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak = {"serve_mb": 0.0, "worker_mb": 0.0, "total_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-peak")
        self._thread.start()

    def _sample(self) -> dict[str, float]:
        import psutil

        root = psutil.Process(self.pid)
        now = {"serve_mb": 0.0, "worker_mb": 0.0}
        for proc in [root, *root.children(recursive=True)]:
            try:
                role = "worker_mb" if "worker" in proc.cmdline() else "serve_mb"
                now[role] += proc.memory_info().rss / 2**20
            except psutil.Error:  # ended between listing and reading
                continue
        return {**now, "total_mb": now["serve_mb"] + now["worker_mb"]}

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            try:
                now = self._sample()
            except psutil.Error:
                return
            self.peak = {k: round(max(self.peak[k], now[k]), 1) for k in self.peak}

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class Service:
    """A running ``loopchat up`` child process and what a benchmark needs to reach it."""

    url: str
    redis_url: str
    data_dir: Path
    admin_token: str
    process: subprocess.Popen
    log: Path
    memory: MemoryPeak | None = None  # peak RSS of serve (+ engine) and worker, MB

    @property
    def checkpoints_url(self) -> str:
        return str(self.data_dir / "checkpoints")

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A working directory removed afterwards (data dirs, checkpoints, logs of one run)."""
    path = Path(tempfile.mkdtemp(prefix=f"loopchat-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def bench_redis(redis_url: str | None, work: Path, fsync: str = "everysec") -> Iterator[str]:
    """The Redis a benchmark runs against: a private embedded redis-server (its AOF fsynced as
    ``fsync`` says, LOOPCHAT_REDIS_FSYNC), or ``redis_url`` if it holds no loopchat keys. A
    given database is left as found: every key that appeared during the run (loopchat's and
    the Celery queue's) is deleted afterwards."""
    from serve.store import start_embedded, sync_client

    if redis_url is None:
        url = start_embedded(work, fsync)
        try:
            yield url
        finally:  # stop it now, while its data dir still exists
            try:
                sync_client(url).shutdown(nosave=True)
            except (redis.ConnectionError, redis.ResponseError):
                pass  # already gone (shutdown closes the connection as it succeeds)
        return
    client = sync_client(redis_url)
    if next(client.scan_iter("loopchat:*", count=1000), None) is not None:
        client.close()
        raise LearnError(f"--redis-url {redis_url} already holds loopchat keys; use an empty db")
    before = set(client.scan_iter(count=1000))
    try:
        yield redis_url
    finally:
        created = [k for k in client.scan_iter(count=1000) if k not in before]
        for start in range(0, len(created), 1000):
            client.delete(*created[start : start + 1000])
        client.close()


@contextmanager
def service(
    model: Path,
    work: Path,
    redis_url: str,
    engine: str,
    worker: bool = False,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
) -> Iterator[Service]:
    """``loopchat up`` on a free local port, healthy, then stopped (worker included)."""
    data_dir = work / f"data-{engine}-{secrets.token_hex(3)}"
    data_dir.mkdir(parents=True)
    port = _free_port()
    token = secrets.token_urlsafe(16)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPCHAT_")}
    full_env.update(
        LOOPCHAT_DATA_DIR=str(data_dir),
        LOOPCHAT_REDIS_URL=redis_url,
        LOOPCHAT_ADMIN_TOKEN=token,
        LOOPCHAT_CHECKPOINTS=str(data_dir / "checkpoints"),
        # a benchmark is one client (one identity) playing many users: no per-identity limits
        LOOPCHAT_CHAT_RATE=str(10**9),
        LOOPCHAT_FEEDBACK_RATE=str(10**9),
        **(env or {}),
    )
    args = [sys.executable, "-m", "serve.cli", "up", "--engine", engine, "--host", HOST]
    args += ["--port", str(port), "--model", str(model)] + ([] if worker else ["--no-worker"])
    log = data_dir / "server.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    svc = Service(f"http://{HOST}:{port}", redis_url, data_dir, token, process, log)
    svc.memory = MemoryPeak(process.pid)
    try:
        _wait_healthy(svc, timeout_s)
        yield svc
    finally:
        svc.memory.stop()
        _stop(process)


def _wait_healthy(svc: Service, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if svc.process.poll() is not None:
            raise LearnError(f"loopchat up exited ({svc.process.returncode}):\n{svc.log_tail()}")
        try:
            if httpx.get(f"{svc.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise LearnError(f"loopchat up not healthy within {timeout_s:.0f} s:\n{svc.log_tail()}")


def _stop(process: subprocess.Popen, timeout_s: float = 60) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
