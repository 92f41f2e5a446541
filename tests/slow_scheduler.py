"""``dask scheduler --preload tests/slow_scheduler.py``: a real scheduler that takes 3 s over each graph it is
sent (its event loop blocked), so a test can interrupt a client while it waits for the scheduler to answer."""

from __future__ import annotations

import time

from distributed.diagnostics.plugin import SchedulerPlugin


class _SlowToTakeGraphs(SchedulerPlugin):
    def update_graph(self, scheduler, **kwargs) -> None:
        time.sleep(3)


def dask_setup(scheduler) -> None:
    scheduler.add_plugin(_SlowToTakeGraphs())
