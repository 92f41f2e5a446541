"""Where the work runs: an embedded ``LocalCluster`` or an existing scheduler.

Defaults for the embedded cluster (see README, "Execution"):

* CPU: one worker process per 4 cores (at least one), each with 2 Dask threads
  and the process's share of the cores as torch intra-op threads.  A process
  calls its forward passes from one compute thread (:mod:`tilemask.inference`), so the
  second thread reads, blends and writes while the model computes.  Measured
  on a 2-core VM, one process with 2 torch threads predicts 1.9x faster than two
  single-threaded processes, which compete for memory bandwidth.
* CUDA: one worker per GPU with 2 threads, each worker on its own GPU.
* Dask's dashboard, and the workers' statistical profiler that feeds its profile
  page, only when someone can look: ``tilemask run`` asks for them when it shows
  progress (it prints the link), not under ``--quiet``; ``stats`` and ``evaluate``
  print no link and start neither.  Off, they save about 0.3 s of start-up and 2%
  of the workers' time; so do the event loops' health ticks and the system
  monitors behind the dashboard's graphs, which then run less often
  (:data:`UNWATCHED`).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import ctypes
import importlib.util
import logging
import multiprocessing
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import dask
from dask.utils import parse_timedelta
from distributed import Client, Future, LocalCluster, WorkerPlugin

from . import forkserver
from .errors import NoWorkers, RunError, SchedulerUnreached, UsageError, first_line, given, on_command_line, option
from .imports import import_in_background
from .interrupts import raise_if_stopped, shielded

CORES_PER_WORKER = 4
THREADS_PER_WORKER = 2
NO_WORKERS_TIMEOUT = 60.0
"""Seconds a run waits while the cluster has no worker at all (Dask config ``tilemask.no-workers-timeout``)."""

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cuda_devices() -> int:
    """GPUs this process may use, counted without importing torch (the client stays light).

    ``CUDA_VISIBLE_DEVICES`` when set, else the ``/dev/nvidiaN`` device files.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len([d for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit()]) if os.path.isdir("/dev") else 0


def default_workers() -> tuple[int, int]:
    """``(workers, threads per worker)`` of the embedded cluster on this host (:func:`workers_for`)."""
    return workers_for(available_cores(), cuda_devices())


def workers_for(cores: int, gpus: int) -> tuple[int, int]:
    """``(workers, threads per worker)`` for a host of ``cores`` and ``gpus``: one worker per GPU, with the
    cores shared among them as Dask threads, else one per 4 cores with 2 threads.

    On the CPU one thread waits on the forward passes while the other reads, normalizes, blends and writes,
    and the forward passes take the cores.  On a GPU the cores are free for that other work, and it is
    what the GPU waits on: for 16384^2 on this project's 2-core VM it took a Dask thread 7.7 s, against
    56 s of forward passes on the CPU.  On an H200 with 16 cores, 1 gigapixel: 37-41 s of that work over the
    16 threads in an 18-20 s run, while the compute thread was busy 17-19 s of it (docs/benchmarks.md).
    """
    if gpus:
        return gpus, max(THREADS_PER_WORKER, cores // gpus)
    return max(1, cores // CORES_PER_WORKER), THREADS_PER_WORKER


UNWATCHED = {
    "distributed.worker.profile.enabled": False,  # the profile page's statistical profiler
    "distributed.admin.tick.interval": "1s",  # the event loop's health tick (20 ms): still logs a stall over 3 s
    "distributed.admin.system-monitor.interval": "5s",  # CPU, memory and network graphs (0.5 s)
}
"""What the embedded cluster leaves out when nobody watches its dashboard: idle, the default intervals cost
1.6 s of CPU every 30 s over its processes here, these 0.5 s; each wakes a process beside the forward passes."""


GPU_PER_WORKER = "TILEMASK_GPU_PER_WORKER"
"""Set in the environment of the embedded cluster's workers: their LocalCluster numbers, 0, 1, ..., pick their
GPUs (:func:`tilemask.models.resolve_device`)."""


def check_cluster_options(scheduler: str | None, kind: str = "local") -> None:
    """Refuse (exit 2) where the work would run, before a job folder is made: an empty ``--scheduler`` (an unset
    ``$DASK_SCHEDULER_ADDRESS``: it started an embedded cluster, which a detached job's driver died with) or one
    that is not an address,
    ``--cluster slurm`` with ``--scheduler``, or with no cores or memory in the Dask config ``jobqueue.slurm``."""
    if scheduler is not None and not scheduler.strip():
        raise UsageError(f"{option('scheduler')} is empty: give the Dask scheduler's address (tcp://HOST:PORT)")
    if scheduler:
        from distributed.comm import registry
        from distributed.comm.addressing import get_address_host_port, normalize_address, parse_address

        try:
            address = normalize_address(scheduler)
            scheme = parse_address(address)[0]
            backend = registry.get_backend(scheme)  # 'nonsense://x' passes normalize_address
            if scheme == "inproc":  # distributed's comms within one process: no command reaches one
                raise ValueError("an inproc:// address names a scheduler inside one Python process; give its tcp:// "
                                 "address")  # fmt: skip
            try:
                backend.get_connector()
            except (TypeError, ImportError) as exc:  # ucx://: a stub since distributed moved it to distributed-ucxx
                raise ValueError(f"this Dask has no {scheme}:// transport (distributed moved ucx:// to the package "
                                 f"distributed-ucxx): {exc}") from None  # fmt: skip
            if address.startswith(("tcp://", "tls://", "ws://", "wss://")):
                port = get_address_host_port(address)[1]
                if not 0 < port <= 65535:  # connecting to it is refused for the 30 s of a scheduler down for now
                    raise ValueError(f"port {port} is out of range (1-65535)")
        except ValueError as exc:  # "missing port number", "unknown address scheme"
            raise UsageError(f"{given('scheduler', scheduler)}: not a Dask scheduler address: {exc}") from None
        if address.startswith("tls://"):
            check_client_tls(scheduler)
    if kind == "local" and not scheduler and multiprocessing.current_process().daemon:
        # a Dask worker's process (its nanny's child) may start none of its own: LocalCluster hung without a word
        raise UsageError("tilemask cannot start its cluster inside a Dask task: a worker's process may start none "
                         "of its own; give the worker's, client=distributed.get_client()")  # fmt: skip
    if kind == "slurm":
        if scheduler:
            raise UsageError(f"{given('cluster', 'slurm')} starts its own scheduler; leave out {option('scheduler')}")
        if importlib.util.find_spec("dask_jobqueue") is None:
            raise UsageError(f"{given('cluster', 'slurm')} needs dask-jobqueue: pip install 'tilemask[slurm]'")
        unset = [key for key in ("cores", "memory") if dask.config.get(f"jobqueue.slurm.{key}", None) is None]
        if unset:
            which = "them" if len(unset) > 1 else "it"
            raise UsageError(f"{given('cluster', 'slurm')}: no {' or '.join(unset)} for the worker jobs: set {which} "
                             "in the Dask config jobqueue.slurm (see cluster/slurm.yaml)")  # fmt: skip
        for key in ("cores", "processes"):  # dask-jobqueue divides one by the other: 0 was a ZeroDivisionError
            value = dask.config.get(f"jobqueue.slurm.{key}", None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{given('cluster', 'slurm')}: jobqueue.slurm.{key} is {value!r}, not a whole number "
                                 "of at least 1: set it in the Dask config (see cluster/slurm.yaml)")  # fmt: skip


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None = None, workers: int | None = None, threads_per_worker: int | None = None,
    kind: str = "local", dashboard: bool = False,
) -> Iterator[Client]:
    """A client of ``scheduler``, or of a cluster this process starts and closes on exit: an embedded
    ``LocalCluster`` (``kind="local"``, with Dask's dashboard and the workers' profiler when ``dashboard``)
    or SLURM jobs (``kind="slurm"``, :func:`slurm_cluster`)."""
    check_cluster_options(scheduler, kind)
    raise_if_stopped()  # nothing started for a command asked to stop meanwhile
    if kind == "slurm":
        with slurm_cluster(workers) as cluster, closing(Client(cluster)) as client:
            yield client
        return
    if scheduler:
        with closing(scheduler_client(scheduler)) as client:
            yield client
        return
    default_n, default_t = default_workers()
    # SIGINT held while the cluster starts: the worker processes spawned now (from distributed's event loop, whose
    # thread starts now too) inherit the mask, so a Ctrl-C to the process group while they start no longer kills
    # them half-started (a KeyboardInterrupt traceback from their imports, then distributed's "Status.init" at
    # exit); this process gets it once the cluster is up, and closes it. multiprocessing's resource tracker is
    # started first: starting it unblocks SIGINT and SIGTERM in the thread that does, whatever that thread's mask
    # was, so the mask put back is the one read before.
    # A Ctrl-C that reaches the process through another of its threads (unmasked there: a notebook's) is held
    # back too (:func:`shielded`) and raised once the cluster stands, which is then closed: raised half-way
    # through LocalCluster, it left the processes started so far running until the interpreter exited.
    unheld = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    forkserver.start_resource_tracker()
    signal.pthread_sigmask(signal.SIG_SETMASK, unheld | {signal.SIGINT})
    cluster = None
    quiet = not logger.isEnabledFor(logging.DEBUG)
    with _callers_environment() as started:  # put back once the cluster is closed
        try:
            # the nannies take the config along; one that restarts a worker later spawns it
            with shielded(), dask.config.set({**(UNWATCHED if not dashboard else {}), **forkserver.worker_config()}), \
                    _workers_that_did_not_start():
                cluster = LocalCluster(
                    n_workers=workers or default_n,
                    threads_per_worker=threads_per_worker or default_t,
                    processes=True,
                    dashboard_address=":0",  # the scheduler's HTTP server (health, metrics) runs either way
                    scheduler_kwargs={"dashboard": dashboard},
                    plugins={EmbeddedWorker(quiet=quiet)},
                    env={GPU_PER_WORKER: "1"},  # worker i takes GPU i (:func:`tilemask.models.resolve_device`)
                    silence_logs=logging.CRITICAL if quiet else logging.INFO,
                )
            started()
            signal.pthread_sigmask(signal.SIG_SETMASK, unheld)  # a Ctrl-C during the start is raised here
            with closing(Client(cluster)) as client:
                if quiet:  # the workers' stderr is /dev/null: their tilemask warnings are this process's to print
                    _forward_warnings(client)
                yield client
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unheld)
            if cluster is not None:  # e.g. a nanny still restarting a killed worker fails it: the work itself is done
                _close_quietly(cluster, "the embedded cluster")


