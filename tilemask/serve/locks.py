"""One lock per key, for what a server makes once while requests for it come together (a volume's browser copy, a
plain Zarr's zoomed-out level): the others wait for the first's, and requests for other keys do not."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator


class KeyedLocks:
    """A lock per key, there while some thread holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: dict[Hashable, list] = {}  # key -> [its lock, how many threads hold or wait for it]

    @contextlib.contextmanager
    def __call__(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            entry = self._held.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._held[key]
