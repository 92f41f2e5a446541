"""What a user sees of long work: the windows bar (done / total, windows per second) and a live line per
stage without a count (COG assembly, post-processing, polygons, statistics), on stdout.

With several items in flight (:mod:`tilemask.batch`) one bar counts the windows
and items of the whole run; each item's windows advance it and its stages are
only logged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

_shared: contextvars.ContextVar[ItemsBar | None] = contextvars.ContextVar("tilemask_bar", default=None)
"""The run's bar, in the context of an item run alongside others."""


@contextlib.contextmanager
def window_progress(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; draws a rich bar on stdout when ``enabled`` (stderr is for the one-line errors)."""
    shared = _shared.get()
    if shared is not None:
        shared.grow(total)  # inputs are planned as they start: the run's total grows with them
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            shared.advance(n)

        try:
            yield advance
        finally:
            if done < total:  # a failed or stopped input's windows that will not run leave the total
                shared.grow(done - total)
    elif not enabled:
        yield lambda n: None
    else:
        with _windows_bar(label, total) as bar:
            yield bar.advance


@contextlib.contextmanager
def _windows_bar(label: str, total: int, items: int = 0) -> Iterator[ItemsBar]:
    """A rich bar of windows done / total and windows/s (and items done when ``items``)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} windows"),
        TextColumn("{task.fields[rate]:.1f} windows/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if items:
        columns.insert(4, TextColumn(f"{{task.fields[items]}}/{items} inputs"))
    start = time.perf_counter()
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=total, rate=0.0, items=0)

        def advance(n: int) -> None:
            done = bar.tasks[0].completed + n
            bar.update(task, advance=n, rate=done / max(time.perf_counter() - start, 1e-9))

        def item_done() -> None:
            bar.update(task, items=bar.tasks[0].fields["items"] + 1)

        def grow(n: int) -> None:
            bar.update(task, total=bar.tasks[0].total + n)

        yield ItemsBar(advance, item_done, grow)


@contextlib.contextmanager
def stage(label: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with the elapsed time while a stage without a count runs; its duration logged at INFO."""
    start = time.perf_counter()
    if enabled and _shared.get() is None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as bar:
            bar.add_task(label, total=None)
            yield
    else:
        yield
    logger.info("%s: %.1f s", label, time.perf_counter() - start)


class ItemsBar:
    """The run's bar while several items are in flight: :meth:`attach` in each item's context."""

    def __init__(self, advance: Callable[[int], None], item_done: Callable[[], None], grow: Callable[[int], None]):
        self.advance, self.item_done, self.grow = advance, item_done, grow

    def attach(self) -> None:
        _shared.set(self)


@contextlib.contextmanager
def items_progress(items: int, enabled: bool = True) -> Iterator[ItemsBar]:
    """One bar for a run of several inputs: windows done / planned so far, windows/s and inputs done."""
    if not enabled:
        yield ItemsBar(lambda n: None, lambda: None, lambda n: None)
        return
    with _windows_bar("all inputs", 0, items) as bar:
        yield bar


def announce(text: str, enabled: bool = True) -> None:
    """One line for the user on stdout (with the progress bars; stderr is for errors)."""
    if enabled:
        from rich.console import Console

        Console(highlight=False, soft_wrap=True).print(text)
