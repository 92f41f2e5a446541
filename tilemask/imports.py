"""Modules imported on first use, one thread at a time, and imports started early on a thread of their own;
warnings silenced one thread at a time.

Two Dask threads of a worker can need MONAI at once (the network built for one
task, the resampling of another).  MONAI's first import is not safe from two
threads: the second can see the package partially initialised (measured: a
predict task failed with "partially initialized module 'monai' has no attribute
'data'" while another thread was importing it).  The lock is re-entrant, so a
module imported under it may import others through it.

``warnings.catch_warnings()`` saves the process's filters and puts them back: two threads in it at once leave
one's filter in place for good, and the workers of a ``LocalCluster(processes=False)`` are threads of the user's
own process (:func:`ignoring_warnings`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
_lock = threading.RLock()
_warnings_lock = threading.RLock()


def import_module(name: str) -> ModuleType:
    """``importlib.import_module``, one thread at a time."""
    with _lock:
        return importlib.import_module(name)


def holds_package(folder: str | Path, top: str) -> bool:
    """Whether ``folder`` holds the top-level package or module ``top`` (a bundle's ``scripts/``)."""
    return bool(top) and ((Path(folder) / top).is_dir() or (Path(folder) / f"{top}.py").is_file())


def add_to_path(folder: str) -> None:
    """``folder`` on ``sys.path`` (second, after the script's own folder, as MONAI's bundle runner puts a bundle's),
    once: under the lock of tilemask's own imports (other threads' imports read the list as it is; one insert is
    atomic under the GIL)."""
    with _lock:
        if folder not in sys.path:
            sys.path.insert(1, folder)
            importlib.invalidate_caches()


@contextlib.contextmanager
def ignoring_warnings(category: type[Warning] = Warning) -> Iterator[None]:
    """``category`` ignored inside (any thread's warnings meanwhile), the process's filters put back after, one
    thread at a time: another thread waits for the body (a trace or a ``torch.load`` here, seconds, once per
    network and worker)."""
    with _warnings_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", category)
        yield


def import_in_background(names: Iterable[str]) -> None:
    """Start importing ``names``, one after another, on a daemon thread: a process that will need them soon
    imports them while it waits for something else.  An ``import`` of one of them meanwhile waits for that
    import to finish (Python's lock of each module); a failure is logged at DEBUG and left to the first use
    to raise."""
    names = list(names)
    if names:
        threading.Thread(target=_import_all, args=(names,), name="tilemask-preload", daemon=True).start()


def _import_all(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the first use imports it again and reports the error
            logger.debug("importing %s ahead of its use failed: %s", name, exc)
