"""A benchmark's scratch folder: made fresh, removed when the script exits (a 16384^2 run leaves ~600 MB)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_folder(prefix: str, under: str | None = None) -> Path:
    """A new folder in ``under`` (the system's temporary folder by default), removed with all it holds at exit."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=under))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
