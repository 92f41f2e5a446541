"""Peak memory of a process tree, what every benchmark here reports, and the CPU seconds the tree used."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


class PeakMemory:
    """Largest total RSS of this process (or of process ``pid``) and all its descendants (Dask workers, ``rio``)
    while in the block.

    Sampled every ``interval`` seconds; ``peak`` may be reset to 0 to start a new phase.  ``own_at_peak`` is
    that process's share of the peak (the rest is its descendants').  ``cpu_seconds``: user and system CPU that
    the tree used while in the block, each process as last sampled: one that ends loses what it used in its last
    ``interval``, one that lives less than an interval is missed.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        self.pid, self.interval, self.peak, self.own_at_peak, self._stop = pid, interval, 0, 0, threading.Event()
        self._cpu: dict[int, float] = {}
        self._cpu_before: dict[int, float] = {}  # of the processes there on entering the block

    @property
    def cpu_seconds(self) -> float:
        return sum(seconds - self._cpu_before.get(pid, 0.0) for pid, seconds in self._cpu.items())

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                me = psutil.Process(self.pid)
                own = total = me.memory_info().rss
                self._add_cpu(me)
                children = me.children(recursive=True)
            except psutil.Error:  # process ``pid`` has ended
                return
            for p in children:
                try:
                    total += p.memory_info().rss
                    self._add_cpu(p)
                except psutil.Error:
                    pass
            if total > self.peak:
                self.peak, self.own_at_peak = total, own
            self._stop.wait(self.interval)

    def _add_cpu(self, process: psutil.Process) -> None:
        times = process.cpu_times()
        self._cpu[process.pid] = times.user + times.system

    def __enter__(self) -> PeakMemory:
        with contextlib.suppress(psutil.Error):  # ended already: the sampler finds that too
            root = psutil.Process(self.pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    self._add_cpu(process)
        self._cpu_before = dict(self._cpu)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def tilemask_run(workflow: Path, settings: dict) -> dict:
    """``tilemask run --quiet --overwrite`` of ``settings`` written to ``workflow`` (JSON), in a process of its own,
    as a user runs it, timed from its start to its exit: ``wall``, ``peak`` (:class:`PeakMemory`), ``windows``."""
    workflow.write_text(json.dumps(settings))
    command = [sys.executable, "-m", "tilemask", "run", str(workflow), "--quiet", "--overwrite"]
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process, \
            PeakMemory(process.pid) as mem:  # fmt: skip
        printed, said = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"tilemask run failed (exit status {process.returncode}): {said.strip()[-2000:]}")
    windows = int(re.search(r"(\d+) windows in ", printed).group(1))
    return {"wall": wall, "peak": mem.peak, "windows": windows}
