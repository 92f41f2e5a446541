"""Client paths to files under the served folder, and nothing else.

Every route that names a file goes through :func:`resolve`: a path relative to
FOLDER, with no ``..`` part, no absolute or drive path, no backslash, no NUL,
nothing that tilemask stages or locks (``.tilemask-*``), and, once symlinks are
followed, still inside FOLDER. Anything else is "not found" (404), whether it
exists or not, so a client learns nothing about the rest of the disk.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from fastapi import HTTPException

_DRIVE = re.compile(r"^[A-Za-z]:")


class NotInFolder(HTTPException):
    def __init__(self, relative: str):
        super().__init__(status_code=404, detail=f"not found: {relative}")


def resolve(root: Path, relative: str, *, must_exist: bool = True) -> Path:
    """``root / relative`` when it names something inside ``root`` (which is already resolved); else 404."""
    if (
        not relative
        or "\0" in relative
        or "\\" in relative
        or relative.startswith("/")
        or _DRIVE.match(relative)
        or "://" in relative
    ):
        raise NotInFolder(relative)
    parts = PurePosixPath(relative).parts
    if any(part == ".." or part.startswith(".tilemask-") for part in parts):
        raise NotInFolder(relative)
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or (must_exist and not path.exists()):
        raise NotInFolder(relative)
    return path


def relative(root: Path, path: Path) -> str:
    """The client's name for ``path`` (POSIX, relative to ``root``)."""
    return path.relative_to(root).as_posix()
