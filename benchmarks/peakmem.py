"""Peak memory of a process tree: what every benchmark here reports."""

from __future__ import annotations

import threading

import psutil


class PeakMemory:
    """Largest total RSS of this process and all its descendants (Dask workers, ``rio``) while in the block.

    Sampled every ``interval`` seconds; ``peak`` may be reset to 0 to start a new phase.
    """

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
