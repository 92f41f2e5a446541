"""tilemask: segment images too big for one process, on a Dask cluster, with MONAI's answer."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import TilemaskError  # noqa: E402


def __getattr__(name: str):
    if name == "Workflow":  # imported when first used: pydantic and the models take most of a second, which the
        from .workflow import Workflow  # ``tilemask`` command spends where a Ctrl-C is its own (tilemask.__main__)

        return Workflow
    raise AttributeError(f"module 'tilemask' has no attribute {name!r}")


def run(workflow, client=None, **kwargs):
    """Run a workflow (a :class:`Workflow`, a YAML path, or the mapping one holds) as a job on ``client`` (else
    an embedded cluster); keywords as the command's options: ``scheduler``, ``workers``, ``threads_per_worker``,
    ``cluster``, ``progress``, ``overwrite``, ``on_error``, ``retry_failed``, ``job_dir``. One result per input;
    see :func:`tilemask.driver.run`."""
    from .driver import run as _run

    return _run(workflow, client, **kwargs)


def open_result(path, variable="labels", chunks=None):
    """A tilemask output (COG, Zarr, OME-Zarr, NIfTI labels) as a lazy xarray DataArray; see
    :func:`tilemask.results.open_result`."""
    from .results import open_result as _open_result

    return _open_result(path, variable, chunks)


__all__ = ["TilemaskError", "Workflow", "__version__", "open_result", "run"]
