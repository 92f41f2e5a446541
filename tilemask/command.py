"""What every tilemask command shares: one-line errors with their exit status, quiet logging."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings
from typing import NoReturn

import click

from .errors import TilemaskError, command_line, first_line

logger = logging.getLogger(__name__)


class TilemaskGroup(click.Group):
    """The ``tilemask`` group: a usage error (an unknown command or option, a missing or invalid argument) is
    one line, ``tilemask: error: ...``, exit 2, as every other refusal; ``--help`` still shows the usage."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _usage_error(ctx, exc)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)  # the command is found and its arguments parsed in here
        except click.UsageError as exc:
            _usage_error(ctx, exc)
        except KeyboardInterrupt:  # while the command's arguments are parsed, before its own handling: click
            click.echo("tilemask: interrupted", err=True)  # would print "Aborted!" and exit 1, as for a failure
            ctx.exit(130)


def _usage_error(ctx: click.Context, exc: click.UsageError) -> NoReturn:
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # ``tilemask`` alone: the help, as click shows it
        raise exc
    message = " ".join(exc.format_message().split())
    command = exc.ctx.command if exc.ctx is not None else None
    if isinstance(exc, click.NoSuchOption) and command is not None and command is not ctx.command:
        own = {name for param in ctx.command.params if not param.is_eager for name in param.opts}  # -v, -q, ...
        if exc.option_name in own:  # ``tilemask run w.yaml -q``: click offered ``Did you mean '--overwrite'?``
            message = (f"{exc.option_name} is an option of tilemask itself, not of {command.name}: give it before "
                       f"the command (tilemask {exc.option_name} {command.name} ...)")
    click.echo(f"tilemask: error: {message}", err=True)
    ctx.exit(exc.exit_code)


