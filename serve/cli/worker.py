"""``loopchat worker`` (the Celery learning worker) and ``loopchat learn round`` (one round now).

``loopchat worker`` runs Celery in this process on the ``learn`` queue with the solo pool:
one round at a time, in the process that holds the model (one worker per GPU). ``loopchat
learn round`` runs the very code of the task, synchronously, and prints the round's record as
JSON; with ``--async`` it queues the task for a worker instead (``--wait`` waits for it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from serve.cli import CLIError


def register(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "worker":
        parser.add_argument("--loglevel", default="INFO", help="Celery log level.")
        parser.add_argument(
            "--hostname", default=None, help="Worker node name (default learn-<pid>@<host>)."
        )
        parser.set_defaults(func=_worker)
        return
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    round_ = sub.add_parser("round", help="run one learning round now and print its metrics")
    round_.add_argument(
        "--config",
        default=None,
        help='JSON overrides of LoopConfig, e.g. \'{"ppo": {"steps": 4}, "max_prompts": 8}\'.',
    )
    round_.add_argument(
        "--async",
        dest="queue",
        action="store_true",
        help="queue the round for a `loopchat worker` instead of running it here",
    )
    round_.add_argument(
        "--wait", action="store_true", help="with --async: wait for the round and print it"
    )
    round_.set_defaults(func=_round)


def _worker(args: argparse.Namespace) -> int:
    from learn.celery_app import app

    hostname = args.hostname or f"learn-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(
        [
            "worker",
            "--queues=learn",
            "--pool=solo",
            "--concurrency=1",
            f"--loglevel={args.loglevel}",
            f"--hostname={hostname}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def _parse_config(raw: str | None) -> dict:
    if raw is None:
        return {}
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--config is not valid JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise CLIError("--config must be a JSON object of LoopConfig fields")
    from learn.loop import LoopConfig
    from serve.settings import Settings

    try:
        LoopConfig.from_settings(Settings(), overrides)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--config: {exc}") from None
    return overrides


def _round(args: argparse.Namespace) -> int:
    overrides = _parse_config(args.config)
    if args.queue:
        from serve.loop_trigger import celery_client, send_round
        from serve.settings import Settings
        from serve.store import resolve_redis_url

        url = resolve_redis_url(Settings())
        task_id = send_round(url, config=overrides)
        if not args.wait:
            print(json.dumps({"queued": task_id}))
            return 0
        try:
            record = celery_client(url).AsyncResult(task_id).get()
        except Exception as exc:  # the worker's error, re-raised here by Celery
            raise CLIError(f"round {task_id} failed: {type(exc).__name__}: {exc}") from None
    else:
        from learn.loop import LoopConfig, run_round
        from serve.settings import Settings

        settings = Settings()
        record = run_round(config=LoopConfig.from_settings(settings, overrides), settings=settings)
    json.dump(record, sys.stdout, indent=2)
    print()
    return 0
