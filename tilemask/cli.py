"""The ``tilemask`` command: parse, open a client, call the library."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

import click

from . import __version__
from .command import TilemaskCommand, TilemaskGroup, errors_only, scheduler_address
from .interrupts import STOP_SIGNALS

logger = logging.getLogger(__name__)


@click.group(cls=TilemaskGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tilemask")
@click.option("-v", "--verbose", count=True, help="Say more: -v one line per stage, -vv debug.")
@click.option("-q", "--quiet", count=True, help="Say less: errors only.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Segment images too big for one process on a Dask cluster."""
    ctx.obj = {"verbosity": verbose - quiet}


def job_options(command):
    """The options ``run`` and ``submit`` share: how the job runs and where it is recorded."""
    for option in reversed([
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a workflow key, e.g. output.chunks=1024."),
        click.option("--overwrite", is_flag=True, help="Redo every item, replacing outputs an earlier tilemask run "
                     "wrote (labels, polygons, tables and quick looks carry its mark; a file without it is refused). "
                     "A CSV or JSON-records table has no place for a mark: any such file at its path is replaced."),
        click.option("--on-error", type=click.Choice(["abort", "skip"]), default="abort", show_default=True,
                     help="On a failed input: stop the run, or record it and go on (exit 1 at the end)."),
        click.option("--retry-failed", is_flag=True, help="Redo the inputs that failed in an earlier run of this job."),
        click.option("--job-dir", type=click.Path(file_okay=False), help="The job's folder (default: <output folder>/.tilemask/jobs/<id>)."),
    ]):  # fmt: skip
        command = option(command)
    return command


@main.command(cls=TilemaskCommand, short_help="Segment the inputs of a workflow, as a job (resumes).")
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--scheduler", metavar="ADDRESS", callback=scheduler_address,
              help="This Dask scheduler: its address or scheduler file (default: an embedded local cluster).")
@click.option("--cluster", "cluster_kind", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="Without --scheduler: an embedded cluster, or SLURM jobs (dask-jobqueue, Dask config jobqueue.slurm).")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes of the embedded cluster (SLURM: jobs).")
@click.option("--threads-per-worker", type=click.IntRange(min=1), help="Threads per worker of the embedded cluster.")
@job_options
@click.option("--no-progress", "--quiet", "quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def run(
    workflow, scheduler, cluster_kind, workers, threads_per_worker, overrides, overwrite, on_error, retry_failed, job_dir,
    quiet, debug,
) -> None:
    """Segment the inputs of WORKFLOW.yaml and write the masks (a job: run it again to resume)."""
    if scheduler is None and cluster_kind == "local":
        from . import forkserver

        forkserver.start()  # the embedded cluster's workers: imported meanwhile, forked later
    from .driver import run as run_workflow
    from .workflow import Workflow

    quiet = quiet or errors_only()
    wf = Workflow.from_yaml(workflow, overrides)
    shown = None if errors_only() else (lambda result: click.echo(describe(result)))  # each as it is known
    results = run_workflow(
        wf,
        scheduler=scheduler,
        workers=workers,
        threads_per_worker=threads_per_worker,
        progress=not quiet,
        overwrite=overwrite,
        on_error=on_error,
        retry_failed=retry_failed,
        job_dir=job_dir,
        source=str(Path(workflow).resolve()),
        cluster=cluster_kind,
        on_result=shown,
    )
    failed = results.failures()
    if failed:
        click.echo(f"tilemask: {failed}", err=True)
        sys.exit(1)


def describe(result) -> str:
    """One line per input of a run, a URL's input without its credentials (a password, a SAS token), after the
    item's name where that is not the file's (:attr:`~tilemask.engine.RunResult.named`)."""
    shown = result.named
    if result.failed_before:
        return f"{shown}: failed in an earlier run (--retry-failed tries it again): {result.error}"
    if result.status == "failed":
        return f"{shown}: failed: {result.error}"
    if result.status == "skipped":
        return f"{shown}: done in an earlier run -> {', '.join(result.outputs)}"
    counts = ", ".join(f"{name} {n}" for name, n in result.class_pixels.items())
    rate = [f"{result.windows / max(result.seconds, 1e-9):.1f} windows/s"] if result.windows else []
    if result.resumed_chunks:  # "0 windows (0.0 windows/s)" alone read as a run that did nothing
        rate.append(f"{result.resumed_chunks} chunks written in an earlier run")
    return (f"{shown}: {result.windows} windows in {result.seconds:.1f} s ({'; '.join(rate) or '0 windows/s'}) -> "
            f"{', '.join(result.outputs)} [{counts}]")  # fmt: skip


@main.command(cls=TilemaskCommand, short_help="Serve a folder of outputs to GIS and medical viewers.")
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

from . import job_commands  # noqa: E402,F401  # submit, status, cancel, jobs: registered on main


def console() -> NoReturn:
    """The ``tilemask`` console script: :func:`main`, then an exit that skips the interpreter's teardown.

    When a command returns, its outputs are written, closed and published.  What
    a normal exit then adds is Python freeing every module and the C libraries'
    destructors: 0.4-1.1 s here with distributed, rasterio and geopandas imported,
    after every command.  So, as at any exit, the threads that are not daemons
    are waited for and the ``atexit`` handlers run (logging's flush, the
    embedded cluster's child processes); then the process exits at once with the
    command's status.  An exception other than ``SystemExit`` (``--debug``)
    takes Python's own way out, traceback and all.

    A Ctrl-C or SIGTERM outside a command's own handling is ``tilemask: interrupted``, exit 130, too: before it
    (while click parses the arguments) it stops the command; once the command has returned it is held until the
    exit's waits and handlers are done, and a second one leaves at once.  A Ctrl-C there was a traceback, and a
    SIGTERM a silent death by the signal (a review's, sent as the summary line was printed).
    """
    returned, stops = [], []

    def stop(signum, frame) -> None:
        if not returned:
            raise KeyboardInterrupt
        if stops:
            _leave(130, "tilemask: interrupted")
        stops.append(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        try:
            main()
            status = 0
        except SystemExit as exc:
            status = exc.code
        returned.append(True)
    except KeyboardInterrupt:  # between the command's own handling and this
        returned.append(True)
        print("tilemask: interrupted", file=sys.stderr)
        status = 130
    if status is None:
        status = 0
    elif not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    threading._shutdown()  # what the interpreter's exit does first: join the threads that are not daemons
    atexit._run_exitfuncs()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # one that comes from here on is pending, not lost
    if stops or signal.sigpending() & set(STOP_SIGNALS):
        _leave(130, "tilemask: interrupted")
    _leave(status)


def _leave(status: int, line: str | None = None) -> NoReturn:
    if line:
        print(line, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``| head``) or stream: nothing left to tell it
            pass
    os._exit(status)


if __name__ == "__main__":  # python -m tilemask.cli: the command as its console script runs it (this module is
    from tilemask.__main__ import main as command  # then imported anew as tilemask.cli, where the commands are)

    command()
