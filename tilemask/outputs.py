"""How tilemask puts a file on disk without ever losing data or showing half of one.

* Every file or folder tilemask writes is first written under a hidden sibling
  name, ``.tilemask-<run>-<name>`` (:func:`staged_path`), and renamed onto its
  final name only when whole (:func:`atomic_path`, :func:`publish`).  A failed or
  killed run leaves at most hidden ``.tilemask-*`` siblings, never something at
  the final path; the next run of the same output removes them.
* Before any work, :func:`check_outputs` refuses (exit 2) an output that is an
  input, that exists without ``--overwrite``, or that holds something tilemask
  did not write (whatever ``--overwrite`` says), and a folder it cannot write.
* One run per output at a time: :class:`OutputLock` holds an exclusive ``flock``
  on ``.tilemask-lock-<name>`` beside each file of the output from before the
  output checks to the end; a second run is refused with one line.  The kernel
  drops the lock of a dead process, so a killed run never blocks the next one.
* Outputs on object storage (``s3://``, :mod:`tilemask.storage`) follow the same
  rules with what S3 offers: staged under the same hidden names, published by a
  server-side copy; a file is written in local scratch and uploaded whole.  Their
  locks are held on this machine (``$TILEMASK_SCRATCH/tilemask-locks``): S3 has no
  lock, so two machines writing one remote output are not kept apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from . import storage
from .errors import OutputConflict, OutputError, TilemaskError, option

T = TypeVar("T")

logger = logging.getLogger(__name__)

PREFIX = ".tilemask-"


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def staged_path(path: str | os.PathLike, run_id: str) -> str:
    """The hidden sibling ``path`` is written under by run ``run_id`` (same suffix, so drivers pick the format)."""
    folder, slash, name = os.fspath(path).rstrip("/").rpartition("/")
    return f"{folder}{slash}{PREFIX}{run_id}-{name}"


ASIDE = ".old"  # an output renamed aside while a new one takes its place
STAGING_SUFFIXES = ("", ".parts", ".raw.zarr", ".raw.nii", ".labels.zarr", ".aux.xml", ".ovr.tmp", ".msk", ".done", ASIDE)
"""What runs of one output stage beside it: the output itself, COG pieces, a raw intermediate, sidecars, the
record of the chunks a job has written (``.done``, kept for the job's next run to resume)."""


def leftovers(path: str | os.PathLike) -> list[Path]:
    """Hidden files and folders that runs of ``path`` (and of no other output) left."""
    folder, _, name = os.fspath(path).rstrip("/").rpartition("/")
    suffixes = "|".join(re.escape(s) for s in STAGING_SUFFIXES if s)
    pattern = re.compile(rf"^{re.escape(PREFIX)}[0-9a-f]+-{re.escape(name)}({suffixes})?$")
    if storage.is_remote(path):
        return [RemotePath(f"{folder}/{child}") for child in storage.names(folder) if pattern.match(child)]
    try:
        return [child for child in Path(folder or ".").iterdir() if pattern.match(child.name)]
    except OSError:
        return []


class RemotePath(str):
    """An object's URL, with the ``name`` :func:`recover` asks of a leftover."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


class FolderListings:
    """:func:`leftovers` for the outputs of one run of many inputs, each output folder listed once.

    Listing a folder per input costs as the folder grows (80 ms per listing of 100,000 files here), so a
    job's run lists each folder at its first input and looks its leftovers up by output name.  Files staged
    later by the run itself are not leftovers of an earlier run: each input's leftovers are recovered before
    it stages anything, and names are distinct per input.
    """

    _HIDDEN = re.compile(rf"^{re.escape(PREFIX)}[0-9a-f]+-(.+)$")

    def __init__(self) -> None:
        self._folders: dict[Path, dict[str, list[str]]] = {}
        self._lock = threading.Lock()

    def leftovers(self, path: str | os.PathLike) -> list[Path]:
        if storage.is_remote(path):  # object listings are by prefix: nothing to share
            return leftovers(path)
        p = Path(os.fspath(path).rstrip("/"))
        with self._lock:
            index = self._folders.get(p.parent)
            if index is None:
                index = self._folders[p.parent] = self._index(p.parent)
        return [p.parent / name for name in index.get(p.name, ())]

    def _index(self, folder: Path) -> dict[str, list[str]]:
        """Each hidden file's name under every output name it may belong to (as :func:`leftovers` matches)."""
        index: dict[str, list[str]] = {}
        try:
            names = [entry.name for entry in os.scandir(folder) if entry.name.startswith(PREFIX)]
        except OSError:
            return index
        for name in names:
            match = self._HIDDEN.match(name)
            if match is None:
                continue
            rest = match.group(1)
            for suffix in STAGING_SUFFIXES:
                if rest.endswith(suffix) and len(rest) > len(suffix):
                    index.setdefault(rest[: len(rest) - len(suffix)] if suffix else rest, []).append(name)
        return index


def exists(path: str | os.PathLike) -> bool:
    """Whether there is a file or folder (an object or prefix) at ``path``."""
    return storage.exists(os.fspath(path)) if storage.is_remote(path) else os.path.lexists(path)


def remove(path: str | os.PathLike) -> None:
    """Remove a file or a folder, if there is one."""
    if storage.is_remote(path):
        storage.remove(os.fspath(path))
        return
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
    new whole output (or briefly absent), never a mix.  On object storage, see :func:`tilemask.storage.publish`.
    """
    if storage.is_remote(path):
        if storage.is_remote(staged):
            storage.publish(os.fspath(staged), os.fspath(path))
        else:
            storage.upload(staged, os.fspath(path))
            remove(staged)
        return
    staged, path = Path(staged), Path(os.fspath(path).rstrip("/"))
    if staged.is_dir() and path.exists():
        aside = Path(staged_path(path, new_run_id()) + ASIDE)
        os.replace(path, aside)
        try:
            os.replace(staged, path)
        except BaseException:
            os.replace(aside, path)  # the old output back; a kill right here is undone by recover()
            raise
        remove(aside)
    else:
        os.replace(staged, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, run_id: str | None = None) -> Iterator[str]:
    """Yields the hidden path to write; publishes it onto ``path`` if the block ends normally.

    On any exception (a pyarrow ``ValueError`` or ``KeyboardInterrupt`` as much as
    an ``OSError``) the staged file is removed and the exception propagates.  A
    full disk is named as such.  A file for object storage is written in local scratch and uploaded whole.
    """
    staged = staged_path(path, run_id or new_run_id())
    if storage.is_remote(path):
        staged = str(storage.scratch("tilemask-staged") / Path(staged).name)
    try:
        yield staged
        publish(staged, path)
    except BaseException as exc:
        # a full disk, looked at before the staged file goes; GDAL's vector writers (pyogrio) raise their own types
        why = describe_write_error(exc, staged) if isinstance(exc, (OSError, *_ogr_errors())) else None
        remove(staged)
        if why == "no space left on device":
            raise OutputError(f"{path}: no space left on device") from None
        if isinstance(exc, _ogr_errors()):  # naming the staged file or none (SQLite rolled a full disk back: room)
            raise OutputError(f"{path}: cannot write the output: {why.replace(staged, os.fspath(path))}") from None
        raise


@functools.cache
def _ogr_errors() -> tuple[type[Exception], ...]:
    """pyogrio's errors of a write that failed (none is an ``OSError``): SQLite's full disk is a ``FeatureError``
    (``... database or disk is full``) or, at the commit, ``DataSourceError: Failed to commit transaction``."""
    try:
        from pyogrio.errors import DataLayerError, DataSourceError, FeatureError
    except ImportError:  # pragma: no cover - pyogrio comes with the stats extra
        return ()
    return (DataLayerError, DataSourceError, FeatureError)


LIBTIFF_WRITE_FAILED = re.compile(r"TIFF(Rewrite|Write|Append|Flush)\w*:|[Ww]rite error|Error writing")
"""libtiff's words for a write it could not make (a full disk's ``ENOSPC`` goes to its own stderr lines, not here)."""


def describe_write_error(exc: BaseException, path: str | os.PathLike, room: tuple[int, int] | None = None) -> str:
    """One line for a failed write: a full disk named as such, whatever the library called it.

    GDAL reports a full disk as libtiff lines and ``Unknown GDAL Error``; when the
    target's file system has no room left, that is what the user needs to hear.  GDAL's COG driver removes its
    temporary files before it returns, so the disk may no longer look full: ``room`` (the bytes free before the
    write, and the bytes it holds uncompressed) names a libtiff write failure a full disk where the write had less
    than twice its raster's uncompressed size to work in (its copy and overviews).
    """
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "disk is full" in str(exc):  # SQLite's (GPKG)
        return "no space left on device"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(Path(path).parent).free < (1 << 20):
            return "no space left on device"
    text = str(exc).strip()
    if room is not None and room[0] < 2 * room[1] and LIBTIFF_WRITE_FAILED.search(text):
        return (f"no space left on device ({room[0] / 2**20:.1f} MiB free there, for {room[1] / 2**20:.1f} MiB "
                f"uncompressed; libtiff: {text.splitlines()[0]})")  # fmt: skip
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def check_spatial_index(staged: str, target: Path) -> None:
    """Refuse a GeoPackage layer (named as ``target``'s stem) that GDAL wrote without its spatial index: it builds
    the R-tree as the layer is closed, and where the disk filled then it said nothing, and the file, its features
    all there, was published (exit 0, an exploratory review). An empty layer has its index too."""
    import sqlite3

    # a URI, read-only: its path percent-encoded (a bare "#" or "?" cut the name short and SQLite made an empty file)
    with contextlib.closing(sqlite3.connect(f"{Path(staged).absolute().as_uri()}?mode=ro", uri=True)) as db:
        indexed = db.execute("SELECT count(*) FROM gpkg_extensions WHERE table_name = ? AND extension_name = "
                             "'gpkg_rtree_index'", (target.stem,)).fetchone()[0]  # fmt: skip
    if not indexed:
        free = shutil.disk_usage(Path(staged).parent).free / 2**20
        raise OutputError(f"{target}: GDAL wrote the features without their spatial index, as it does when the disk "
                          f"fills as it builds it ({free:.1f} MiB free there)")  # fmt: skip


def output_step(step: Callable[[], T], path: str) -> T:
    """``step()`` of writing the output at ``path`` (create it, make it whole): an ``OSError`` of its own (a
    full disk, a folder gone) as the output's one line. A full disk had gone up bare, naming no file:
    ``OSError: [Errno 28] No space left on device`` (a COG's VRT, a NIfTI's gzip, its model-grid Zarr)."""
    try:
        return step()
    except TilemaskError:
        raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the output: {describe_write_error(exc, path)}") from None


# -- before any work ----------------------------------------------------------------------------


def _same_place(a: str, b: str) -> bool:
    """``a`` and ``b`` are one file, or one lies inside the other (a Zarr array inside a group)."""
    if storage.is_remote(a) or storage.is_remote(b):
        a, b = a.rstrip("/"), b.rstrip("/")
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return ra == rb or ra in rb.parents or rb in ra.parents


def check_outputs(outputs: Iterable[tuple[str, bool]], inputs: Iterable[str], overwrite: bool,
                  made: list[Path] | None = None) -> None:
    """Refuse (exit 2) outputs that would destroy an input, another file or a running run's work.

    ``outputs`` are ``(path, owned)``: ``owned`` tells whether what exists at the path
    was written by tilemask (the format decides; see :mod:`tilemask.formats`).  The
    local folders the check makes are added to ``made`` (:func:`check_writable`).
    """
    inputs = [i for i in inputs if storage.is_remote(i) or ("://" not in i and not i.startswith("/vsi"))]
    for path, owned in outputs:
        clash = next((i for i in inputs if _same_place(path, i)), None)
        if clash is not None:
            raise OutputConflict(f"output {path} is the input {clash} (or inside it); refused to overwrite an input")
        _check_name_length(path)
        if exists(path):
            if not owned:
                raise OutputConflict(f"output {path} exists and was not written by tilemask; refused to replace it")
            if not overwrite:
                raise OutputConflict(f"output {path} exists; pass {option('overwrite', 'True')} to replace it")
        if storage.is_remote(path):
            check_remote_writable(path.rstrip("/").rpartition("/")[0])
        else:
            check_writable(Path(path).parent, made)


HIDDEN_NAME_BYTES = len(f"{PREFIX}{new_run_id()}-") + max(map(len, STAGING_SUFFIXES))
"""How many bytes longer than an output's name the longest hidden name beside it is (``.tilemask-<run>-<name>``
with a staging suffix; ``.tilemask-lock-<name>`` is shorter)."""


def _check_name_length(path: str) -> None:
    """Refuse a local output whose hidden siblings' names the file system cannot hold: a 245-byte name was refused
    as "output folder ... is not writable: File name too long" (an exploratory review), which sent the user to its
    permissions."""
    if storage.is_remote(path):
        return
    name = os.path.basename(path.rstrip("/")).encode()
    try:
        limit = os.pathconf(next(p for p in (Path(path).parent, *Path(path).parents) if p.exists()), "PC_NAME_MAX")
    except (OSError, ValueError, StopIteration):
        limit = 255
    if len(name) + HIDDEN_NAME_BYTES > limit:
        longest = f"{PREFIX}<run>-<name>{max(STAGING_SUFFIXES, key=len)}"
        raise OutputConflict(f"output {path}: its name is {len(name)} bytes, and tilemask stages it under hidden names "
                             f"{HIDDEN_NAME_BYTES} bytes longer ({longest}), where this file system takes {limit}: "
                             f"shorten it to {limit - HIDDEN_NAME_BYTES} bytes at most")  # fmt: skip


def why_unwritable(folder: str | os.PathLike, exc: OSError) -> str:
    """Why ``folder`` could not be made or written, in words: a file where a folder of its path should be ("File
    exists" and "Not a directory" said it for ``out/`` when ``out`` was a file), else the system's reason."""
    for place in (Path(folder), *Path(folder).parents):
        if place.exists():
            return str(exc.strerror or exc) if place.is_dir() else f"{place} is a file, not a folder"
    return str(exc.strerror or exc)


def make_folder(folder: Path, made: list[Path] | None = None) -> None:
    """Make ``folder`` and the folders above it that are not there, adding to ``made`` each one this call made
    (uppermost first; one another process made meanwhile is not this call's): what :func:`remove_made` removes
    from a run refused before any work."""
    folder, missing = Path(folder).absolute(), []
    for place in (folder, *folder.parents):
        if place.exists():
            break
        missing.append(place)
    for place in reversed(missing):
        try:
            place.mkdir()
        except FileExistsError:
            continue
        if made is not None:
            made.append(place)
    folder.mkdir(exist_ok=True)  # there already: a file where it should be is refused here


def remove_made(made: list[Path]) -> None:
    """Remove the folders :func:`make_folder` made that are empty now, deepest first, and forget them: a run
    refused before any work leaves none of the folders made for it; one that holds something stays."""
    for place in reversed(made):
        with contextlib.suppress(OSError):  # not empty (another run's, or the user's, files), or gone already
            place.rmdir()
    made.clear()


def check_writable(folder: Path, made: list[Path] | None = None) -> None:
    """Create ``folder`` if needed (noting in ``made`` the folders made, :func:`make_folder`) and prove a file can be
    made in it: a file with no name (``O_TMPFILE``) where the system (Linux) and file system have them, so that a
    run killed as it checks leaves nothing behind (a named probe did, in a loaded CI); else a named one, made and
    removed."""
    try:
        make_folder(folder, made)
        if not _made_unnamed_file(folder):
            probe = folder / f"{PREFIX}{new_run_id()}-probe"
            probe.touch()
            probe.unlink()
    except OSError as exc:
        raise OutputConflict(f"output folder {folder} is not writable: {why_unwritable(folder, exc)}") from None


def _made_unnamed_file(folder: Path) -> bool:
    """Make (and close) a file with no name in ``folder``; False where the system or file system has none (raises
    what else stops it, as a folder that is not writable)."""
    if not hasattr(os, "O_TMPFILE"):  # Linux's only: not on macOS or Windows
        return False
    try:
        os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # no unnamed files on this file system
            return False
        raise
    return True


def check_remote_writable(folder: str) -> None:
    """Prove an object can be put in ``folder`` on object storage (the bucket is there, the keys may write)."""
    probe = f"{folder}/{PREFIX}{new_run_id()}-probe"
    try:
        storage.put_bytes(probe, b"")
        storage.remove(probe)
    except (FileNotFoundError, PermissionError) as exc:  # no such bucket; a key that may not write
        raise OutputConflict(f"output folder {folder} is not writable: {exc}") from None


class OutputLock:
    """One run per output: an exclusive ``flock`` on ``.tilemask-lock-<name>`` beside each of its files.

    ``files`` are everything one input's run writes (labels, probabilities,
    derived products); each gets its own lock, so two workflows sharing a
    statistics table cannot clean up each other's staged files.  The kernel
    releases a lock when its process dies, so a killed run never blocks the next
    one; the next run then removes what the killed one left (:func:`leftovers`)
    and puts back an older output that a half-done :func:`publish` set aside.
    """

    def __init__(self, files: list[str], keep: str | None = None, listings: FolderListings | None = None,
                 made: list[Path] | None = None):
        self.made = made  # the local folders its locks make are added here (:func:`make_folder`)
        self.files = [f.rstrip("/") for f in files]  # the labels first (``output_files``): a refusal names them
        self.held: list[tuple[Path, int]] = []
        self.keep = keep  # the run id whose staged files are not leftovers: the job resuming them
        self.listings = listings  # a run of many inputs lists each folder once

    @staticmethod
    def lock_path(path: str) -> Path:
        if storage.is_remote(path):  # held on this machine: object storage has no lock
            digest = hashlib.sha256(path.encode()).hexdigest()[:20]
            return storage.scratch("tilemask-locks") / f"{digest}-{path.rsplit('/', 1)[-1]}"
        p = Path(path)
        return p.with_name(f"{PREFIX}lock-{p.name}")

    def acquire(self) -> OutputLock:
        for path in self.files:  # before a lock's own (shorter) name: check_outputs runs with the locks held
            _check_name_length(path)
        try:
            for path in sorted(set(self.files)):  # in one order for every run: two runs never wait on each other
                self.held.append(self._take(path))
            for path in self.files:
                recover(path, self.keep, self.listings)
        except storage.AccessDenied as exc:  # a key that may not list the folder: refused before any work, as a
            self.release()  # missing bucket is (check_remote_writable); it was exit 1 with a job folder elsewhere
            raise OutputConflict(str(exc)) from None
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, path: str) -> tuple[Path, int]:
        lock = self.lock_path(path)
        while True:
            try:
                make_folder(lock.parent, None if storage.is_remote(path) else self.made)  # scratch's stays
                fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as exc:
                why = why_unwritable(lock.parent, exc)
                raise OutputConflict(f"output folder {lock.parent} is not writable: {why}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                of = "" if path == self.files[0] else f" (with {self.files[0]}, the labels)"
                raise OutputConflict(f"output {path}{of} is being written by another tilemask run") from None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its previous holder unlinked while we waited to open it
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
                except OSError as exc:  # a full disk: the lock goes with the refusal
                    lock.unlink()
                    os.close(fd)
                    raise OutputError(f"output folder {lock.parent}: {describe_write_error(exc, lock)}") from None
                return lock, fd
            os.close(fd)

    def release(self) -> None:
        for lock, fd in reversed(self.held):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # unlinked while still locked: a waiting opener sees a new inode and retries
            os.close(fd)
        self.held = []

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def recover(path: str, keep: str | None = None, listings: FolderListings | None = None) -> None:
    """With ``path``'s lock held: remove what killed runs left (but what run ``keep`` staged: a job resuming
    its own pieces), and put back an output set aside by a :func:`publish` that died between its two renames."""
    for leftover in listings.leftovers(path) if listings else leftovers(path):
        if keep and leftover.name.startswith(f"{PREFIX}{keep}-") and not leftover.name.endswith(ASIDE):
            continue
        if isinstance(leftover, RemotePath):  # published by copying, never set aside
            logger.info("removing %s, left by an interrupted run", leftover)
            remove(leftover)
            continue
        if not os.path.lexists(leftover):  # a listing made earlier in the run
            continue
        if leftover.name.endswith(ASIDE) and not os.path.lexists(path):
            logger.warning("restoring %s, set aside by an interrupted run", path)
            os.replace(leftover, path)
            continue
        logger.info("removing %s, left by an interrupted run", leftover)
        remove(leftover)
