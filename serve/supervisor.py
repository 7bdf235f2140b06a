"""Keep ``loopchat up``'s children running: the learning worker and the embedded redis-server.

Without it a worker killed by the OOM killer, or a redis-server that crashed, stayed dead while
the API kept answering. A :class:`Supervisor` thread checks each child every ``interval``
seconds and restarts a dead one, backing off (1, 2, 4 … 60 s) when it keeps dying quickly so a
child that cannot start does not spin. ``GET /health`` reports the gap meanwhile
(``serve.health``). Redis is listed first: a worker restarted before its Redis would only fail.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from typing import Protocol

log = logging.getLogger("loopchat.supervisor")

STABLE_S = 30.0  # a child that lived this long after a restart has its back-off reset
MAX_BACKOFF_S = 60.0


class Child(Protocol):
    name: str

    def alive(self) -> bool: ...

    def restart(self) -> None: ...


class WorkerProcess:
    """``loopchat worker`` as a child process with this process's environment (and Redis)."""

    name = "worker"

    def __init__(self) -> None:
        self.process = self._spawn()

    @staticmethod
    def _spawn() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "worker"], env=os.environ.copy()
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def restart(self) -> None:
        self.process = self._spawn()

    def stop(self, timeout: float = 30) -> None:
        stop_process(self.process, timeout)


def stop_process(process: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL if ``process`` has not exited within ``timeout``; its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class Supervisor:
    """Restarts dead children from a daemon thread until :meth:`stop`."""

    def __init__(self, children: list[Child], interval: float = 1.0) -> None:
        self.children = children
        self.interval = interval
        self.restarts = {child.name: 0 for child in children}
        self._failures = {child.name: 0 for child in children}
        self._restarted_at = {child.name: 0.0 for child in children}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def backoff(self, name: str) -> float:
        """Seconds to wait before restarting ``name`` again: doubling while it dies young."""
        failures = self._failures[name]
        return 0.0 if failures == 0 else min(MAX_BACKOFF_S, 2.0 ** (failures - 1))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for child in self.children:
                if not self._stop.is_set():
                    self.check(child)

    def check(self, child: Child) -> None:
        """Restart ``child`` if it is dead and its back-off has passed."""
        name, now = child.name, time.monotonic()
        if child.alive():
            if self._failures[name] and now - self._restarted_at[name] > STABLE_S:
                self._failures[name] = 0
            return
        if now - self._restarted_at[name] < self.backoff(name):
            return
        log.warning("%s died; restarting it (restart %d)", name, self.restarts[name] + 1)
        self._restarted_at[name] = now
        self._failures[name] += 1
        try:
            child.restart()
        except Exception:
            log.exception("could not restart %s; trying again in %.0f s", name, self.backoff(name))
            return
        self.restarts[name] += 1
