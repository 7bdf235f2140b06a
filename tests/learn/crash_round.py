"""Run one learning round and ``kill -9`` this process right after a chosen step of it.

``python -m tests.learn.crash_round ROUND_ID STEP``: STEP is ``promote`` (just after
``Registry.promote`` returned), ``register`` (after the candidate is registered, before the
gate) or ``commit`` (after the commit, before the promotion and acks). Settings come from the
environment, as in the worker. What the step did stays done; nothing after it runs, no
``finally``, no ``atexit``: the state a worker killed at that moment leaves behind.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from learn import loop
from serve.registry import Registry

STEPS: dict[str, tuple[Any, str]] = {
    "promote": (Registry, "promote"),
    "register": (Registry, "set_candidate"),
    "commit": (loop, "_commit"),
}


def die_after(owner: Any, name: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def step_then_die(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, name, step_then_die)


if __name__ == "__main__":
    round_id, step = sys.argv[1], sys.argv[2]
    die_after(*STEPS[step])
    loop.run_round(round_id)
    sys.exit(f"round {round_id} finished without reaching {step}")
