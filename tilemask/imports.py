"""Modules a worker imports on first use, one thread at a time.

Two Dask threads of a worker can need MONAI at once (the network built for one
task, the resampling of another).  MONAI's first import is not safe from two
threads: the second can see the package partially initialised (measured: a
predict task failed with "partially initialized module 'monai' has no attribute
'data'" while another thread was importing it).  The lock is re-entrant, so a
module imported under it may import others through it.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

_lock = threading.RLock()


def import_module(name: str) -> ModuleType:
    """``importlib.import_module``, one thread at a time."""
    with _lock:
        return importlib.import_module(name)