def _forward_warnings(client: Client) -> None:
    """The workers' tilemask log records at this process's level (the handler prints what it is handed, errors
    alone under -q included), through Dask's ``forward_logging``.  A worker killed as it is asked failed the run
    (``CommClosedError: ... register_worker_plugin ...: Stream is closed``, exit 1): the scheduler keeps the plugin,
    and the nanny's new worker takes it."""
    try:
        client.forward_logging("tilemask", level=max(logging.WARNING, logger.getEffectiveLevel()))
    except OSError as exc:  # CommClosedError
        logger.debug("a worker left as its warnings were forwarded: %r", exc)


NANNY_VARIABLES = ("PYTHONHASHSEED", "__DASK_PARENT_PID")
"""What a nanny sets in its own process beside ``distributed.nanny.pre-spawn-environ``: the seed it gives its
workers and its process id (for their process titles)."""


_callers = threading.Lock()
_callers_before: dict[str, str | None] = {}
"""The caller's values of the variables the nannies set, read as the first embedded cluster of those running at
once started (:func:`_callers_environment`)."""
_nannies_values: dict[str, str | None] = {}
"""What the nannies set each of them to, read as the first cluster stood: one that holds another value as the last
cluster closes was set by the caller meanwhile, and is left as it is."""
_callers_clusters = 0


@contextlib.contextmanager
def _callers_environment() -> Iterator[Callable[[], None]]:
    """Put back, on exit, the variables Dask's nannies set in this process as they spawn their workers
    (``distributed.nanny.pre-spawn-environ``, :data:`NANNY_VARIABLES`) as they were before: a notebook's
    ``tilemask.run`` without a client left OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS at 1, and its
    ``import torch`` afterwards took one thread instead of the cores, as did every process it started later.  Exited
    once the embedded cluster is closed: a nanny sets them again each time it restarts a worker.  Embedded clusters
    running at once (two threads' runs) share one reading, taken as the first starts and put back as the last
    closes: the second's own reading held the first's nannies' values, which it put back after the first had put
    back the caller's.  A variable the caller set meanwhile (to another value than the nannies') is kept: what the
    nannies set is read from the environment once the cluster stands (yields ``started``, to call then)."""
    global _callers_clusters
    config = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    with _callers:
        if not _callers_clusters:
            _callers_before.clear()
            _nannies_values.clear()
        for name in {*config, *NANNY_VARIABLES}:  # one the first's config did not name is the caller's still
            _callers_before.setdefault(name, os.environ.get(name))
        _callers_clusters += 1

    def started() -> None:
        with _callers:
            for name in _callers_before:
                _nannies_values.setdefault(name, os.environ.get(name))

    try:
        yield started
    finally:
        with _callers:
            _callers_clusters -= 1
            if not _callers_clusters:
                for name, value in _callers_before.items():
                    if name in _nannies_values and os.environ.get(name) != _nannies_values[name]:
                        continue  # the caller's own since (a cluster that never stood: the nannies' still)
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


