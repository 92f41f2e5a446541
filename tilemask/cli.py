"""The ``tilemask`` command: parse, open a client, call the library."""

from __future__ import annotations

import logging
import sys
import warnings

import click

from . import __version__
from .errors import TilemaskError

logger = logging.getLogger(__name__)


class _Command(click.Command):
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


def _configure_logging(debug: bool) -> None:
    """Debug logs and library warnings with --debug; otherwise only tilemask's own warnings."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        warnings.simplefilter("ignore")
        logging.getLogger("distributed").setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tilemask")
def main() -> None:
    """Segment images too big for one process on a Dask cluster."""


@main.command(cls=_Command)
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--scheduler", metavar="ADDRESS", help="Run on this Dask scheduler (default: an embedded local cluster).")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes of the embedded cluster.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), help="Threads per worker of the embedded cluster.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a workflow key, e.g. output.chunks=1024.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def run(workflow, scheduler, workers, threads_per_worker, overrides, quiet, debug) -> None:
    """Segment the inputs of WORKFLOW.yaml and write the masks."""
    from .engine import run as run_workflow
    from .workflow import Workflow

    _configure_logging(debug)
    wf = Workflow.from_yaml(workflow, overrides)
    results = run_workflow(
        wf, scheduler=scheduler, workers=workers, threads_per_worker=threads_per_worker, progress=not quiet
    )
    for result in results:
        counts = ", ".join(f"{name} {n}" for name, n in result.class_pixels.items())
        click.echo(
            f"{result.input}: {result.windows} windows in {result.seconds:.1f} s "
            f"({result.windows / max(result.seconds, 1e-9):.1f} windows/s) -> {', '.join(result.outputs)} [{counts}]"
        )


if __name__ == "__main__":
    sys.exit(main())
