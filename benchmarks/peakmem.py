"""Peak memory of a process tree: what every benchmark here reports."""

from __future__ import annotations

import threading

import psutil


class PeakMemory:
    """Largest total RSS of this process (or of process ``pid``) and all its descendants (Dask workers, ``rio``)
    while in the block.

    Sampled every ``interval`` seconds; ``peak`` may be reset to 0 to start a new phase.  ``own_at_peak`` is
    that process's share of the peak (the rest is its descendants').
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        self.pid, self.interval, self.peak, self.own_at_peak, self._stop = pid, interval, 0, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                me = psutil.Process(self.pid)
                own = total = me.memory_info().rss
                children = me.children(recursive=True)
            except psutil.Error:  # process ``pid`` has ended
                return
            for p in children:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            if total > self.peak:
                self.peak, self.own_at_peak = total, own
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