class _WorkerEnds(logging.Filter):
    """The nannies' "Worker process 17344 was killed by signal 9" (or "exited with status 1"), logged at INFO as a
    worker they start ends, kept while the level of distributed's nanny logger is lowered to log it; records under
    that logger's own level are still dropped, as they were."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level
        self.ends: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Worker process "):
            self.ends.append(record.getMessage())
        return record.levelno >= self.level


_LOWERED_LOCK = threading.Lock()
_lowered_by = 0  # how many runs are starting a cluster now
_LOWERED_FROM: list[int] = []  # the nanny logger's own level and its effective level before the first of them


@contextlib.contextmanager
def _workers_that_did_not_start() -> Iterator[None]:
    """distributed's "Nanny failed to start" (and its chain of tracebacks) as one line, naming how the worker ended
    (killed by a signal as it started: a CI's worker killed before it had connected was said to be a script's
    unguarded ``tilemask.run``); why is in the workers' logs, which ``--debug`` shows (in Python, logging at DEBUG;
    a worker that ran an unguarded script's ``tilemask.run`` says so itself)."""
    global _lowered_by
    nannies = logging.getLogger("distributed.nanny")
    with _LOWERED_LOCK:  # runs at once in threads: the first lowers the level, the last puts back the caller's
        if not _lowered_by:
            _LOWERED_FROM[:] = [nannies.level, nannies.getEffectiveLevel()]
            nannies.setLevel(min(_LOWERED_FROM[1], logging.INFO))
        _lowered_by += 1
        ends = _WorkerEnds(_LOWERED_FROM[1])
        nannies.addFilter(ends)
    try:
        yield
    except RuntimeError as exc:
        if "Nanny failed to start" not in str(exc):  # not "Cluster failed to start: <its reason>": that says why
            raise
        main = sys.modules.get("__main__")
        script = getattr(main, "__file__", None)
        if script is not None and not os.path.exists(script):  # as multiprocessing's new processes import it
            raise RunError(f"the embedded cluster's workers did not start: they import the script that started them, "
                           f"and {script} is no file (a script read from standard input): save it to a file, or give "
                           "tilemask.run a scheduler") from None  # fmt: skip
        why = [f"{end[0].lower()}{end[1:]} as it started" for end in dict.fromkeys(ends.ends)]
        if script is not None and not _tilemasks_command(main):
            why.append('a Python script calls tilemask.run under if __name__ == "__main__":, as each worker imports it')
        shows = "--debug shows why" if on_command_line() else \
            "logging at DEBUG shows why: logging.basicConfig(level=logging.DEBUG)"  # Python has no --debug
        raise RunError(f"the embedded cluster's workers did not start ({'; '.join(why + [shows])})") from None
    finally:
        with _LOWERED_LOCK:
            nannies.removeFilter(ends)
            _lowered_by -= 1
            if not _lowered_by:
                nannies.setLevel(_LOWERED_FROM[0])


def _tilemasks_command(main) -> bool:
    """Whether the process's ``__main__`` is the ``tilemask`` command (``python -m tilemask`` or its script), not a
    user's script whose workers import it."""
    spec = getattr(main, "__spec__", None)
    return (spec is not None and spec.name.split(".")[0] == "tilemask") or \
        os.path.basename(getattr(main, "__file__", "")) == "tilemask"


@contextlib.contextmanager
def closing(client: Client) -> Iterator[Client]:
    """``with client:`` whose close cannot take the place of the command's own outcome (:func:`_close_quietly`)."""
    try:
        yield client
    finally:
        _close_quietly(client, "the Dask client")


def _close_quietly(closeable, what: str) -> None:
    """``closeable.close()``, a failure or a timeout of it a warning: a SIGTERM while an embedded scheduler still
    ordered a graph of a million tasks was followed, 60 s on, by ``TimeoutError: timed out after 60 s.`` from the
    client's close and exit 1, where a stop is exit 130.  A Ctrl-C meanwhile is held and raised after it (a second
    one cut the cluster's close short, and distributed's own close at exit then took 10 s); one more cuts it short
    (a stalled scheduler's close waits 60 s)."""
    with shielded(held=1):
        try:
            closeable.close()
        except Exception as exc:  # noqa: BLE001 - the cluster's state is not this command's to mend
            logger.warning("closing %s: %s: %s", what, type(exc).__name__, exc)


def check_client(client) -> None:
    """A ``client=`` given in Python: a running, synchronous ``distributed.Client``, else one line before any job
    or table is made (a closed one, an address, or an asynchronous one were a ClosedClientError, an AttributeError
    and a coroutine's, and left a failed job)."""
    if not isinstance(client, Client):  # an address, as Client("tcp://...") takes it
        raise UsageError(f"client: a distributed.Client, not {type(client).__name__} {client!r} (tilemask.run takes "
                         "a scheduler's address as scheduler=)")  # fmt: skip
    if client.status != "running":  # closed, or its cluster was
        raise UsageError(f"the Dask client is {client.status}: give a running one, or none (tilemask then starts "
                         "its own cluster)")  # fmt: skip
    if client.asynchronous:
        raise UsageError("the Dask client is asynchronous (asynchronous=True), which tilemask cannot wait on: give "
                         "a synchronous one, or none")  # fmt: skip


TLS_SETTINGS = {"ca-file": "distributed.comm.tls.ca-file", "cert": "distributed.comm.tls.client.cert",
                "key": "distributed.comm.tls.client.key"}  # fmt: skip


def check_client_tls(scheduler: str) -> None:
    """Refuse (exit 2) a ``tls://`` scheduler where the Dask config gives the client no TLS context, or files it
    cannot load: distributed's connector failed with a bare ``TypeError`` or ``FileNotFoundError``."""
    import ssl

    from distributed.security import Security

    named = {what: dask.config.get(key, None) for what, key in TLS_SETTINGS.items()}
    missing = [f"{TLS_SETTINGS[what]} ({path})" for what, path in named.items() if path and not os.path.isfile(path)]
    if missing:
        raise UsageError(f"{given('scheduler', scheduler)}: no such file for TLS: {', '.join(missing)}")
    try:
        context = Security().get_connection_args("client").get("ssl_context")
    except (OSError, ssl.SSLError, ValueError) as exc:  # a certificate or key that does not load
        raise UsageError(f"{given('scheduler', scheduler)}: the TLS settings do not load: {first_line(exc)}") from None
    if context is None:
        raise UsageError(f"{given('scheduler', scheduler)}: no TLS settings for the client: set "
                         f"{TLS_SETTINGS['ca-file']}, {TLS_SETTINGS['cert']} and {TLS_SETTINGS['key']} in the Dask "
                         "config (or their DASK_DISTRIBUTED__COMM__TLS__... variables)")  # fmt: skip


def connect_timeout() -> float:
    """Seconds a ``--scheduler`` has to answer: Dask's ``distributed.comm.timeouts.connect`` (30 s)."""
    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))


