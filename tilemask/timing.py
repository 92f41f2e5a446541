"""Seconds a worker process spends in each stage of the inference: the breakdown ``benchmarks/bench_engine.py``
prints next to its figures.

* ``read``: decoding a block's region from the input;
* ``preprocess``: normalising it, invalid pixels to 0, padding to the roi;
* ``model``: the forward passes (called from the process's compute thread; on the CPU, batches of 2D windows in
  two halves on threads of their own, each batch's time its longer half's);
* ``accumulate``: cutting and stacking windows, weighting predictions and adding them into the block's sums
  (on the compute thread, less its waits for the forward passes: beside them where batches are queued);
* ``blend``: a chunk's own and neighbouring sums added, divided, activated and labelled (on a GPU, there);
* ``write``: the chunk written to the output;
* ``probe: import``, ``probe: device``, ``probe: network``, ``probe: first window``: the network's probe before
  a run (:func:`tilemask.inference.probe_network`): the inference code's import (unless preloaded), the device
  (on a GPU its context), building the network for its backend, and one window through it.

Sums over the process's threads since it started (or :func:`reset`).  A few ``perf_counter`` calls per block
and chunk: always on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator

_seconds: Counter[str] = Counter()
_lock = threading.Lock()


def add(stage: str, seconds: float) -> None:
    with _lock:
        _seconds[stage] += seconds


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        add(stage, time.perf_counter() - start)


def snapshot() -> dict[str, float]:
    with _lock:
        return dict(_seconds)


def reset() -> None:
    with _lock:
        _seconds.clear()
