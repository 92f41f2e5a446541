"""The embedded cluster's worker processes, forked from a server that starts with the command.

Dask's nanny spawns each worker as a new interpreter, which then imports
distributed and tilemask (1.0 s here) before it can import torch, and only
once the command has imported its own modules and planned the run. Started as
the command starts, multiprocessing's fork server imports them on the other
core meanwhile, and each worker is a fork of it: the network was ready 0.9 s
sooner here (docs/benchmarks.md, "Many small inputs"). torch is left to the workers
(imported on a thread of their own as they start,
:class:`tilemask.cluster.EmbeddedWorker`): preloaded in the server too, the
network was ready about 0.4 s sooner still (two runs each), but the server's
resident memory went from 70 to 254 MB, counted again beside every worker's.

The server starts with SIGINT blocked, so its workers inherit the mask a
spawned worker gets from ``cluster_client`` (a Ctrl-C while they start does not
kill them half-started); it ignores SIGINT itself and exits with the command.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

PRELOAD = ["tilemask.forkserver", "distributed.nanny", "tilemask.cli", "tilemask.cluster"]
"""What the server imports before it forks a worker: this module first (it sets the workers' environment)."""

_started = False
_IN_SERVER = "TILEMASK_IN_FORKSERVER"


NO_LEAK_WARNING = "ignore:resource_tracker:UserWarning"


def start_resource_tracker() -> None:
    """multiprocessing's resource tracker, started without its warning of leaked semaphores: after a ``kill -9`` of
    the command it outlives it, and printed two lines of that warning on the command's stderr (a review's, 11 of 15
    kills).  Its interpreter takes this one's ``-W`` options (``sys.warnoptions``), given the filter while it
    starts only: the caller's other children are not this one's to change."""
    from multiprocessing import resource_tracker

    options = list(sys.warnoptions)
    sys.warnoptions.append(NO_LEAK_WARNING)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions[:] = options


def start() -> None:
    """Start the fork server now, importing :data:`PRELOAD` on its own while this process goes on. Where it
    cannot start (its socket in a temporary folder whose path is too long for one: ``AF_UNIX path too long``),
    the nannies spawn their workers as usual."""
    global _started
    import multiprocessing
    from multiprocessing import forkserver

    start_resource_tracker()  # started first: starting it unblocks SIGINT in this thread
    unheld = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        os.environ.setdefault("PYTHONHASHSEED", "6640")  # what the nanny gives a spawned worker (read at start)
        os.environ[_IN_SERVER] = "1"
        multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
        _started = True
    except OSError as exc:
        logging.getLogger(__name__).debug("no fork server for the workers: %s", exc)
    finally:
        os.environ.pop(_IN_SERVER, None)
        signal.pthread_sigmask(signal.SIG_SETMASK, unheld)


def stop() -> None:
    """Stop the server once the clusters whose workers it forked have closed (it tells a nanny its worker's exit
    status: while they run, its end reads as theirs). The command needs none: the server exits with it."""
    global _started
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # the standard library's own way, used by its tests
    _started = False


def worker_config() -> dict:
    """The Dask config under which nannies fork their workers from the running server (none if not started).
    distributed would otherwise import its own preload list (pandas, lz4: 0.4 s) in this process, for a server
    that has started already."""
    if not _started:
        return {}
    import distributed.utils

    distributed.utils._forkserver_preload_set = True
    return {"distributed.worker.multiprocessing-method": "forkserver"}


def _set_worker_environment() -> None:
    """In the server: the environment the nanny sets before it spawns a worker (``distributed.nanny.pre-spawn-
    environ``: one thread for OpenMP, MKL and OpenBLAS, read when torch loads them), an existing variable
    winning as in the nanny. ``MALLOC_TRIM_THRESHOLD_`` is read when a process starts: the workers' allocator
    is set by :func:`tilemask.cluster.reuse_large_allocations` instead."""
    import dask
    import distributed  # noqa: F401 - its config defaults

    for key, value in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items():
        if value is not None:
            os.environ.setdefault(key, str(value))


if os.environ.get(_IN_SERVER) == "1":  # imported by the server, first of PRELOAD
    _set_worker_environment()