def scheduler_client(address: str, timeout: float | None = None, set_as_default: bool = True) -> Client:
    """A client of the Dask scheduler at ``address``, or one line within ``timeout`` (else
    :func:`connect_timeout`): exit 1 when
    nothing takes the connection or what takes it says nothing (a scheduler may be down or stalled for now), exit 2
    when what answers is not a Dask scheduler (another service's port, a Dask worker's; an HTTP server such as Dask's
    dashboard, which says nothing to Dask's first bytes, is asked in HTTP after a second of silence).

    ``Client(address)`` alone waited forever on a service that takes the connection and never answers (the read
    of distributed's handshake has no timeout), and reading an HTTP server's answer as Dask's ended as
    ``MemoryError: Unable to allocate 3.07 EiB`` (its 'HTTP/1.1' taken for the length of a message): the
    scheduler is asked who it is first, on a connection of its own, with a deadline."""
    timeout = connect_timeout() if timeout is None else timeout
    answer: concurrent.futures.Future = concurrent.futures.Future()

    def ask() -> None:  # a thread of its own: the caller's may run an event loop already (a notebook)
        try:
            answer.set_result(asyncio.run(_scheduler_identity(address, timeout)))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as it is
            answer.set_exception(exc)

    threading.Thread(target=ask, name="tilemask-scheduler-probe", daemon=True).start()
    try:
        answer.result(timeout + 10)  # the probe keeps its own deadline; this one only guards against a bug there
    except _NoAnswer as exc:
        raise RunError(f"{address} did not answer as a Dask scheduler within {timeout:g} s: {exc}") from None
    except _Unreached as exc:
        raise SchedulerUnreached(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    except _NotAScheduler as exc:
        raise UsageError(f"{given('scheduler', address)}: not a Dask scheduler: {exc}") from None
    except concurrent.futures.TimeoutError:
        raise RunError(f"{address} did not answer as a Dask scheduler within {timeout:g} s") from None
    try:  # it answered as a scheduler: its Client (the same deadline, which it keeps from here on)
        return Client(address, timeout=timeout, set_as_default=set_as_default)
    except OSError as exc:
        raise SchedulerUnreached(f"cannot reach the Dask scheduler at {address}: {exc}") from None


class _Unreached(Exception):
    """No connection within the deadline, or it was closed before a word."""


class _NoAnswer(Exception):
    """Connected, and nothing came back within the deadline."""


class _NotAScheduler(Exception):
    """What answered speaks no Dask, or is a Dask server other than a scheduler."""


async def _scheduler_identity(address: str, timeout: float) -> dict:
    """What the Dask scheduler at ``address`` says it is (its ``identity``), as ``distributed.comm.connect`` and
    a ``Client`` reach it (connections retried until the deadline, then the handshake), with every read
    under the deadline too. Raises :class:`_Unreached`, :class:`_NoAnswer` or :class:`_NotAScheduler`."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address
    from distributed.security import Security

    scheme, location = parse_address(address)
    connector = registry.get_backend(scheme).get_connector()
    options = Security().get_connection_args("client")  # as a Client's, e.g. TLS from the Dask config
    deadline = time.monotonic() + timeout
    while True:
        try:
            comm = await asyncio.wait_for(connector.connect(location, deserialize=True, **options),
                                          max(0.0, deadline - time.monotonic()))  # fmt: skip
            break
        except OSError as exc:  # refused, no route, the attempt timed out (TimeoutError is an OSError)
            if time.monotonic() + 0.2 >= deadline:
                raise _Unreached(f"no connection within {timeout:g} s{_why(exc)}") from None
            await asyncio.sleep(0.2)

    async def read(first: bool = False):
        reading = asyncio.ensure_future(comm.read())
        if first and scheme == "tcp":  # a Dask server speaks at once; one silent for a second is asked in HTTP
            done, _ = await asyncio.wait({reading}, timeout=max(0.0, min(HTTP_QUESTION_AFTER,
                                                                         deadline - time.monotonic())))  # fmt: skip
            if not done:  # whichever comes first: Dask's handshake (a slow scheduler) or an HTTP answer
                asking = asyncio.ensure_future(_answers_http(location, deadline))
                await asyncio.wait({reading, asking}, timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if not reading.done() and asking.done() and asking.result():
                    reading.cancel()
                    raise _NotAScheduler("an HTTP server answered there (the dashboard's port?), not Dask's protocol")
                asking.cancel()
        try:
            return await asyncio.wait_for(reading, max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            raise _NoAnswer("it took the connection and said nothing (a stalled scheduler, or another service "
                            "waiting for its own request)") from None  # fmt: skip
        except OSError as exc:  # closed
            raise _Unreached(f"it closed the connection before it answered{_why(exc)}") from None
        except Exception:  # noqa: BLE001 - bytes that are no Dask message: MemoryError, struct, msgpack errors
            raise _NotAScheduler("what answered there does not speak Dask's protocol (a dashboard's or another "
                                 "service's port?)") from None  # fmt: skip

    try:
        mine = comm.handshake_info()
        await comm.write(mine)
        theirs = await read(first=True)
        if not isinstance(theirs, dict) or "pickle-protocol" not in theirs:
            raise _NotAScheduler("what answered there does not speak Dask's protocol")
        comm.local_info, comm.remote_info = {**mine, "address": comm.local_address}, {**theirs, "address": address}
        comm.handshake_options = comm.handshake_configuration(comm.local_info, comm.remote_info)
        await comm.write({"op": "identity", "n_workers": 0, "reply": True})
        identity = await read()
    finally:
        comm.abort()
    if not (isinstance(identity, dict) and "n_workers" in identity):  # a worker or nanny: no such argument
        raise _NotAScheduler("a Dask server answered there, but not a scheduler (a worker's or nanny's address?)")
    return identity


HTTP_QUESTION_AFTER = 3.0
"""Seconds of silence after which what took a ``tcp://`` connection is asked, on a connection of its own, whether it
is an HTTP server: a Dask server writes its handshake as it accepts, an HTTP server (Dask's dashboard) waits for a
request and so read as a stalled scheduler (exit 1 after the whole connect timeout). A scheduler whose event loop is
held up longer (a big graph arriving) gets the question on its Dask port too: it logs an error as it reads the
request as a message of exabytes (a reviewer's, at 1 s), then answers Dask's handshake as ever."""


async def _answers_http(location: str, deadline: float) -> bool:
    """Whether what listens at ``host:port`` answers an HTTP request as an HTTP server, before ``deadline``."""
    from distributed.comm.addressing import parse_host_port

    host, port = parse_host_port(location)
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                max(0.1, deadline - time.monotonic()))  # fmt: skip
        writer.write(b"HEAD / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
        await writer.drain()
        start = await asyncio.wait_for(reader.read(5), max(0.1, deadline - time.monotonic()))
        return start == b"HTTP/"
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


def _why(exc: BaseException) -> str:
    """': Connection refused' from the operating system's error behind ``exc``, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.strerror:
            return f": {exc.strerror}"
        exc = getattr(exc, "real_error", None) or exc.__cause__ or exc.__context__
    return ""


@contextlib.contextmanager
def slurm_cluster(jobs: int | None) -> Iterator:
    """dask-jobqueue's ``SLURMCluster``, configured by the user's Dask config ``jobqueue.slurm`` (see
    ``cluster/slurm.yaml``), scaled to ``jobs`` SLURM jobs (default 1); the jobs are cancelled on exit."""
    options = {"dashboard_address": ":0", **dask.config.get("jobqueue.slurm.scheduler-options", {})}  # a free port
    slurm = slurm_cluster_class()
    try:
        cluster = slurm(scheduler_options=options)
    except ValueError as exc:  # another setting dask-jobqueue refuses: it explains over lines
        reason = str(exc).strip().splitlines()[0].split(", for example")[0].rstrip(":")
        raise UsageError(f"--cluster slurm: {reason}: set it in the Dask config jobqueue.slurm (see cluster/slurm.yaml)") from None
    try:
        script = cluster.job_script()
        logger.info("SLURM job script:\n%s", script)
        _check_sbatch(script)
        cluster.scale(jobs=jobs or 1)
        yield cluster
    finally:
        try:
            cluster.close()
        except Exception as exc:  # noqa: BLE001 - scancel of jobs already gone
            logger.warning("closing the SLURM cluster: %s: %s", type(exc).__name__, exc)


def slurm_cluster_class() -> type:
    """dask-jobqueue's ``SLURMCluster`` (installed: :func:`check_cluster_options` checked it), imported with this
    process's SIGINT handler kept: importing ``dask_jobqueue`` sets its own, ``sys.exit()``, so a Ctrl-C of a
    ``--cluster slurm`` run exited 0 and was recorded as a failure (a reviewer's)."""
    handler = signal.getsignal(signal.SIGINT)
    from dask_jobqueue import SLURMCluster

    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGINT, handler)
    return SLURMCluster


def _check_sbatch(script: str) -> None:
    """``sbatch --test-only`` of the worker job: a SLURM that cannot be reached or a job it would never run is
    one line now (exit 1, as a scheduler that cannot be reached), where dask-jobqueue's own submission fails in
    a callback (a logged traceback) and the run would wait for workers that never come."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="tilemask-slurm-") as file:
        file.write(script)
        file.flush()
        try:
            done = subprocess.run(["sbatch", "--test-only", file.name], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RunError(f"--cluster slurm: cannot run sbatch: {exc}") from None
    if done.returncode != 0:
        said = [line.strip().removeprefix("sbatch: ") for line in done.stderr.splitlines() if line.strip()]
        reason = "; ".join(said[-2:]) or f"exit {done.returncode}"  # the cause, then its "fatal:"
        if _refused_as_configured(said):
            raise UsageError(f"--cluster slurm: sbatch refused the worker job: {reason}: set the Dask config "
                             "jobqueue.slurm (see cluster/slurm.yaml)")  # fmt: skip
        raise RunError(f"--cluster slurm: sbatch refused the worker job: {reason}")


_UNREACHED = ("unable to contact", "socket timed out", "zero bytes", "communication", "authentication", "standby", "busy")


_OPTION_REFUSED = re.compile(r"^(error: Invalid .*(specification|value)|unrecognized option|invalid option"
                             r"|option .* requires an argument)")
"""sbatch's own refusal of an option of the job script, before it asks the controller: ``--time`` of
``walltime: bogus``, an ``--gres`` or an unknown option in ``job-extra-directives``."""


def _refused_as_configured(said: list[str]) -> bool:
    """Whether SLURM's controller answered and refused the job as the config makes it (a partition, account or QOS
    it does not have, more memory or time than allowed), or sbatch itself refused one of its options: a setting,
    where a controller not reached is not."""
    for line in reversed(said):
        for verdict in ("allocation failure:", "Batch job submission failed:"):  # --test-only's, sbatch's
            if verdict in line:
                reason = line.split(verdict, 1)[1].lower()
                return not any(word in reason for word in _UNREACHED)
    return any(_OPTION_REFUSED.match(line) for line in said)


class WorkerSetup(WorkerPlugin):
    """Prepares each worker process for inference.

    * torch intra-op threads: the process's share of its host's cores;
    * glibc's allocator: Dask's nanny exports ``MALLOC_TRIM_THRESHOLD_=65536``,
      which pins the mmap threshold at 128 kB, so every activation buffer of a
      forward pass is mmap'd, page-faulted and unmapped again.  Measured here that
      makes CPU inference 2x slower; raising the thresholds again (``mallopt``)
      lets buffers be reused, and padding the heaps keeps glibc from unmapping the
      compute thread's empty heaps (:func:`reuse_large_allocations`).
    """

    name = "tilemask-worker-setup"

    def __init__(self, workers_by_host: dict[str, int]):
        self.workers_by_host = workers_by_host

    def setup(self, worker) -> None:
        from .models import set_torch_threads

        set_torch_threads(threads_per_process(available_cores(), self.workers_by_host.get(_host(worker.address), 1)))
        reuse_large_allocations()


def threads_per_process(cores: int, processes: int) -> int:
    """A host's cores shared among its worker processes, at least one each."""
    return max(1, cores // max(1, processes))


def reuse_large_allocations() -> None:
    """Keep freed buffers in glibc's heaps instead of unmapping them (no-op elsewhere).

    Buffers up to 32 MB come from the heap (``M_MMAP_THRESHOLD``), which is trimmed only past 128 MB
    (``M_TRIM_THRESHOLD``).  A thread other than the main one allocates from an arena of 64 MB heaps, and
    glibc unmaps a heap as soon as it is empty unless ``M_TOP_PAD`` is as large as a heap: the compute
    thread's activations were then mapped, page-faulted and unmapped again batch after batch (2.5 million
    page faults in a 1,800-window run, 15% of the forward passes' time), so the pad is 64 MB.  What
    is kept is what the worker's threads already used.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 128 << 20)
    libc.mallopt(m_top_pad, 64 << 20)


class EmbeddedWorker(WorkerPlugin):
    """How the embedded cluster's worker processes behave under a command line.

    * They ignore SIGINT: Ctrl-C in a terminal signals the whole process group,
      and shutting the workers down is the tilemask process's job, so they neither
      die half-way through a cleanup nor print ``KeyboardInterrupt`` tracebacks.
    * Unless ``--debug``, their C-level stderr goes to ``/dev/null``: libtiff and
      GDAL print there directly (``_tiffWriteProc: No space left on device``),
      before tilemask's one-line error says the same.  Errors still reach the
      client through Dask.
    * At start they import the inference code (torch: 0.9 s here) on a thread of
      their own, while they register and the client plans.  MONAI is imported only
      when a network has to be built (:mod:`tilemask.backends` caches its trace).
    * Once closed, they exit without tearing the interpreter down: with torch and
      MONAI imported that teardown alone took 0.85 s here, the largest part of
      closing the cluster.  Nothing is left to flush by then: outputs are
      written and published by tasks, which have all finished.
    """

    name = "tilemask-embedded-worker"

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def setup(self, worker) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        import_in_background(["tilemask.inference"])

    def teardown(self, worker) -> None:
        atexit.register(_exit_now)  # runs first at exit: atexit handlers run last registered first


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def no_workers_timeout() -> float:
    return float(dask.config.get("tilemask.no-workers-timeout", NO_WORKERS_TIMEOUT))


def dashboard_link(client: Client) -> str | None:
    """The Dask dashboard's address, or None where the scheduler serves none: ``dask scheduler --no-dashboard``
    still runs its HTTP server (health, metrics) and reports it as ``dashboard``, but its ``/status`` answers 404
    (a dashboard's 405 to a HEAD, in 1-2 ms).  A dashboard this process cannot reach within 1 s (a remote
    scheduler's, behind a tunnel) is still given: the user's browser may."""
    import urllib.error
    import urllib.request

    link = client.dashboard_link
    try:  # no proxy: the scheduler's own answer
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener.open(urllib.request.Request(link, method="HEAD"), timeout=1).close()
    except urllib.error.HTTPError as exc:  # the scheduler's own 404 (Tornado's), not a proxy's between
        return None if exc.code == 404 and exc.headers.get("Server", "").startswith("TornadoServer") else link
    except (OSError, ValueError):
        return link
    return link


def wait_for_workers(client: Client) -> None:
    """Return once the cluster has a worker; fail with one line after :func:`no_workers_timeout`, or once SLURM
    says it will start none of the worker jobs (exit 2: :func:`_refuse_stuck_worker_jobs`)."""
    limit = no_workers_timeout()
    deadline = time.monotonic() + limit
    while True:
        try:
            client.wait_for_workers(1, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            return
        except (TimeoutError, OSError):
            if time.monotonic() >= deadline:
                raise RunError(f"no Dask worker joined the cluster at {client.scheduler.address} within {limit:g} s"
                               f"{_where_slurm_workers_log(client)}") from None
        _refuse_stuck_worker_jobs(client)


def _slurm_worker_jobs(client: Client) -> list[str] | None:
    """The SLURM job ids of a ``--cluster slurm`` run's worker jobs; None for any other cluster."""
    cluster = getattr(client, "cluster", None)
    if type(cluster).__name__ != "SLURMCluster":
        return None
    return sorted(str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None))


def _refuse_stuck_worker_jobs(client: Client) -> None:
    """A worker job SLURM will not start as submitted waits in its queue for ever (a walltime over the partition's
    MaxTime, which ``sbatch --test-only`` accepts): when every one does, one line with SLURM's reasons."""
    ids = _slurm_worker_jobs(client)
    if not ids:
        return
    from . import slurm

    reasons = slurm.pending_reasons(ids)
    if len(reasons) == len(ids) and all(slurm.never_starts(reason) for reason in reasons.values()):
        said = ", ".join(f"{job} {reason}" for job, reason in sorted(reasons.items()))
        raise UsageError(f"--cluster slurm: SLURM will not start the worker jobs as configured (squeue's reason: "
                         f"{said}): set the Dask config jobqueue.slurm (walltime, queue, cores, memory) within the "
                         "partition's limits (scontrol show partition)")


def _where_slurm_workers_log(client: Client) -> str:
    """For ``--cluster slurm``: where its worker jobs wrote what stopped them (a wrong ``python``, a missing
    module), which the run's own line cannot say; else nothing."""
    ids = _slurm_worker_jobs(client)
    if ids is None:
        return ""
    folder = dask.config.get("jobqueue.slurm.log-directory", None)
    where = folder or f"slurm-<job id>.out files in {os.getcwd()}"
    return f"; its SLURM worker jobs ({', '.join(ids) or 'none submitted'}) wrote their output to {where}"


class Abandoned(Exception):
    """Another item of the run failed, or the run was stopped: this item stops waiting and cleans up."""


_abandon: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("tilemask_abandon", default=None)


def abandon_on(event: threading.Event) -> None:
    """In the current context, :func:`completed` raises :class:`Abandoned` once ``event`` is set."""
    _abandon.set(event)


@contextlib.contextmanager
def not_abandoned() -> Iterator[None]:
    """Work that, once begun, is finished even if the item is abandoned: publishing an output and deriving
    its products (an output in place with no record of its item would look finished but not be)."""
    global _finishing
    token = _abandon.set(None)
    with _finishing_lock:
        _finishing += 1
    try:
        yield
    finally:
        _abandon.reset(token)
        with _finishing_lock:
            _finishing -= 1


_finishing, _finishing_lock = 0, threading.Lock()  # how much not_abandoned work is under way, over all threads


def finishing() -> int:
    """How many items are in :func:`not_abandoned` work now: what stopping waits for."""
    return _finishing


class _WorkerWatch:
    """Fails a wait once the cluster has had no worker for longer than :func:`no_workers_timeout`, or none that
    runs tasks: all paused (over their memory's pause threshold) and executing nothing (it asks the scheduler at
    most once a second)."""

    def __init__(self, client: Client) -> None:
        self.client, self.limit = client, no_workers_timeout()
        self.last_worker = self.last_working = self.next_check = time.monotonic()

    def progressed(self) -> None:
        """A task finished: a worker was there and ran it.  The limits count from the last of these, not from the
        wait's start: checked only between results, a worker killed a minute into a steady run (its nanny
        restarting it in 2 s) failed the run at once, "no worker for 60 s"."""
        self.last_worker = self.last_working = time.monotonic()

    def check(self) -> None:
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + 1.0
        workers, working = _worker_counts(self.client)
        if workers:
            self.last_worker = now
        if working:
            self.last_working = now
        if now - self.last_worker > self.limit:
            raise NoWorkers(
                f"the Dask cluster at {self.client.scheduler.address} has had no worker for {self.limit:g} s "
                "(they died or never joined)"
            ) from None
        if now - self.last_working > self.limit:  # Dask waits for memory to be freed that nothing will free
            raise NoWorkers(
                f"the Dask cluster at {self.client.scheduler.address} has had no worker running tasks for "
                f"{self.limit:g} s: its {workers} worker(s) are paused, over their memory's pause threshold "
                "(distributed.worker.memory.pause of their memory limit); give them more memory"
            ) from None


def _worker_counts(client: Client) -> tuple[int, int]:
    """How many workers the scheduler has, and how many of them run tasks: not paused, or executing one still.  A
    scheduler that runs no function of the client's (pickling refused) is asked for its workers alone, all taken
    as running."""
    try:
        return client.run_on_scheduler(lambda dask_scheduler: (
            len(dask_scheduler.workers),
            sum(1 for ws in dask_scheduler.workers.values() if ws in dask_scheduler.running or ws.executing),
        ))  # fmt: skip
    except Exception:  # noqa: BLE001 - a scheduler that allows no pickled function says so with many types
        workers = len(client.nthreads())
        return workers, workers


def completed(client: Client, futures: Iterable[Future]) -> Iterator[Future]:
    """Futures as they finish (as ``as_completed``), failing when the cluster has had no worker for too long.

    A scheduler whose workers all died, or that never had one, would otherwise
    leave the run waiting forever without a word.  Each future is yielded as soon
    as it finishes (a done callback wakes the loop), so a job of many short
    stages does not add a polling interval per stage.  In an item abandoned by
    :mod:`tilemask.batch` it raises :class:`Abandoned`, and in any item of a command asked to stop,
    ``KeyboardInterrupt`` (a Ctrl-C Python swallowed: :mod:`tilemask.interrupts`).  Take a yielded future's
    value with :func:`result_of`: its worker may die before it is read.
    """
    abandon, watch = _abandon.get(), _WorkerWatch(client)
    done: queue.SimpleQueue[Future] = queue.SimpleQueue()
    futures = list(futures)
    for future in futures:
        future.add_done_callback(done.put)
    for _ in futures:
        while True:
            if abandon is not None:  # an item of a run, before the point of no return
                if abandon.is_set():
                    raise Abandoned()
                raise_if_stopped()
            try:
                future = done.get(timeout=0.25)
            except queue.Empty:
                watch.check()
                continue
            watch.progressed()
            yield future
            break


def result_of(client: Client, future: Future):
    """``future.result()`` that fails, instead of waiting forever, when the cluster has had no worker for too long.

    A finished result held only by a worker that dies before it is read is lost, and Dask computes it again,
    which needs a worker: a plain ``result()`` then waits forever (a run whose only worker was killed hung
    so, in 1 run of 8 of ``test_workers_that_all_die_mid_run_fail_the_run``).  The result is read once, on a
    thread of its own, while this one watches the workers: a ``result(timeout=...)`` that times out drops the
    transfer under way, and a result that took longer than the timeout to arrive (a chunk of a million polygons)
    was begun again, for ever.
    """
    return _read_watching(client, future.result)


def _read_watching(client: Client, read_results: Callable[[], object]):
    """``read_results()`` once, on a thread of its own, while this thread watches the cluster's workers."""
    watch = _WorkerWatch(client)
    arrived: concurrent.futures.Future = concurrent.futures.Future()

    def read() -> None:
        try:
            arrived.set_result(read_results())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as it is
            arrived.set_exception(exc)

    threading.Thread(target=read, name="tilemask-result", daemon=True).start()
    while True:
        try:
            return arrived.result(timeout=1.0)
        except concurrent.futures.TimeoutError:
            watch.check()


def gather(client: Client, futures: list[Future]) -> list:
    """``client.gather`` that fails, instead of waiting forever, when the cluster loses all its workers.  The
    results are read in one request (one each took 19-22 s against 12-14 s for the 1,024 blocks of an 8192^2
    ``tilemask stats``)."""
    for future in completed(client, futures):
        if future.status == "error":
            future.result()  # the task's own exception, at once
    return _read_watching(client, lambda: client.gather(futures))


@contextlib.contextmanager
def cluster_failures(what: str, client: Client | None = None) -> Iterator[None]:
    """The cluster's own failures (a worker killed too often, a lost connection) as one :class:`RunError`; a
    lost scheduler by that name: its tasks "cancelled for reason: scheduler-connection-lost" in Dask's words, or,
    given the ``client``, a broken connection once it has lost its scheduler (a scheduler killed mid-gather
    also reads ``CommClosedError: ... Connection reset by peer``). A killed worker or another cancellation is the
    scheduler's own word: it is named at once, not after waiting on the client."""
    from distributed.client import FutureCancelledError
    from distributed.comm import CommClosedError
    from distributed.scheduler import KilledWorker

    try:
        yield
    except (FutureCancelledError, KilledWorker, CommClosedError) as exc:
        cancelled = getattr(exc, "reason", None) == "scheduler-connection-lost"
        broken = isinstance(exc, CommClosedError) and client is not None  # the scheduler's loss, seen early?
        if cancelled or (broken and _scheduler_lost(client)):
            raise RunError(f"{what}: lost the Dask scheduler") from None
        raise RunError(f"{what}: the cluster failed: {type(exc).__name__}: {exc}") from None


def _scheduler_lost(client: Client, wait: float = 2.0) -> bool:
    """Whether ``client`` lost its scheduler: its status leaves "running" once it notices, which may come a
    moment after the failed request that showed it (``wait`` seconds at most)."""
    deadline = time.monotonic() + wait
    while client.status == "running":
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


WORKER_PACKAGES = ("tilemask", "torch")
"""What every worker must import: a task or plugin of tilemask's that a worker cannot unpickle makes Dask close
the worker, and a detached job wait for it forever."""


def _import_failures():
    """A function that imports each of ``names`` and returns ``{name: why}`` for those that fail: nested, so
    cloudpickle sends it by value to a scheduler or worker that cannot import tilemask itself."""

    def failed_imports(names: tuple[str, ...]) -> dict[str, str]:
        import importlib

        failed = {}
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - a broken install fails with any type
                failed[name] = f"{type(exc).__name__}: {exc}"
        return failed

    return failed_imports


def check_scheduler(client: Client) -> None:
    """The scheduler imports tilemask, or one line says so (exit 2, before any job is made or runs): it unpickles
    every task graph, and one of tilemask's tasks failed there as "Error during deserialization of the task graph"
    (``submit`` left a job queued for ever).  A scheduler that runs no function sent to it is not asked."""
    try:
        failed = client.run_on_scheduler(_import_failures(), ("tilemask",))
    except Exception as exc:  # noqa: BLE001 - the scheduler's refusal comes with many types
        logger.debug("cannot ask the scheduler what it imports: %r", exc)
        return
    for why in failed.values():
        raise UsageError(f"the Dask scheduler at {client.scheduler.address} cannot import tilemask ({why}): it "
                         "unpickles the tasks' graphs; install tilemask in the environment it runs in")


def check_workers(client: Client) -> None:
    """The scheduler (:func:`check_scheduler`) and each worker now in the cluster import what tilemask's tasks
    need (the workers: :data:`WORKER_PACKAGES`), or one line names the first that cannot (exit 2, before any job is
    made or runs); a worker that leaves meanwhile (its nanny restarted it: over its memory limit as torch loads) is
    named, exit 1.  A scheduler that lets no function be run on its workers (pickling refused) is not asked: the
    forward pass of zeros fails there instead.  An embedded cluster runs this process's environment: its scheduler
    and versions are not asked."""
    embedded = isinstance(client.cluster, LocalCluster)
    if not embedded:
        check_scheduler(client)
    try:
        answers = client.run(_import_failures(), WORKER_PACKAGES, on_error="return")
    except Exception as exc:  # noqa: BLE001 - the scheduler's refusal comes with many types
        logger.debug("cannot ask the workers what they import: %r", exc)
        return
    for address, answer in sorted(answers.items()):
        if isinstance(answer, BaseException):
            raise _left_while_prepared(f"Dask worker {address}", answer)
        for name, why in answer.items():
            raise UsageError(f"Dask worker {address} cannot import {name} ({why}): install tilemask, with torch, "
                             "in the environment its workers run in")
    if not embedded:
        _warn_of_other_versions(client)


def _warn_of_other_versions(client: Client) -> None:
    """Dask's ``VersionMismatchWarning``, asked again now that workers have joined: Dask compares versions as the
    client connects, before the workers of a cluster just started (SLURM, a ``dask worker`` started beside the
    run) are there.  The command line says it once (:func:`tilemask.command._one_line_version_mismatch`).  Dask's
    packages and tilemask itself, whose functions the workers run: a worker of another tilemask release went
    unnamed (not torch or MONAI: a CPU client beside CUDA workers differs rightly)."""
    from distributed.versions import VersionMismatchWarning, error_message

    try:
        versions = client.get_versions(packages=["tilemask"])
    except Exception as exc:  # noqa: BLE001 - as check_workers: a scheduler may refuse
        logger.debug("cannot ask the cluster for its versions: %r", exc)
        return
    said = error_message(versions["scheduler"], versions["workers"], versions["client"])
    if said["warning"]:
        warnings.warn(VersionMismatchWarning(said["warning"]), stacklevel=1)


def prepare_workers(client: Client) -> None:
    """Check the workers (:func:`check_workers`) and register :class:`WorkerSetup`: each host's cores shared among
    its worker processes.  A worker that leaves meanwhile is prepared again once its nanny has started it anew: a
    review's worker killed (SIGKILL) a second after it started failed the run, said to be over its memory limit.
    One that leaves twice fails it."""
    for chance in (1, 2):
        try:
            check_workers(client)
            workers_by_host = Counter(_host(a) for a in client.scheduler_info(n_workers=-1)["workers"])
            try:
                client.register_plugin(WorkerSetup(dict(workers_by_host)))
            except OSError as exc:  # CommClosedError: a worker restarted meanwhile
                raise _left_while_prepared("a Dask worker", exc) from None
            return
        except WorkerLeft as exc:
            if chance == 2:
                raise
            logger.info("%s left as tilemask prepared it; preparing the workers again", exc.worker)
            wait_for_workers(client)


_prepared_lock = threading.Lock()
_prepared_runs: Counter = Counter()  # runs of this process now using WorkerSetup, by scheduler address


@contextlib.contextmanager
def prepared_workers(client: Client, keep: bool = False) -> Iterator[None]:
    """:func:`prepare_workers` for the time of a run: :class:`WorkerSetup` is unregistered again as the last run of
    this process on that scheduler ends, unless ``keep`` (a cluster tilemask started, closed after the run).  Left
    registered on a caller's cluster, it went to every worker that joined later: one that could not import
    tilemask failed to start (``Nanny failed to start``), stayed listed as a worker, and the next run waited on it
    for ever.  The workers keep the torch threads and allocator settings it gave them, and the loaded network."""
    address = getattr(client.scheduler, "address", None)  # None: closed meanwhile (check_workers says so)
    with _prepared_lock:
        _prepared_runs[address] += 1
    try:
        prepare_workers(client)
        yield
    finally:
        with _prepared_lock:  # held while unregistering: a run starting meanwhile registers it after, not before
            _prepared_runs[address] -= 1
            if _prepared_runs[address] <= 0:
                del _prepared_runs[address]
                if not keep and client.status == "running":
                    _unregister_worker_setup(client)


def _unregister_worker_setup(client: Client) -> None:
    """Unregister :class:`WorkerSetup`: the scheduler forgets it first, then tells its workers; one that does not
    answer is not waited on (``Client.unregister_worker_plugin`` takes no timeout)."""
    try:
        client.sync(client._unregister_worker_plugin, WorkerSetup.name, callback_timeout=connect_timeout())
    except Exception as exc:  # noqa: BLE001 - best effort: the run's own outcome is what to tell
        logger.debug("cannot unregister %s: %r", WorkerSetup.name, exc)


class WorkerLeft(RunError):
    """A worker left (killed, or restarted by its nanny) as tilemask prepared it."""

    def __init__(self, worker: str) -> None:
        super().__init__(f"{worker} left as tilemask prepared it: killed, or restarted by its nanny (one over the "
                         "memory limit, distributed.worker.memory.terminate, which must hold torch and the network)")
        self.worker = worker

    def __reduce__(self):
        return type(self), (self.worker,)


def _left_while_prepared(worker: str, exc: BaseException) -> WorkerLeft:
    logger.debug("%s left: %r", worker, exc)
    return WorkerLeft(worker)


def _host(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0]


def cancel_and_drain(client: Client, futures: list, timeout: float = 60.0) -> None:
    """Cancel futures and wait until no worker thread still executes one of them.

    A cancelled task keeps running in its worker thread; waiting for it keeps a
    late chunk write from recreating files after a failed output was removed.
    """
    keys = {str(f.key) for f in futures}
    client.cancel(futures, force=True)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):  # best effort: the cluster itself may be what failed
        while time.monotonic() < deadline:  # each question within it too: a scheduler busy releasing many tasks
            running = client.run(_running_keys, callback_timeout=max(deadline - time.monotonic(), 0.1))
            if not any(k in keys for ks in running.values() for k in ks):
                return
            time.sleep(0.1)


MAY_STILL_RUN = frozenset({"waiting", "ready", "constrained", "executing", "long-running", "cancelled", "resumed"})
"""States of a worker's task that may run (on): queued (the scheduler's release may not have reached the worker,
which can start it first), executing, or cancelled while executing (it runs to its end)."""


def _running_keys(dask_worker) -> list[str]:
    """The keys of the tasks ``dask_worker`` runs or may still start.  Its ``active_keys`` alone missed a task
    dispatched to a thread that had not started it yet, and one queued whose release was still on its way: a
    chunk written after the failed output was removed left a staged Zarr behind (seen once, on a full disk in
    a default test run with other runs beside it)."""
    queued = [str(k) for k, ts in dask_worker.state.tasks.items() if ts.state in MAY_STILL_RUN]
    return queued + [str(k) for k in dask_worker.active_keys]
