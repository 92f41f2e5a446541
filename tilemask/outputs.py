"""How tilemask puts a file on disk without ever losing data or showing half of one.

* Every file or folder tilemask writes is first written under a hidden sibling
  name, ``.tilemask-<run>-<name>`` (:func:`staged_path`), and renamed onto its
  final name only when whole (:func:`atomic_path`, :func:`publish`).  A failed or
  killed run leaves at most hidden ``.tilemask-*`` siblings, never something at
  the final path; the next run of the same output removes them.
* Before any work, :func:`check_outputs` refuses (exit 2) an output that is an
  input, that exists without ``--overwrite``, or that holds something tilemask
  did not write (whatever ``--overwrite`` says), and a folder it cannot write.
* One run per output at a time: :class:`OutputLock` holds ``.tilemask-lock-<name>``
  (created with ``O_EXCL``) from planning to the end; a second run is refused with
  one line.  A lock left by a dead process of this host is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputConflict, OutputError

logger = logging.getLogger(__name__)

PREFIX = ".tilemask-"


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def staged_path(path: str | os.PathLike, run_id: str) -> str:
    """The hidden sibling ``path`` is written under by run ``run_id`` (same suffix, so drivers pick the format)."""
    p = Path(os.fspath(path).rstrip("/"))
    return str(p.with_name(f"{PREFIX}{run_id}-{p.name}"))


def leftovers(path: str | os.PathLike) -> list[Path]:
    """Hidden files and folders that runs of ``path`` left (staged outputs, parts, sidecars)."""
    p = Path(os.fspath(path).rstrip("/"))
    pattern = re.compile(rf"^{re.escape(PREFIX)}[0-9a-f]+-{re.escape(p.name)}(\..*)?$")
    try:
        return [child for child in p.parent.iterdir() if pattern.match(child.name)]
    except OSError:
        return []


def remove(path: str | os.PathLike) -> None:
    """Remove a file or a folder, if there is one."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def publish(staged: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a whole staged file or folder onto ``path``, replacing what was there.

    A file replaces atomically (``os.replace``).  A folder cannot replace a folder
    in one step, so the old one is first renamed aside, then removed once the new
    one is in place: at every moment ``path`` is either the old whole output or the
    new whole output (or briefly absent), never a mix.
    """
    staged, path = Path(staged), Path(os.fspath(path).rstrip("/"))
    if staged.is_dir() and path.exists():
        aside = Path(staged_path(path, new_run_id()) + ".old")
        os.replace(path, aside)
        os.replace(staged, path)
        remove(aside)
    else:
        os.replace(staged, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, run_id: str | None = None) -> Iterator[str]:
    """Yields the hidden path to write; publishes it onto ``path`` if the block ends normally.

    On any exception (a pyarrow ``ValueError`` or ``KeyboardInterrupt`` as much as
    an ``OSError``) the staged file is removed and the exception propagates.  A
    full disk is named as such.
    """
    staged = staged_path(path, run_id or new_run_id())
    try:
        yield staged
        publish(staged, path)
    except BaseException as exc:
        remove(staged)
        if isinstance(exc, OSError) and describe_write_error(exc, staged) == "no space left on device":
            raise OutputError(f"{path}: no space left on device") from None
        raise


def describe_write_error(exc: BaseException, path: str | os.PathLike) -> str:
    """One line for a failed write: a full disk named as such, whatever the library called it.

    GDAL reports a full disk as libtiff lines and ``Unknown GDAL Error``; when the
    target's file system has no room left, that is what the user needs to hear.
    """
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on device"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(Path(path).parent).free < (1 << 20):
            return "no space left on device"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# -- before any work ----------------------------------------------------------------------------


def _same_place(a: str, b: str) -> bool:
    """``a`` and ``b`` are one file, or one lies inside the other (a Zarr array inside a group)."""
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return ra == rb or ra in rb.parents or rb in ra.parents


def check_outputs(outputs: Iterable[tuple[str, bool]], inputs: Iterable[str], overwrite: bool) -> None:
    """Refuse (exit 2) outputs that would destroy an input, another file or a running run's work.

    ``outputs`` are ``(path, owned)``: ``owned`` tells whether what exists at the path
    was written by tilemask (the format decides; see :mod:`tilemask.formats`).
    """
    inputs = [i for i in inputs if "://" not in i and not i.startswith("/vsi")]
    for path, owned in outputs:
        clash = next((i for i in inputs if _same_place(path, i)), None)
        if clash is not None:
            raise OutputConflict(f"output {path} is the input {clash} (or inside it); refused to overwrite an input")
        if os.path.lexists(path):
            if not owned:
                raise OutputConflict(f"output {path} exists and was not written by tilemask; refused to replace it")
            if not overwrite:
                raise OutputConflict(f"output {path} exists; pass --overwrite to replace it")
        check_writable(Path(path).parent)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be made in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{PREFIX}{new_run_id()}-probe"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputConflict(f"output folder {folder} is not writable: {exc.strerror or exc}") from None


class OutputLock:
    """``.tilemask-lock-<name>`` beside an output, held by one run; stale ones of dead local runs are taken over.

    ``files`` are the output's files (labels first, then probabilities and derived
    products); once the lock is held, what interrupted runs left of any of them
    (:func:`leftovers`) is removed.
    """

    def __init__(self, files: list[str]):
        self.files = files
        self.path = files[0]
        p = Path(self.path.rstrip("/"))
        self.lock = p.with_name(f"{PREFIX}lock-{p.name}")
        self.held = False

    def acquire(self) -> OutputLock:
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise OutputConflict(
                        f"output {self.path} is being written by another tilemask run ({self._owner()}); "
                        f"remove {self.lock} if that run is gone"
                    ) from None
                logger.info("taking over the stale lock %s", self.lock)
                remove(self.lock)
                continue
            except OSError as exc:
                raise OutputConflict(f"output {self.path}: cannot create {self.lock}: {exc.strerror}") from None
            with os.fdopen(fd, "wb") as f:
                f.write(record)
            self.held = True
            for leftover in (x for f in self.files for x in leftovers(f)):  # what killed runs of this output left
                logger.info("removing %s, left by an interrupted run", leftover)
                remove(leftover)
            return self
        raise OutputConflict(f"output {self.path}: cannot take the lock {self.lock}")

    def _read(self) -> dict:
        try:
            return json.loads(self.lock.read_bytes() or b"{}")
        except (OSError, ValueError):
            return {}

    def _owner(self) -> str:
        owner = self._read()
        return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"

    def _stale(self) -> bool:
        owner = self._read()
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return False
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            remove(self.lock)
            self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
