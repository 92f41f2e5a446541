"""``tilemask serve``: a folder of outputs for GIS and medical viewers (DESIGN section 10).

:func:`create_app` builds the read-only ASGI app (``app.py``); :func:`serve` runs
it with uvicorn on a socket it binds itself, so ``--port 0`` works and the first
line printed is the address actually served.
"""

from __future__ import annotations

import socket

from .app import create_app

__all__ = ["create_app", "serve"]


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, cors_origins: tuple[str, ...] = ()) -> None:
    import click
    import uvicorn

    from ..errors import InputError

    app = create_app(folder, cors_origins)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    click.echo(f"tilemask: serving {folder} at http://{shown}:{bound_port}/ (Ctrl-C to stop)")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
