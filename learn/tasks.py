"""Celery tasks: thin wrappers that pass ids and plain dicts to the learning code."""

from __future__ import annotations

from typing import Any

from celery import Task

from learn import loop
from learn.celery_app import app
from serve.settings import Settings


@app.task(name="learn.tasks.run_round", bind=True)
def run_round(self: Task, config: dict[str, Any] | None = None, claimed: int = 0) -> dict[str, Any]:
    """One learning round (``learn.loop.run_round``); the task id is the round id, so a
    redelivered message repeats the same round, which the loop recognises and does not redo.
    ``config`` overrides ``LoopConfig`` fields on top of ``LOOPCHAT_LOOP_CONFIG``; ``claimed``
    is the trigger counts the queuing ranking took (given back if the round is skipped)."""
    settings = Settings()
    return loop.run_round(
        round_id=self.request.id,
        config=loop.LoopConfig.from_settings(settings, config),
        settings=settings,
        claimed=claimed,
    )
