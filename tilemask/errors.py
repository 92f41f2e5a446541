"""tilemask's error tree.

Every error a user can cause is a :class:`TilemaskError` and also the builtin it
resembles, so callers can catch either (as rasterio does with
``RasterioIOError(RasterioError, OSError)``).  ``exit_status`` is what the CLI
exits with: 2 for an invalid workflow, arguments or inputs found before any work
starts, 1 for a failure while running.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator


class TilemaskError(Exception):
    """Base of all errors tilemask reports to users.

    Its ``__cause__`` and ``__context__`` are only builtin exceptions and tilemask's own, whose own links are too
    (and no context that ``raise ... from`` suppressed): Dask carries an error from a worker pickled with that
    chain (tblib), and rasterio's GDAL errors do not unpickle that way (their ``args`` is a read-only property).
    One in the chain turned the whole error into ``Exception: OutputError('...')``, its exit status with it.
    tilemask's messages name the problem themselves.
    """

    exit_status = 1

    @property
    def __cause__(self) -> BaseException | None:
        return _portable(BaseException.__cause__.__get__(self))

    @__cause__.setter
    def __cause__(self, value: BaseException | None) -> None:
        BaseException.__cause__.__set__(self, value)

    @property
    def __context__(self) -> BaseException | None:
        return None if self.__suppress_context__ else _portable(BaseException.__context__.__get__(self))

    @__context__.setter
    def __context__(self, value: BaseException | None) -> None:
        BaseException.__context__.__set__(self, value)


def _portable(link: BaseException | None) -> BaseException | None:
    """``link`` if it and every exception chained to it is builtin or tilemask's, else None."""
    seen: set[int] = set()
    pending = [link]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        if not (isinstance(exc, TilemaskError) or type(exc).__module__ == "builtins"):
            return None
        seen.add(id(exc))
        pending += [exc.__cause__, None if exc.__suppress_context__ else exc.__context__]
    return link


class WorkflowError(TilemaskError, ValueError):
    """The workflow (or a ``--set`` override) is invalid: unknown key, wrong type, impossible value."""

    exit_status = 2


class InputError(TilemaskError, OSError):
    """An input image cannot be found or opened, or does not fit the workflow."""

    exit_status = 2


class WeightsError(TilemaskError, ValueError):
    """A weights file is missing, unsafe (a pickle with code in it) or does not fit the network."""

    exit_status = 2


class ReadError(TilemaskError, OSError):
    """Reading an input failed while running (a truncated or corrupt file)."""

    exit_status = 1


class OutputError(TilemaskError, OSError):
    """An output cannot be written."""

    exit_status = 1


class OutputConflict(TilemaskError, FileExistsError):
    """An output would destroy an input, a file tilemask did not write, or another run's work: refused before work."""

    exit_status = 2


class RunError(TilemaskError, RuntimeError):
    """The cluster could not finish the work: no workers, workers that keep dying."""

    exit_status = 1


class SchedulerUnreached(TilemaskError):
    """The Dask scheduler given cannot be reached (nothing answers at its address): a first run leaves no job."""


class NoWorkers(RunError):
    """The cluster has had no worker for too long mid-run (they died; their SLURM jobs reached their walltime or
    were cancelled): not the items' fault, so the items in flight keep what they staged and are not recorded as
    failed; the job's next run resumes them."""


class JobError(TilemaskError):
    """A job folder that cannot be used: unknown id, corrupt record, another process running it."""

    exit_status = 2


class JobCancelled(TilemaskError):
    """``tilemask cancel`` stopped the job."""

    exit_status = 1


class UsageError(TilemaskError, ValueError):
    """Command-line options or cluster configuration that cannot work together: refused before any work."""

    exit_status = 2


_COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("tilemask_command_line", default=False)


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Inside, messages name options as a command takes them (:func:`option`): the commands run in here."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def on_command_line() -> bool:
    """Whether the caller is a command (inside :func:`command_line`), not Python."""
    return _COMMAND_LINE.get()


def option(name: str, value: str | None = None) -> str:
    """The option ``name`` (a Python argument's name, ``job_dir``) as the caller gives it: ``--job-dir`` to a
    command, ``job_dir`` to a Python function; ``value`` is what a command's flag stands for in Python
    (``overwrite=True``).  One check serves both, each told in its own words."""
    if on_command_line():
        return "--" + name.replace("_", "-")
    return name if value is None else f"{name}={value}"


def given(name: str, value) -> str:
    """The option ``name`` with the ``value`` given, as the caller wrote it: ``--cluster slurm`` to a command,
    ``cluster='slurm'`` to a Python function."""
    return f"--{name.replace('_', '-')} {value}" if on_command_line() else f"{name}={value!r}"


def check_flags(**flags) -> None:
    """Python's True/False arguments: ``"no"`` is no flag (``overwrite="no"`` replaced every output, and
    ``progress="no"`` showed the bars)."""
    for name, value in flags.items():
        if value not in (True, False):
            raise UsageError(f"{name} must be True or False, not {value!r}")


def missing_weights(path: str) -> WeightsError:
    """``model.weights`` that name no file: a folder, or nothing."""
    what = "is a folder, not a weights file" if os.path.isdir(path) else "does not exist"
    return WeightsError(f"model.weights: {path} {what}")


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
