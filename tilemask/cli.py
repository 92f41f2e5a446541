"""The ``tilemask`` command: parse, open a client, call the library."""

from __future__ import annotations

import logging
import sys

import click

from . import __version__
from .command import TilemaskCommand

logger = logging.getLogger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tilemask")
@click.option("-v", "--verbose", count=True, help="Say more: -v one line per stage, -vv debug.")
@click.option("-q", "--quiet", count=True, help="Say less: errors only.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Segment images too big for one process on a Dask cluster."""
    ctx.obj = {"verbosity": verbose - quiet}


@main.command(cls=TilemaskCommand)
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--scheduler", metavar="ADDRESS", help="Run on this Dask scheduler (default: an embedded local cluster).")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes of the embedded cluster.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), help="Threads per worker of the embedded cluster.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a workflow key, e.g. output.chunks=1024.")
@click.option("--overwrite", is_flag=True, help="Replace outputs that an earlier tilemask run wrote.")
@click.option("--no-progress", "--quiet", "quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def run(workflow, scheduler, workers, threads_per_worker, overrides, overwrite, quiet, debug) -> None:
    """Segment the inputs of WORKFLOW.yaml and write the masks."""
    from .engine import run as run_workflow
    from .workflow import Workflow

    wf = Workflow.from_yaml(workflow, overrides)
    results = run_workflow(
        wf,
        scheduler=scheduler,
        workers=workers,
        threads_per_worker=threads_per_worker,
        progress=not quiet,
        overwrite=overwrite,
    )
    for result in results:
        counts = ", ".join(f"{name} {n}" for name, n in result.class_pixels.items())
        click.echo(
            f"{result.input}: {result.windows} windows in {result.seconds:.1f} s "
            f"({result.windows / max(result.seconds, 1e-9):.1f} windows/s) -> {', '.join(result.outputs)} [{counts}]"
        )


@main.command(cls=TilemaskCommand)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: a free one).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN", help="Allow this origin (CORS); repeat.")
@click.option("--workers", type=click.IntRange(min=1), help="Server processes (default: one per core, at most 4).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def serve(folder, host, port, cors_origins, workers, debug) -> None:
    """Serve a FOLDER of outputs, read-only, to GIS and medical viewers (tiles, features, STAC, pages)."""
    from .serve import default_workers
    from .serve import serve as serve_folder

    serve_folder(folder, host=host, port=port, cors_origins=tuple(cors_origins), workers=workers or default_workers())


def _register_statistics() -> None:
    from .stats.cli import evaluate, stats

    main.add_command(stats)
    main.add_command(evaluate)


_register_statistics()


if __name__ == "__main__":
    sys.exit(main())
