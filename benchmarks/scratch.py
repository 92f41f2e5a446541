"""A benchmark's scratch folder: made fresh, removed when the script exits (a 16384^2 run leaves ~600 MB)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def scratch_folder(prefix: str, under: str | None = None) -> Path:
    """A new folder in ``under`` (the system's temporary folder by default), removed with all it holds at exit.

    The first one also holds the benchmark's list of jobs (``$TILEMASK_HOME``, for this process and those it
    starts): listed in the user's, the jobs run in it outlived their folders, and every later ``tilemask jobs``
    warned of them."""
    global _home
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=under))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if _home is None:
        _home = os.environ["TILEMASK_HOME"] = str(folder / ".tilemask-home")
    return folder


_home: str | None = None
