"""pyogrio's reads without GDAL's PAM, and without changing the process's GDAL config for other code.

The GPKG driver of pyogrio's GDAL saves the dataset metadata it read (tilemask's
mark) as a ``.gpkg.aux.xml`` beside the file when it closes it, so a mere read
(``--overwrite``'s check, regions, ``tilemask serve``) wrote into the user's
folder. :func:`no_pam` turns PAM off for pyogrio's GDAL while reads are under
way and restores what was set before once the last of them is done. pyogrio has
no thread-local config (as ``rasterio.Env`` has), so reads on other threads at
the same time run without PAM too; rasterio's GDAL is a library of its own and
is never touched.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

_lock = threading.Lock()
_readers = 0
_before: object = None


@contextmanager
def no_pam():
    """pyogrio reads in this block leave no ``.aux.xml``."""
    import pyogrio

    global _readers, _before
    with _lock:
        if _readers == 0:
            _before = pyogrio.get_gdal_config_option("GDAL_PAM_ENABLED")
            pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": "NO"})
        _readers += 1
    try:
        yield
    finally:
        with _lock:
            _readers -= 1
            if _readers == 0:
                pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": _before})
