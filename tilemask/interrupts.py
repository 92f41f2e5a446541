"""Ctrl-C and SIGTERM: one way to stop, and a cleanup that a second signal cannot cut short."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_asked = False  # a stop signal reached the command (a plain flag: a handler must take no lock)


def _raise_interrupt(signum, frame) -> None:
    global _asked
    _asked = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the command (cleanup runs, exit 130), and are remembered.

    Python raises a signal's ``KeyboardInterrupt`` wherever the main thread is; raised inside a weakref callback
    or a ``__del__`` (importlib runs one as each module's import lock is freed) it is printed as "Exception
    ignored in ..." and lost, and the command went on to finish, exit 0 (seen once at 0.8 s into a ``run``).
    Such a stop is not printed, and :func:`raise_if_stopped` raises it again."""
    global _asked
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _asked = False
    previous = {s: signal.signal(s, _raise_interrupt) for s in STOP_SIGNALS}
    hook = sys.unraisablehook

    def unraisable(what) -> None:
        global _asked
        if issubclass(what.exc_type, KeyboardInterrupt):  # a stop swallowed by Python, whoever's handler raised it
            _asked = True
        else:
            hook(what)

    sys.unraisablehook = unraisable
    try:
        yield
        raise_if_stopped()
    except Exception:
        if _asked:  # an error the stop caused is the stop: pydantic-core turned the KeyboardInterrupt raised as it
            raise KeyboardInterrupt from None  # built a model's schema (tilemask's import) into a SchemaError, exit 1
        raise
    finally:
        _restore(previous)  # first: a signal from here on is the caller's to handle
        sys.unraisablehook = hook
        _asked = False  # for the next command in this process (tests run many)


def _restore(previous: dict) -> None:
    """Put back the handlers ``signal.signal`` returned; one set from C (outside Python, when it embeds Python) is
    returned as ``None``, which cannot be set again: the default action stands in for it."""
    for s, handler in previous.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)


def raise_if_stopped() -> None:
    """Raise ``KeyboardInterrupt`` if the command was asked to stop (from any thread: a run's items check it
    before they publish), though the interrupt raised then was lost."""
    if _asked:
        raise KeyboardInterrupt


@contextlib.contextmanager
def shielded(held: int | None = None) -> Iterator[None]:
    """Run a failed run's cleanup to its end: Ctrl-C or SIGTERM meanwhile is held back, then raised as
    ``KeyboardInterrupt`` once the cleanup is done (the user asked to stop: exit 130).  With ``held``, only that
    many are: the next cuts the cleanup short (one that waits on something else, which may have stalled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, frame) -> None:
        received.append(signum)
        if held is not None and len(received) > held:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, hold) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        _restore(previous)
    if received:
        raise KeyboardInterrupt
