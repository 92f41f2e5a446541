"""``tilemask serve``: a folder of outputs for GIS and medical viewers (docs/DESIGN.md section 10).

:func:`create_app` builds the read-only ASGI app (``app.py``); :func:`serve` runs
it with uvicorn on a socket it binds itself, so ``--port 0`` works and the first
line printed is the address actually served. With more than one worker,
uvicorn's supervisor starts that many processes on the socket (each builds the
app from :func:`app_from_environment`), so tiles and features use every core
instead of one interpreter's GIL.

The app's modules (rio-tiler, dask, FastAPI: seconds) are imported when first used, not with this package: each
server process imports this package first to configure its logging (:class:`CutShortQuietly`), before it
answers its supervisor's health checks, and a process that has not answered in 5 s is killed and started again.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import logging
import os
import socket

__all__ = ["create_app", "default_workers", "serve"]

_SETTINGS = "TILEMASK_SERVE_SETTINGS"  # how the worker processes learn the folder and CORS origins
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def __getattr__(name: str):
    if name == "create_app":  # imported when first used: see the module's docstring
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CutShortQuietly(logging.Filter):
    """Leaves out the traceback uvicorn logs for each request still running when a stopped server's grace (2 s)
    ends: 60 lines of asyncio's ``CancelledError`` after a Ctrl-C, where its own line above them ("Cancel 1
    running task(s), timeout graceful shutdown exceeded") says what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def log_config() -> dict:
    """uvicorn's logging, with :class:`CutShortQuietly` on its handler (in each server process: uvicorn's
    supervisor configures the logging of the processes it starts from this)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"cut_short": {"()": f"{__name__}.CutShortQuietly"}}
    config["handlers"]["default"]["filters"] = ["cut_short"]
    return config


def quiet_supervisor():
    """uvicorn's supervisor, whose first server processes start with SIGINT ignored: a Ctrl-C to the terminal's
    process group while one imported its modules ended it with a KeyboardInterrupt traceback. An ignored signal
    stays ignored through exec, and Python then installs no KeyboardInterrupt of its own; each server takes SIGINT
    again once it installs its handlers, and the supervisor stops them itself (SIGTERM). Only while it starts
    them, which waits for none: a restart waits for its new process to answer, and ignoring SIGINT then would lose
    a Ctrl-C."""
    import signal

    from uvicorn.supervisors import Multiprocess

    class QuietStart(Multiprocess):
        def init_processes(self) -> None:
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                super().init_processes()
            finally:
                signal.signal(signal.SIGINT, handler)  # the supervisor's own

    return QuietStart


def default_workers() -> int:
    """One process per core, at most 4 (each holds GDAL's block cache and the open datasets)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def app_from_environment():
    """The app of a worker process started by uvicorn's supervisor."""
    from .app import create_app

    settings = json.loads(os.environ[_SETTINGS])
    return create_app(settings["folder"], tuple(settings["cors_origins"]), tuple(settings["allowed_hosts"]))


def allowed_hosts(host: str, address: str) -> tuple[str, ...]:
    """Loopback names, and the ``host`` given, when listening on a loopback ``address`` (no DNS rebinding: any
    of 127.0.0.0/8, or a name that resolves there, as Debian's own host name does to 127.0.1.1); any name when
    shared on purpose."""
    if host in LOOPBACK_NAMES:
        return LOOPBACK_NAMES
    ip = ipaddress.ip_address(address)
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1: Python's is_loopback says False (3.11)
    return (*LOOPBACK_NAMES, host) if ip.is_loopback else ("*",)


def serve(
    folder: str, host: str = "127.0.0.1", port: int = 8000, cors_origins: tuple[str, ...] = (), workers: int = 1
) -> None:
    import click
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from ..errors import InputError, RunError
    from .app import create_app

    if not host.strip():  # "" is every interface to bind(), and the address shown would be http://:PORT/
        raise InputError("cannot listen on an empty --host: give an address (127.0.0.1, the default; 0.0.0.0 "
                         "shares the folder on every interface)")  # fmt: skip
    create_app(folder, cors_origins)  # refuses a bad folder here, with one line, before anything listens
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    address, bound_port = sock.getsockname()[:2]
    hosts = allowed_hosts(host, address)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    os.environ[_SETTINGS] = json.dumps(
        {"folder": os.path.abspath(folder), "cors_origins": list(cors_origins), "allowed_hosts": list(hosts)}
    )
    config = uvicorn.Config(
        "tilemask.serve:app_from_environment", factory=True, workers=workers,
        log_config=log_config(), log_level="warning", access_log=False, timeout_graceful_shutdown=2,
    )  # fmt: skip
    click.echo(f"tilemask: serving {folder} at http://{shown}:{bound_port}/ with {workers} worker(s) (Ctrl-C to stop)")
    if workers > 1:
        supervisor = quiet_supervisor()(config, sockets=[sock])
        supervisor.run()  # returns once SIGINT or SIGTERM stopped it, or a process could not start
        if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
            raise RunError("a server process could not start (its error is above)")
        raise KeyboardInterrupt  # as the one-process server re-raises the signal: exit 130, as every command
    else:
        uvicorn.Server(config).run(sockets=[sock])
