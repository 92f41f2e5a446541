"""What a user sees of long work: the windows bar (done / total, windows per second) and a live line per
stage without a count (COG assembly, post-processing, polygons, statistics), on stdout."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def window_progress(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; draws a rich bar on stdout when ``enabled`` (stderr is for the one-line errors)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} windows"),
        TextColumn("{task.fields[rate]:.1f} windows/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    start = time.perf_counter()
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=total, rate=0.0)

        def advance(n: int) -> None:
            done = bar.tasks[0].completed + n
            bar.update(task, advance=n, rate=done / max(time.perf_counter() - start, 1e-9))

        yield advance


@contextlib.contextmanager
def stage(label: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with the elapsed time while a stage without a count runs; its duration logged at INFO."""
    start = time.perf_counter()
    if enabled:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as bar:
            bar.add_task(label, total=None)
            yield
    else:
        yield
    logger.info("%s: %.1f s", label, time.perf_counter() - start)


def announce(text: str, enabled: bool = True) -> None:
    """One line for the user on stdout (with the progress bars; stderr is for errors)."""
    if enabled:
        from rich.console import Console

        Console(highlight=False, soft_wrap=True).print(text)