class TilemaskCommand(click.Command):
    """Reports tilemask errors as one line with their exit status (tracebacks only with --debug)."""

    def invoke(self, ctx: click.Context):
        from .interrupts import stop_signals

        verbosity = (ctx.find_root().obj or {}).get("verbosity", 0)
        try:
            with stop_signals(), command_line():
                configure_logging(bool(ctx.params.get("debug")), verbosity)  # imports distributed: a second or so
                return super().invoke(ctx)
        except TilemaskError as exc:
            _traceback_if_debug(ctx)
            click.echo(f"tilemask: error: {_shown(first_line(exc))}", err=True)
            ctx.exit(exc.exit_status)
        except KeyboardInterrupt:
            click.echo("tilemask: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # the reader went away (``| head``): nothing to tell it; Python's own rule, exit 1
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is left unflushed goes nowhere
            ctx.exit(1)
        except Exception as exc:
            message = f"{type(exc).__name__}: {_shown(first_line(exc))}"
            if _traceback_if_debug(ctx):
                click.echo(f"tilemask: error: {message}", err=True)
            else:
                click.echo(f"tilemask: error: {message} (run with --debug for details)", err=True)
            ctx.exit(1)


def _traceback_if_debug(ctx: click.Context) -> bool:
    """With ``--debug``, the traceback of the error being handled, its URLs without their credentials as the error's
    line has them (:func:`_shown`): raised as it was, Python printed a SAS token or a password in full."""
    if not ctx.params.get("debug"):
        return False
    click.echo(_shown(traceback.format_exc()).rstrip("\n"), err=True)
    return True


def _shown(message: str) -> str:
    """An error's line as printed: the URLs in it without their credentials (a password, a SAS token), which
    would otherwise end up in terminals, CI logs and tickets (:func:`tilemask.storage.redacted`)."""
    from .storage import redacted

    return redacted(message)


def _without_credentials(record: logging.LogRecord) -> bool:
    """A log record's URLs as :func:`_shown` shows an error's (GDAL's warnings name the URL it was given)."""
    message = record.getMessage()
    shown = _shown(message)
    if shown != message:
        record.msg, record.args = shown, None
    return True


def errors_only() -> bool:
    """``tilemask -q``: a command prints its errors and nothing else."""
    return (click.get_current_context().find_root().obj or {}).get("verbosity", 0) < 0


# a request that got no answer (code 0), or a refusal (4xx but 429: a key refused, an object not there) that GDAL
# does not retry: the open or read then fails, and tilemask's one line names why
_NO_ANSWER = re.compile(r"HTTP response code on .+: (0|4(?!29)\d\d)$")  # a URL may hold a raw space


def scheduler_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--scheduler``: :func:`scheduler_from`, its refusal the option's."""
    try:
        return scheduler_from(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def scheduler_from(value: str | None) -> str | None:
    """A scheduler given as an address (tcp://HOST:PORT), as it is, or as a scheduler file, as ``dask scheduler
    --scheduler-file`` writes it and ``dask worker --scheduler-file`` reads it: its ``address``.  Spaces around it
    are dropped.  ``--scheduler`` and ``tilemask.run(scheduler=)`` alike (Python's refused a file as "missing port
    number").  A ValueError names what is wrong with it."""
    if value is None:
        return None
    value = value.strip()
    if "://" not in value and (value.endswith(".json") or "/" in value) and not os.path.exists(value):
        _wait_for_scheduler_file(value)
    if os.path.isdir(value):
        raise ValueError(f"{value}: a folder, not a Dask scheduler file")
    if not os.path.isfile(value):
        return value
    import json

    try:
        with open(value, encoding="utf-8") as file:
            found = json.load(file)
    except (OSError, ValueError) as exc:  # not JSON, not UTF-8, unreadable
        raise ValueError(f"{value}: not a Dask scheduler file: {first_line(exc)}") from None
    address = found.get("address") if isinstance(found, dict) else None
    if not isinstance(address, str):
        raise ValueError(f"{value}: not a Dask scheduler file: it names no address")
    return address


def _wait_for_scheduler_file(path: str) -> None:
    """Wait for a scheduler file that is not there yet, as ``dask worker --scheduler-file`` does (a batch script
    starts ``dask scheduler --scheduler-file F &`` then the run), for Dask's connect timeout; then refuse it by
    name (it was "not a Dask scheduler address: missing port number", a review)."""
    import time

    import dask

    connect = dask.config.get("distributed.comm.timeouts.connect", "30s")  # distributed's default, not imported yet
    timeout = dask.utils.parse_timedelta(connect, default="s")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ValueError(f"{path}: no such scheduler file (waited {timeout:g} s for a scheduler to write it, as "
                             "dask worker --scheduler-file waits)")  # fmt: skip
        time.sleep(0.25)
    time.sleep(0.25)  # the scheduler writes it whole in one go, just after creating it


_VERSIONS_SAID: set[str] = set()


def _one_line_version_mismatch(message, category, filename, lineno, file=None, line=None) -> None:
    """Dask's ``VersionMismatchWarning`` (a table of the packages whose versions differ between this process, the
    scheduler and the workers) as one warning line: workers of another environment can unpickle tasks wrongly."""
    rows = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in str(message).splitlines()
            if row.startswith("|")][1:]  # fmt: skip (the first row names the columns)
    said = "; ".join(f"{row[0]} {row[1]} here, {row[2]} on the scheduler, {row[3]} on the workers" for row in rows
                     if len(row) == 4) or first_line(message)  # fmt: skip
    if said in _VERSIONS_SAID:  # Dask's check as the client connects, then tilemask's once workers joined
        return
    _VERSIONS_SAID.add(said)
    logger.warning("the Dask cluster's packages differ from this process's (--debug shows Dask's table): %s", said)


def configure_logging(debug: bool, verbosity: int = 0) -> None:
    """Levels as rio's ``-v`` / ``-q``: WARNING by default, INFO with ``-v`` (one line per stage), DEBUG with
    ``-vv`` or ``--debug``, ERROR with ``-q``.  Library warnings and Dask's chatter only with ``--debug``."""
    level = logging.DEBUG if debug or verbosity >= 2 else {1: logging.INFO, 0: logging.WARNING}.get(verbosity, logging.ERROR)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.root.handlers:
        handler.addFilter(_without_credentials)
    if not debug:
        import distributed  # noqa: F401  # its import sets its own log levels; ours must come after
        from distributed.versions import VersionMismatchWarning

        warnings.simplefilter("ignore")
        # GDAL's own "ERROR 1: ..." lines, printed where no handler of rasterio's or pyogrio's takes them (pyogrio's
        # GeoPackage writes on a full disk, from a thread): the error comes back as an exception, in one line.
        # (CPL_LOG=OFF is GDAL 3.11's: pyogrio's GDAL 3.10 wrote them to a file named OFF.)
        os.environ.setdefault("CPL_LOG", os.devnull)
        warnings.simplefilter("default", VersionMismatchWarning)  # in one line: _one_line_version_mismatch
        warnings.showwarning = _one_line_version_mismatch
        # its failures reach us as exceptions; its config gives some loggers levels of their own
        for name in ["distributed"] + [n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        # a result read that times out while its worker dies leaves distributed's inner gather task to end in
        # AllExit, which asyncio reports as "Task exception was never retrieved"; the run's own error follows
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        # distributed's callbacks run on tornado's loop; one that fails while an interrupt tears the client down
        # (seen: "NameError: cannot access free variable 'future'" in distributed.utils.sync) is logged by tornado,
        # by tornado.application, to which distributed's config gives a level of its own (error)
        for name in ["tornado"] + [n for n in logging.root.manager.loggerDict if n.startswith("tornado.")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        # rasterio logs at INFO every error GDAL signals, those its callers expect too (a file not there yet)
        logging.getLogger("rasterio").setLevel(max(level, logging.WARNING))
        # numexpr (pandas imports it) tells at INFO how many threads it takes: the first line of `tilemask -v stats`
        logging.getLogger("numexpr").setLevel(max(level, logging.WARNING))
        # nibabel logs a header it refuses (a datatype code it does not know) with a handler of its own, and
        # through ours, before it raises: two lines before tilemask's one
        logging.getLogger("nibabel").setLevel(logging.CRITICAL)
        # and warns of a request that got no answer at all (HTTP code 0), or a refusal, before the open or read
        # fails with curl's reason or the server's, which tilemask's one line names
        logging.getLogger("rasterio._env").addFilter(lambda record: not _NO_ANSWER.search(record.getMessage()))
