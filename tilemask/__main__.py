"""The ``tilemask`` command (its console script, and ``python -m tilemask``).

Its modules take about a second to import; a Ctrl-C (or SIGTERM) meanwhile was a traceback and a process killed
by SIGINT, or, swallowed by Python inside an import, lost.  They are imported here under the command's own
handling of a stop (:func:`~tilemask.interrupts.stop_signals`): ``tilemask: interrupted``, exit 130, as later.
Only :mod:`tilemask`'s ``__init__`` (its error tree, a few ms) is imported before.
"""

from __future__ import annotations

import sys


def main() -> None:
    from .interrupts import stop_signals

    try:
        with stop_signals():
            from .cli import console
    except KeyboardInterrupt:
        print("tilemask: interrupted", file=sys.stderr)
        sys.exit(130)
    console()


if __name__ == "__main__":
    main()
