"""tilemask: segment images too big for one process, on a Dask cluster, with MONAI's answer."""

from __future__ import annotations

__version__ = "0.1.0"

import typing as _typing  # noqa: E402

from .errors import TilemaskError  # noqa: E402

if _typing.TYPE_CHECKING:  # the names of run's annotations alone: importing them takes distributed, pydantic and the
    # models; the others' would be offered beside the API (tilemask.os, tilemask.Path)
    import os
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from distributed import Client

    from .driver import JobResults
    from .engine import RunResult
    from .workflow import Workflow


def __getattr__(name: str):
    if name == "Workflow":  # imported when first used: pydantic and the models take most of a second, which the
        from .workflow import Workflow  # ``tilemask`` command spends where a Ctrl-C is its own (tilemask.__main__)

        return Workflow
    raise AttributeError(f"module 'tilemask' has no attribute {name!r}")


def run(
    workflow: Workflow | Mapping | str | Path,
    client: Client | None = None,
    *,
    scheduler: str | os.PathLike | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
    on_error: str = "abort",
    retry_failed: bool = False,
    job_dir: str | os.PathLike | None = None,
    source: str | None = None,
    cluster: str = "local",
    on_result: Callable[[RunResult], None] | None = None,
) -> JobResults:
    """Run a workflow (a :class:`Workflow`, a YAML path, or the mapping one holds) as a job on ``client`` (else
    an embedded cluster); keywords as the command's options: ``scheduler``, ``workers``, ``threads_per_worker``,
    ``cluster``, ``progress``, ``overwrite``, ``on_error``, ``retry_failed``, ``job_dir``; ``source``, the workflow
    file to record in the job; ``on_result``, called with each input's result as it is known. One result per input;
    see :func:`tilemask.driver.run`."""
    from .driver import run as _run

    return _run(workflow, client, scheduler=scheduler, workers=workers, threads_per_worker=threads_per_worker,
                progress=progress, overwrite=overwrite, on_error=on_error, retry_failed=retry_failed, job_dir=job_dir,
                source=source, cluster=cluster, on_result=on_result)  # fmt: skip


def open_result(path, variable="labels", chunks=None):
    """A tilemask output (COG, Zarr, OME-Zarr, NIfTI labels) as a lazy xarray DataArray; see
    :func:`tilemask.results.open_result`."""
    from .results import open_result as _open_result

    return _open_result(path, variable, chunks)


__all__ = ["TilemaskError", "Workflow", "__version__", "open_result", "run"]
