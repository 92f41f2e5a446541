"""Several inputs of one run: a window of items in flight, earlier items first.

A small item spends most of its time waiting on round trips (statistics,
predict, making the output whole, publishing); with several items in flight
the workers compute one item while the client waits on another.  Large items
lose nothing: Dask runs the tasks of earlier submissions first, so a second
item only fills threads the first leaves idle.

When an item fails, the items in flight are abandoned (each cancels its tasks and,
as an interrupted run does, keeps what it staged for the job's next run to resume,
or removes it where its output cannot resume), no further item starts, and the
first failure is raised.  Ctrl-C does the same and raises
``KeyboardInterrupt`` once every item has cleaned up.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import dask

from .cluster import Abandoned, abandon_on, finishing
from .interrupts import shielded
from .progress import items_progress

logger = logging.getLogger(__name__)
STOPPING = ("stopping once %d item(s) whose labels are in place finish publishing them and their polygons, quick "
            "look and statistics (no output stands without its record)")


def say_what_stopping_waits_for() -> None:
    """A line, only when stopping waits for items past the point of no return (else the stop is at once)."""
    if finishing():
        logger.warning(STOPPING, finishing())


Item = TypeVar("Item")
Result = TypeVar("Result")


def items_in_flight(threads: int) -> int:
    """How many items run at once: Dask config ``tilemask.items-in-flight``, else two per worker thread."""
    configured = dask.config.get("tilemask.items-in-flight", None)
    return max(1, int(configured) if configured is not None else 2 * threads)


def run_items(
    items: Sequence[Item],
    run_one: Callable[[Item], Result],
    window: int,
    progress: bool,
    stop: threading.Event | None = None,
) -> list[Result]:
    """``run_one(item)`` for every item, at most ``window`` at a time, started in order; results in order.

    Items run on threads of their own, even one alone: Ctrl-C or SIGTERM reach the main thread only, which
    abandons the items in flight and waits for them, so that an item past the point of no return (its labels
    published: :func:`~tilemask.cluster.not_abandoned`) finishes its products and is recorded (a stop Python
    swallowed in the main thread is raised in the items instead, as they wait: the first is the run's). Setting
    ``stop`` from another thread abandons them as a failure does and raises
    :class:`~tilemask.cluster.Abandoned` (how a detached job is cancelled).
    """
    abandon = stop or threading.Event()
    window = max(1, min(window, len(items)))
    results: list = [None] * len(items)
    failure: BaseException | None = None
    several = window > 1  # one bar for the run; an item alone, or one at a time, shows its own bars and stages
    with items_progress(len(items), enabled=progress and several) as bar:
        pool = cf.ThreadPoolExecutor(max_workers=window, thread_name_prefix="tilemask-item")
        running: dict[cf.Future, int] = {}
        queued = iter(range(len(items)))

        def start_next() -> None:
            index = next(queued, None)
            if index is None or abandon.is_set():
                return
            context = contextvars.copy_context()  # each item's own: its bar and the abandon flag
            if several:
                context.run(bar.attach)
            context.run(abandon_on, abandon)
            running[pool.submit(context.run, run_one, items[index])] = index

        try:
            for _ in range(window):
                start_next()
            while running:
                done, _ = cf.wait(running, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    exc = future.exception()
                    if exc is None:
                        results[index] = future.result()
                        bar.item_done()
                        start_next()
                    elif not isinstance(exc, Abandoned) and failure is None:
                        failure = exc
                        abandon.set()
        except BaseException:  # Ctrl-C or SIGTERM while waiting: abandon what runs and let it clean up
            abandon.set()
            say_what_stopping_waits_for()
            with shielded():
                cf.wait(running)
            raise
        finally:
            pool.shutdown(wait=True)
    if failure is not None:
        raise failure
    if abandon.is_set():
        raise Abandoned("stopped")
    return results

