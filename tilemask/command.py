"""What every tilemask command shares: one-line errors with their exit status, quiet logging."""

from __future__ import annotations

import logging
import warnings

import click

from .errors import TilemaskError

logger = logging.getLogger(__name__)


class TilemaskCommand(click.Command):
    """Reports tilemask errors as one line with their exit status (tracebacks only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TilemaskError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"tilemask: error: {exc}", err=True)
            ctx.exit(exc.exit_status)
        except KeyboardInterrupt:
            click.echo("tilemask: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"tilemask: error: {type(exc).__name__}: {exc} (run with --debug for details)", err=True)
            ctx.exit(1)


def configure_logging(debug: bool) -> None:
    """Debug logs and library warnings with --debug; otherwise warnings and Dask's chatter are silenced."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        warnings.simplefilter("ignore")
        logging.getLogger("distributed").setLevel(logging.ERROR)
