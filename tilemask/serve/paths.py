"""Client paths to files under the served folder, and nothing else.

Every route that names a file goes through :func:`resolve`: a path relative to
FOLDER, with no ``..`` part, no hidden part (``.git``, ``.env``, tilemask's own
``.tilemask-*`` staging files and locks), no absolute or drive path, no
backslash, no NUL, no URL, and, once symlinks are followed, still inside FOLDER
and still not hidden. Anything else is "not found" (404), whether it exists or
not, so a client learns nothing about the rest of the disk.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from fastapi import HTTPException
from rasterio.errors import RasterioError

from ..errors import first_line
from ..sources.raster import first_gdal_line

_DRIVE = re.compile(r"^[A-Za-z]:")
READ_ERRORS = (OSError, EOFError, ValueError, RuntimeError, RasterioError)
"""What reading a damaged file raises: GDAL's, pyogrio's, nibabel's and the codecs' errors (a truncated tile,
a chunk that does not decompress, a header that lies)."""


class NotInFolder(HTTPException):
    def __init__(self, relative: str):
        super().__init__(status_code=404, detail=f"not found: {relative[:200]}")


def hidden(parts) -> bool:
    """Whether a path (its parts) names something hidden: a dotfile or anything in a dot-folder."""
    return any(part.startswith(".") for part in parts)


def resolve(root: Path, relative: str) -> Path:
    """``root / relative`` when it names something that exists inside ``root`` (already resolved); else 404."""
    if (
        not relative
        or "\0" in relative
        or "\\" in relative
        or relative.startswith("/")
        or _DRIVE.match(relative)
        or "://" in relative
        or hidden(PurePosixPath(relative).parts)  # ".." included
    ):
        raise NotInFolder(relative)
    try:
        path = (root / relative).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a name too long, a symlink loop
        raise NotInFolder(relative) from None
    if not path.is_relative_to(root) or hidden(path.relative_to(root).parts):
        raise NotInFolder(relative)
    return path


def shown(name: str) -> str:
    """A file name as text any page, JSON or log can hold: bytes that are not UTF-8 (Python's surrogate escapes)
    as ``\\xe9``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def relative(root: Path, path: Path) -> str:
    """The client's name for ``path`` (POSIX, relative to ``root``)."""
    return path.relative_to(root).as_posix()


def inside(root: Path, path: Path) -> bool:
    """Whether ``path``, symlinks followed, is inside ``root`` (what files a reader may open)."""
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):
        return False


@contextmanager
def reading(path: str):
    """A damaged file is the client's 422 naming it (``path``, the client's name) and the reason, not the
    server's 500."""
    try:
        yield
    except FileNotFoundError:  # removed since the catalog listed it
        raise HTTPException(404, f"{path}: not found") from None
    except READ_ERRORS as exc:  # rasterio's own words are "Read failed. See previous exception": GDAL's say why
        reason = first_gdal_line(exc) if isinstance(exc, RasterioError) else first_line(exc)
        raise HTTPException(422, f"{path}: cannot read: {reason}") from None
