"""``loopchat up``: serve the chat API and pages, with a learning worker beside it.

Settings come from flags, then ``LOOPCHAT_*`` variables, then defaults. The Redis URL is resolved
here, before anything starts, so that the worker child process inherits it (with nothing
configured that is the embedded server this process starts). The listening socket is bound
first too: a busy port fails at once instead of after the model has loaded.

SIGINT or SIGTERM stops accepting connections, lets in-flight requests finish, shuts the engine
down, then stops the worker. Meanwhile a supervisor thread (``serve.supervisor``) restarts the
worker or the embedded redis-server if either dies (``LOOPCHAT_SUPERVISE``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from serve.cli import CLIError
from serve.settings import Settings
from serve.supervisor import Child, Supervisor, WorkerProcess

if TYPE_CHECKING:
    from fastapi import FastAPI


def register(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--model", help="model directory to serve if no version is live yet (default: built-in)"
    )
    parser.add_argument("--engine", choices=["vllm", "hf"], help="inference engine (vllm)")
    parser.add_argument("--host", help="bind address (127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (8000; 0 picks a free one)")
    parser.add_argument(
        "--no-worker", action="store_true", help="do not start a learning worker alongside"
    )
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with the given flags overriding the environment."""
    from pydantic import ValidationError

    flags = {"engine": args.engine, "host": args.host, "port": args.port}
    overrides = {name: value for name, value in flags.items() if value is not None}
    if args.model is not None:
        model = Path(args.model).expanduser().resolve()
        if not (model / "config.json").is_file():
            raise CLIError(f"--model {args.model}: not a Hugging Face model directory")
        overrides["model"] = str(model)
    if args.no_worker:
        overrides["worker"] = False
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "settings"
        where = f"--{name} / " if name in flags else ""
        raise CLIError(f"{name} ({where}LOOPCHAT_{name.upper()}): {first['msg']}") from None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a busy port is reported before the model loads."""
    try:
        sock = socket.create_server((host, port), family=_family(host), reuse_port=False)
    except OSError as exc:
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_redis(url: str) -> None:
    """Fail with one line, not a traceback from the app's startup, when Redis is unreachable."""
    import redis

    from serve.store import sync_client

    client = sync_client(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CLIError(f"cannot reach Redis at {url}: {exc}") from None
    finally:
        client.close()


def freeze_startup_objects() -> None:
    """Exempt what startup loaded from the cyclic garbage collector's full collections.

    torch, transformers, gradio and the model leave ~650k objects that live as long as the
    process, and each full collection walks all of them: under load that was ~0.5 s every few
    seconds (measured: 2.2 s of a 15 s run at 500 rankings/s). Frozen, a full collection only
    walks what was allocated since. The price: a reference cycle among frozen objects is never
    freed (reference counting still frees everything else), so at most what startup built.
    Done here, in the serving process, not in the app's lifespan: in-process test clients
    start many apps and should not keep them all.
    """
    gc.collect()
    gc.freeze()


def supervise(settings: Settings, worker: WorkerProcess | None) -> Supervisor | None:
    """Start restarting the embedded redis-server and the worker when they die (if asked)."""
    from serve.store import embedded_server

    embedded = embedded_server()
    children: list[Child] = [child for child in (embedded, worker) if child is not None]
    if not settings.supervise or not children:
        return None
    return Supervisor(children).start()


def build_app(settings: Settings) -> FastAPI:
    """The served app: the API with the chat and ops pages, and the built-in model as the
    default. Composed here because the CLI is the one layer allowed to import ``serve``,
    ``ui`` and ``learn`` alike; ``serve.app`` only receives them. Imported lazily: gradio and
    the training code load only when a server starts, not for every ``loopchat`` command."""
    from learn.bootstrap import ensure_builtin_model
    from serve.app import create_app
    from ui.chat import mount_chat
    from ui.ops import mount_ops

    return create_app(
        settings,
        pages=(mount_chat, mount_ops),
        default_model=lambda s: ensure_builtin_model(s.data_dir),  # trains once, then cached
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    sock = bind(settings.host, settings.port)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    import uvicorn

    from serve.logsafe import AccessLogFilter
    from serve.store import resolve_redis_url

    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    check_redis(resolve_redis_url(settings))  # exported to the environment the worker inherits

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # the app's lifespan has run: the engine and pages are loaded
                freeze_startup_objects()
                print(f"loopchat: serving on {url}  (OpenAI base URL {url}/v1)", flush=True)

    config = uvicorn.Config(
        build_app(settings),
        log_level="info",
        timeout_graceful_shutdown=60,
        lifespan="on",
        access_log=settings.access_log,
    )
    logging.getLogger("uvicorn.access").addFilter(AccessLogFilter())  # after Config set logging
    # uvicorn re-raises the signal that stopped it: SIGTERM then exits 0 through the finally below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker = WorkerProcess() if settings.worker else None
    supervisor = supervise(settings, worker)
    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        if supervisor is not None:
            supervisor.stop()
        if worker is not None:
            worker.stop()
        sock.close()
    if not server.started:
        print("loopchat up: startup failed (the reason is logged above)", file=sys.stderr)
        return 1
    return 0
