"""Inputs inside .zip / .tar / .tar.gz archives, named as GDAL names them: ``/vsizip/ARCHIVE/MEMBER``,
``/vsitar/ARCHIVE/MEMBER``.

GDAL reads rasters in place through those paths.  Readers without such access
(nibabel) read a copy of the member extracted once per machine to a scratch
folder (``$TILEMASK_SCRATCH``, else the system's temporary folder), named by
the archive's path, size and time and the member, and renamed into place only
when whole, so workers never read half a copy.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..errors import InputError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def _prefix(archive: str) -> str:
    return "/vsizip/" if archive.lower().endswith(".zip") else "/vsitar/"


def member_path(archive: str, member: str) -> str:
    return f"{_prefix(archive)}{archive}/{member}"


def split_member(path: str) -> tuple[str, str] | None:
    """``(archive, member)`` of a ``/vsizip/`` or ``/vsitar/`` path; None for any other path."""
    if not path.startswith(("/vsizip/", "/vsitar/")):
        return None
    rest = path[len("/vsizip") :]
    lowered = rest.lower()
    for suffix in ARCHIVE_SUFFIXES:
        at = lowered.find(suffix + "/")
        if at >= 0:
            end = at + len(suffix)
            return rest[:end], rest[end + 1 :]
    return None


def members(archive: str, pattern: str) -> list[str]:
    """The files in ``archive`` whose name matches ``pattern`` (fnmatch, on the whole name), sorted."""
    if not archive.lower().endswith(ARCHIVE_SUFFIXES):
        raise InputError(f"input.archive: {archive}: not a .zip, .tar, .tar.gz or .tgz archive")
    try:
        if archive.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        else:
            with tarfile.open(archive) as tf:
                names = [m.name for m in tf.getmembers() if m.isfile()]
    except FileNotFoundError:
        raise InputError(f"input.archive: no such file {archive}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(f"input.archive: {archive}: cannot read the archive: {exc}") from None
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(os.path.basename(n), pattern))


def local_copy(path: str) -> str:
    """A file on this machine holding the archive member at ``path`` (extracted once)."""
    archive, member = split_member(path) or (None, None)
    if archive is None:
        return path
    try:
        stat = os.stat(archive)
    except FileNotFoundError:
        raise InputError(f"{path}: no such archive {archive}") from None
    digest = hashlib.sha256(f"{os.path.realpath(archive)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{member}".encode()).hexdigest()[:20]
    folder = Path(os.environ.get("TILEMASK_SCRATCH") or tempfile.gettempdir()) / "tilemask-archives" / digest
    target = folder / os.path.basename(member)
    if target.exists():
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f".{target.name}.{os.getpid()}.part"
    try:
        with _open_member(archive, member) as src, open(staged, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(staged, target)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        staged.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot extract {member} from {archive}: {exc}") from None
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return str(target)


def _open_member(archive: str, member: str):
    if archive.lower().endswith(".zip"):
        zf = zipfile.ZipFile(archive)
        return _Closing(zf.open(member), zf)
    tf = tarfile.open(archive)
    extracted = tf.extractfile(member)
    if extracted is None:
        tf.close()
        raise KeyError(f"{member} is not a file")
    return _Closing(extracted, tf)


class _Closing:
    """A member's file object that also closes its archive."""

    def __init__(self, handle, archive):
        self.handle, self.archive = handle, archive

    def __enter__(self):
        return self.handle

    def __exit__(self, *exc) -> None:
        self.handle.close()
        self.archive.close()
