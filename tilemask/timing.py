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

Sums over the process's threads since it started (or :func:`reset`): wall seconds (:func:`snapshot`), and the
CPU seconds of the threads that ran each stage (:func:`cpu_snapshot`; ``model`` has none: its halved batches run
on the runner's threads, and the CPU of the batches the compute thread runs itself, one too small to halve or
those of a runner that is not halved, is taken out of its ``accumulate``).  Zarr 3 encodes and stores a chunk,
and reads and decodes one, on threads of its own (its event loop and the pool it hands codecs to), so ``write``
holds little CPU; their CPU seconds are :data:`ZARR_THREADS`.  On a busy worker a stage's wall seconds include
the time its thread waited for a core; its CPU seconds do not.  A few clock reads per block and chunk: always on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator

_seconds: Counter[str] = Counter()
_cpu: Counter[str] = Counter()
_lock = threading.Lock()

ZARR_THREADS = "zarr's threads"
"""The key of :func:`cpu_snapshot` for the CPU seconds of zarr's own threads: Zarr chunks written (encoded and
stored), and those of a Zarr input read (loaded and decoded)."""
_zarr_before = 0.0  # their CPU seconds at the last reset


def add(stage: str, seconds: float, cpu: float | None = None) -> None:
    with _lock:
        _seconds[stage] += seconds
        if cpu is not None:
            _cpu[stage] += cpu


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    start, cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        add(stage, time.perf_counter() - start, time.thread_time() - cpu)


def snapshot() -> dict[str, float]:
    """Wall seconds per stage."""
    with _lock:
        return dict(_seconds)


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds per stage, of the threads that ran it, and :data:`ZARR_THREADS` where zarr started its own."""
    zarr = _zarr_threads_cpu()
    with _lock:
        return {**_cpu, ZARR_THREADS: zarr - _zarr_before} if zarr else dict(_cpu)


def _zarr_threads_cpu() -> float:
    """The CPU seconds of the live threads that zarr 3 starts (``zarr.core.sync``: ``zarr_io`` runs its event
    loop, ``zarr_pool_N`` its codecs); its pool keeps them for the process's life."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.ident is not None and (thread.name == "zarr_io" or thread.name.startswith("zarr_pool")):
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, AttributeError):  # exited meanwhile; or no per-thread clocks on this platform
                pass
    return total


def totals(per_worker: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each stage's seconds summed over the workers: of ``client.run(snapshot)`` or ``client.run(cpu_snapshot)``."""
    summed: Counter[str] = Counter()
    for seconds in per_worker.values():
        summed.update(seconds)
    return dict(summed)


def reset() -> None:
    global _zarr_before
    zarr = _zarr_threads_cpu()
    with _lock:
        _seconds.clear()
        _cpu.clear()
        _zarr_before = zarr
