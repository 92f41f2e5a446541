"""Drive a job: its items planned as they start, run a window at a time, each recorded in the manifest.

:func:`run` is ``tilemask run`` and :func:`tilemask.run`; :func:`drive` is the
same run started on a cluster worker by ``tilemask submit``, where it outlives
the process that submitted it.

What a run of a job does (docs/DESIGN.md section 9, :mod:`tilemask.jobs`):

1. Check what every input shares and list the inputs without opening them
   (:func:`~tilemask.planning.plan_model`), then create or reopen the job's folder
   and take its lock.
2. Find the first item to do: items ``ok`` in the manifest whose outputs are
   complete are skipped (resumed); failed ones are kept failed unless
   ``retry_failed``.  That item is planned before any work, so an invalid
   workflow fails fast (exit 2) with nothing computed.
3. Start the cluster, probe the network once, and run the items, a window in
   flight (:mod:`tilemask.batch`), each planned when it starts.  Each attempt
   writes a ``started`` line, then an ``ok`` or ``failed`` line, fsynced.
4. ``on_error="abort"`` (the default) stops at the first failure and raises it;
   ``"skip"`` records it and goes on.  The report and the final state are
   written whatever happens, Ctrl-C and ``tilemask cancel`` included.

An item whose earlier attempt this job began may replace that attempt's outputs
without ``overwrite``: they are this job's own.  ``overwrite`` forgets the
manifest and redoes every item.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from distributed import Client

from .batch import items_in_flight, run_items, say_what_stopping_waits_for
from .cluster import (
    Abandoned,
    check_client,
    check_cluster_options,
    cluster_client,
    dashboard_link,
    prepared_workers,
    wait_for_workers,
)
from .command import first_line, scheduler_from
from .engine import RunResult, Undelivered, deliver, probe, process_age, run_job
from .errors import (
    InputError,
    NoWorkers,
    RunError,
    SchedulerUnreached,
    TilemaskError,
    UsageError,
    check_flags,
    command_line,
    option,
)
from .imports import import_in_background
from .jobs import (
    ACTIVE,
    JobCancelled,
    JobError,
    JobFolder,
    default_job_dir,
    job_folder,
    job_id,
    labels_stamp,
    outputs_complete,
    own_labels,
)
from .outputs import FolderListings, OutputLock
from .planning import InputPlan, WorkflowPlan, classes_of, plan_model
from .products import client_imports
from .progress import announce
from .settings import measure_after_seconds
from .sources import file_stamp, input_stamp
from .sources.archive import member_path, sidecars, split_member
from .storage import network_object, object_version, redacted
from .workflow import InputItem, Workflow

logger = logging.getLogger(__name__)

ON_ERROR = ("abort", "skip")
CLUSTERS = ("local", "slurm")


class SchedulerLost(RunError):
    """The connection to the scheduler broke: the items in flight are not recorded as failed, and are redone
    when the job runs again."""


class ClientClosed(RunError):
    """The caller's Dask client was closed during the run (a notebook's ``client.close()``, or its cluster's): the
    job is recorded cancelled, and the items in flight are redone when it runs again."""


def _closed(client: Client | None) -> bool:
    """Whether ``client`` was closed by its caller: a lost scheduler leaves it "connecting" while it tries to
    reconnect, then it closes itself (``Failed to reconnect to scheduler``), its connection gone (:func:`_lost`)."""
    return client is not None and client.status in ("closing", "closed") and not _lost(client)


def _lost(client: Client | None) -> bool:
    """Whether ``client`` lost its scheduler: Dask drops its connection (``scheduler_comm``) as it tries to reconnect,
    and keeps it dropped as it gives up and closes itself; a client its caller closes keeps it, closed."""
    return client is not None and client.status != "running" and getattr(client, "scheduler_comm", None) is None


@dataclass(frozen=True)
class Options:
    """How a job runs; written in its ``job.json`` so a detached driver runs it the same way."""

    on_error: str = "abort"
    retry_failed: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise UsageError(f"on_error must be one of {', '.join(ON_ERROR)} (got {self.on_error!r})")
        check_flags(retry_failed=self.retry_failed, overwrite=self.overwrite)


def prepare(
    workflow: Workflow, options: Options, job_dir: str | os.PathLike | None = None, source: str | None = None
) -> tuple[WorkflowPlan, JobFolder, Callable[[], None]]:
    """Check the workflow (exit 2) and find its job folder; returns the plan, the folder and ``record()``,
    which writes the job's record into the folder (call it with the job's lock held)."""
    plan = plan_model(workflow)
    workflow_dict, base_dir = workflow.to_dict(), str(workflow.base_dir)
    job = job_folder(job_dir or default_job_dir(workflow.output.path, base_dir, job_id(workflow_dict, base_dir)))

    def record() -> None:
        items = (
            {"item": i, "name": item.name, "files": list(item.files), "output": workflow.output_path(item.name)}
            for i, item in enumerate(plan.items)
        )
        job.create(workflow_dict, base_dir, source, options.__dict__, items, replace=options.overwrite)

    return plan, job, record


def run(
    workflow: Workflow | Mapping | str | Path,
    client: Client | None = None,
    *,
    scheduler: str | os.PathLike | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
    on_error: str = "abort",
    retry_failed: bool = False,
    job_dir: str | os.PathLike | None = None,
    source: str | None = None,
    cluster: str = "local",
    on_result: Callable[[RunResult], None] | None = None,
) -> JobResults:
    """Run a workflow's job on ``client``, on ``scheduler``, or on a cluster it starts (``cluster``: local,
    embedded; slurm, jobs of dask-jobqueue): one result per input (``status`` ok, skipped or failed).
    ``workflow``: a Workflow, a workflow file, or the mapping one holds (read as :meth:`Workflow.from_dict`, its
    relative paths the working folder's).  ``source``: the workflow file, recorded in the job.  ``on_result``:
    called with each input's result as it is known (from the items' threads), those done before first."""
    refuse_while_bootstrapping()
    if isinstance(workflow, Mapping):
        workflow = Workflow.from_dict(dict(workflow))
    elif not isinstance(workflow, (Workflow, str, os.PathLike)):  # a list of files was a bare TypeError
        raise UsageError(f"workflow: a Workflow, a workflow file or the mapping one holds, not {type(workflow).__name__}"
                         f" {workflow!r:.80}")  # fmt: skip
    elif not isinstance(workflow, Workflow):
        source = str(Path(workflow).resolve())
        workflow = Workflow.from_yaml(workflow)
    options = Options(on_error, retry_failed, overwrite)
    check_flags(progress=progress)
    if isinstance(scheduler, os.PathLike):  # a scheduler file's path
        scheduler = os.fspath(scheduler)
    _check_cluster_arguments(scheduler, workers, threads_per_worker, cluster, client)
    try:  # an address, or a scheduler file, as --scheduler takes them
        scheduler = scheduler_from(scheduler)
    except ValueError as exc:
        raise UsageError(f"scheduler: {exc}") from None
    if client is None:
        check_cluster_options(scheduler, cluster)
    else:  # no job folder for a run that cannot start
        check_client(client)
    plan, job, record = prepare(workflow, options, job_dir, source)
    new = not job.exists()
    with job, _out_of_the_pool():
        try:
            record()  # a first run that cannot write it (a full disk) is refused as the others are: no job left
            return drive_job(job, plan, options, progress, client=client, scheduler=scheduler, workers=workers,
                             threads_per_worker=threads_per_worker, cluster=cluster, on_result=on_result)  # fmt: skip
        except TilemaskError as exc:
            if exc.exit_status == 2 or isinstance(exc, SchedulerUnreached):  # refused before any work (exit 2), or
                if new and not job.manifest().started():  # none could be sent (exit 1): the job never ran
                    with contextlib.suppress(OSError, JobError):  # the refusal is what to tell
                        job.discard()
                plan.remove_made()  # the output folders its checks made, if still empty (outside a --job-dir)
            raise


@contextlib.contextmanager
def _out_of_the_pool() -> Iterator[None]:
    """Called inside a Dask task (``client=distributed.get_client()``): the task's thread leaves its worker's thread
    pool while the run waits on its tasks, and rejoins it after, as ``distributed.worker_client`` does.  It held
    its thread: on a cluster of one single-threaded worker the run's tasks never started, and it waited for ever."""
    from distributed import rejoin, secede
    from distributed.worker import thread_state

    if getattr(thread_state, "start_time", None) is None:  # not a task's thread
        yield
        return
    try:
        secede()
    except (KeyError, ValueError):  # seceded already (distributed.worker_client), or not a worker's pool thread
        yield
        return
    try:
        yield
    finally:
        rejoin()


def refuse_while_bootstrapping() -> None:
    """Exit, in one line, a process that calls ``tilemask.run`` while it imports the caller's script as it starts
    (multiprocessing's ``_inheriting``: each worker of the embedded cluster imports the script it was started from,
    and a call at the script's top level runs again there).  Its job was then "running in another process" and the
    caller got distributed's "Nanny failed to start" and two tracebacks; a script that also rebuilt its inputs at
    its top level waited for over ten minutes."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit("tilemask: error: tilemask.run was called again as a new worker process imported your "
                         'script: call it under if __name__ == "__main__": (README, "Command line and Python")')


def _check_cluster_arguments(scheduler, workers, threads_per_worker, cluster: str, client=None) -> None:
    """Where the work runs, as Python gives it (the commands' options are checked as they are parsed): refused in
    one line, before a job folder is made.  ``cluster="bogus"``, ``workers=0`` and ``threads_per_worker=0`` ran an
    embedded cluster of the default size, ``workers="2"`` and ``scheduler=5`` were a TypeError and an
    AttributeError; ``--workers`` / ``--threads-per-worker`` beside ``--scheduler`` (or a client) were dropped
    without a word."""
    if cluster not in CLUSTERS:
        raise UsageError(f"{option('cluster')} must be one of {', '.join(CLUSTERS)}, not {cluster!r}")
    if scheduler is not None and not isinstance(scheduler, str):
        raise UsageError(f"{option('scheduler')}: a Dask scheduler's address (tcp://HOST:PORT), not {scheduler!r}")
    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise UsageError(f"{option(name)} must be a positive integer, not {value!r}")
    if client is not None and (scheduler is not None or cluster != "local"):  # dropped without a word (a review)
        given = f"{option('scheduler')}={scheduler!r}" if scheduler is not None else f"{option('cluster')}={cluster!r}"
        raise UsageError(f"{given} and a client: the client's cluster runs the work; leave {given.split('=')[0]} out")
    sizes = [option(name) for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker))
             if value is not None]  # fmt: skip
    if sizes and (scheduler is not None or client is not None):
        verb, them = ("applies", "it") if len(sizes) == 1 else ("apply", "them")
        given = option("scheduler") if client is None else "client"
        raise UsageError(f"{' and '.join(sizes)} {verb} to the cluster tilemask starts, not to one given by {given}: "
                         f"leave {them} out")  # fmt: skip


def drive(folder: str) -> int:
    """The detached driver of ``tilemask submit``: runs the job in ``folder`` on the cluster of the worker it
    runs on, and returns how many items failed.  Dask runs it again on another worker if its worker dies; it
    then resumes from the manifest."""
    from distributed import get_worker, worker_client

    job = job_folder(folder)
    if job.cancel_requested():  # withdrawn or cancelled before a worker started it: it starts nothing, and its
        # "running" does not overwrite the "cancelled" that submit or cancel writes (the job then read as lost)
        if job.status().get("state") in ACTIVE:
            job.set_status("cancelled", message="cancelled before its driver started", finished=time.time())
        return 0
    info = job.info()
    options = Options(**info["options"])
    try:
        plan = plan_model(job.workflow())
    except TilemaskError as exc:
        job.set_status("failed", message=first_line(exc))
        raise
    key = get_worker().get_current_task()
    with job, worker_client(separate_thread=True) as client, command_line():  # submitted by the command
        results = drive_job(job, plan, options, progress=False, client=client, driver=key)
    return sum(r.status == "failed" for r in results)


def drive_folder(folder: str, cluster: str, workers: int | None) -> int:
    """The driver job of ``tilemask submit --cluster slurm`` (``tilemask drive``): runs the job in ``folder`` as
    ``tilemask run`` would, on SLURM worker jobs it starts (``cluster``), and returns how many items failed.  Its
    status records its SLURM job id; started again (``tilemask run``, another submit), the job resumes."""
    job = job_folder(folder)
    options = Options(**job.info()["options"])
    slurm_job = os.environ.get("SLURM_JOB_ID") or None
    try:
        plan = plan_model(job.workflow())
    except TilemaskError as exc:
        job.set_status("failed", message=first_line(exc), finished=time.time())
        raise
    with job:
        results = drive_job(job, plan, options, progress=False, cluster=cluster, workers=workers, slurm_job=slurm_job)
    return sum(r.status == "failed" for r in results)


@dataclass
class _Progress:
    """The item counts of ``status.json``, rewritten at most once a second."""

    job: JobFolder
    counts: dict[str, int] = field(default_factory=dict)
    written: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: str, state: str = "running") -> None:
        with self.lock:
            self.counts[status] = self.counts.get(status, 0) + 1
            if time.monotonic() - self.written > 1.0:
                self.write(state)

    def write(self, state: str, **fields) -> None:
        total = self.counts.get("items", 0)
        done = sum(v for k, v in self.counts.items() if k != "items")
        self.job.set_status(state, counts={**self.counts, "pending": total - done}, **fields)
        self.written = time.monotonic()


def drive_job(
    job: JobFolder,
    plan: WorkflowPlan,
    options: Options,
    progress: bool,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    driver: str | None = None,
    cluster: str = "local",
    slurm_job: str | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> JobResults:
    """Run ``job`` (its lock held): resume from the manifest, run what is left, record every item.
    ``driver``: the key of the detached driver's task running this (``tilemask status`` asks the scheduler);
    it resumes from the manifest even under ``--overwrite``, as Dask starts it again when its worker dies:
    ``submit`` forgot the earlier attempts when it recorded the job.  ``slurm_job``: the SLURM job id of the driver
    job of ``submit --cluster slurm`` running this (``tilemask status`` asks SLURM), which resumes so too."""
    forget = options.overwrite and driver is None and slurm_job is None  # once the run records its first item
    plan.job_id = job.id  # outputs staged under the job's id, kept when interrupted, resumed by its next run
    try:
        manifest = job.manifest()
        job.status()
    except JobError:  # a damaged record: --overwrite starts the job afresh, as there is nothing to keep
        if not forget:
            raise
        job.reset()
        manifest = job.manifest()
    items = plan.items
    results: list[RunResult | None] = [None] * len(items)
    counts = _Progress(job, {"items": len(items)})
    skipped: set[str] = set()
    todo, done_before = [], []
    latest = manifest.latest()
    weights = _weights_stamp(plan.model.weight_files)  # retrained weights at the same path: every item is redone
    finished = _finished({item.name: latest[item.name] for item in items if item.name in latest},
                         (plan.model.weight_files, weights),
                         {item.name: list(item.files) for item in items},
                         {item.name: _regions(plan, item) for item in items}, say_unversioned=not forget)
    stop = threading.Event()

    def forgotten() -> None:
        """``--overwrite``: the manifest forgotten (every item redone) when the run records its first item, not
        before: a run refused before any work (an output not tilemask's, exit 2) leaves the job's record as it was,
        and its next run resumes instead of redoing every item.  A cancel asked meanwhile is this run's: kept."""
        job.reset(cancel=False)
        with counts.lock:
            counts.counts = {"items": len(items)}
        skipped.clear()

    callers = client  # given by the caller, who may close it meanwhile
    runner = _ItemRunner(job, plan, options, manifest.started(), counts, progress, stop, weights, on_result,
                         forgotten if forget else None, callers_client=callers is not None)  # fmt: skip
    if options.retry_failed and not forget:  # failed only to be sent on, their outputs as the job wrote them:
        # sent alone
        runner.undelivered = {name: latest[name] for name in finished if latest[name]["status"] == "failed"}
    for index, item in enumerate(items):
        earlier = _earlier(latest.get(item.name), item.name in finished, options)
        if earlier is not None:  # counted as the record says until the record is forgotten
            counts.counts[earlier.status] = counts.counts.get(earlier.status, 0) + 1
            if earlier.status == "skipped":
                skipped.add(item.name)
        if earlier is None or forget:
            todo.append(index)
        else:
            results[index] = earlier
            done_before.append(earlier)
    done = sum(earlier.status == "skipped" for earlier in done_before)  # kept, not redone; not those failed before
    logger.info("job %s: %d item(s), %d to do, %d done before", job.id, len(items), len(todo), done)
    state, ran_through = "failed", False
    address = client.scheduler.address if client is not None else scheduler
    counts.write("running", host=socket.gethostname(), pid=os.getpid(), started=time.time(), message=None,
                 scheduler=address, driver=driver, slurm_job=slurm_job, finished=None)  # fmt: skip
    try:
        first = runner.first_plannable(todo, results)  # before any work: exit 2 if the workflow cannot run
        if first is not None and options.on_error == "abort" and not options.overwrite:
            plan.check_outputs_there([items[i] for i in todo if i > first], runner.begun)  # so are their outputs
        measure_after = measure_after_seconds()  # so is a TILEMASK_AUTO_MEASURE_AFTER that is not a number
        if first is not None and plan.workflow.output.dicomweb:
            from .sinks.dicomseg import check_answers

            check_answers(plan.workflow.output.dicomweb)  # before any window; the store comes after them all
        for earlier in done_before:  # told once the run is not refused (it printed "done in an earlier run" first)
            runner.tell(earlier)
        if first is not None:
            with contextlib.ExitStack() as stack:
                ours = client is None and scheduler is None  # a cluster it starts, closed after the run
                if client is None:
                    client = stack.enter_context(
                        cluster_client(scheduler, workers, threads_per_worker, cluster, dashboard=progress)
                    )
                stack.enter_context(_watch_cancel(job, stop))
                import_in_background(client_imports(plan.workflow))  # while the workers load the network
                wait_for_workers(client)
                stack.enter_context(prepared_workers(client, keep=ours))
                link = dashboard_link(client) if progress else None
                announce(f"dask dashboard: {link}", enabled=link is not None)
                rest = [i for i in todo if i >= first and results[i] is None]
                windows = runner.prepared[first][0].plan.n_windows * len(rest) * len(plan.settings.flips)  # about
                runner.out_channels = probe(client, plan, windows, measure_after)
                plan.classes = classes_of(plan.workflow, runner.out_channels)  # exit 2: before any item runs
                logger.info("the network gives %d output channels; network loaded after %.2f s", runner.out_channels, process_age())
                done = run_items(
                    rest, lambda index: runner.run(client, index), window=items_in_flight(sum(client.nthreads().values())),
                    progress=progress, stop=stop,
                )  # fmt: skip
                for index, result in zip(rest, done):
                    results[index] = result
        state = "failed" if any(r is not None and r.status == "failed" for r in results) else "done"
        ran_through = True
    except Abandoned:
        state = "cancelled"
        raise JobCancelled(f"job {job.id} was cancelled") from None
    except KeyboardInterrupt:
        state = "cancelled"
        raise
    except ClientClosed as exc:
        state = "cancelled"
        counts.write(state, message=first_line(exc))
        raise
    except SchedulerLost as exc:
        state = "running"  # not the items' fault: the job is left as it was, and ``status`` finds it lost
        counts.write(state, message=first_line(exc))
        raise
    except BaseException as exc:
        if _lost(callers) and isinstance(exc, Exception):  # as it was prepared: ConnectionPool is closed, and the like
            state = "running"  # as SchedulerLost above
            lost = SchedulerLost(f"lost the Dask scheduler: {first_line(exc)}")
            counts.write(state, message=first_line(lost))
            raise lost from exc
        if _closed(callers) and isinstance(exc, Exception):  # what failed as the caller closed the client (a bare
            state = "cancelled"  # KeyError: 'workers' as the workers were prepared) is the closed client
            closed = ClientClosed("the Dask client was closed during the run: run it again to resume the job")
            counts.write(state, message=first_line(closed))
            raise closed from exc
        with contextlib.suppress(OSError):
            counts.write("failed", message=first_line(exc))
        raise
    finally:
        runner.release()
        _record_the_end(job, counts, state, skipped, ran_through)
    return JobResults([r for r in results if r is not None], job)


def _record_the_end(job: JobFolder, counts: _Progress, state: str, skipped: set[str], ran_through: bool) -> None:
    """Write the job's report, then its final state whatever became of the report.  Where the records do not fit
    (a full disk), a run that failed says why it failed, with a warning of this; one that ran through fails here
    (exit 1): it exited 0 with its state still "running" (``status``: lost) and no report.  Its state, where it
    fits, is then "failed" with the report's line, not "done"."""
    failures = []
    try:
        job.write_report(job.items(), skipped)
    except OSError as exc:
        failures.append(exc)
    fields = {} if state == "running" else {"finished": time.time()}
    if failures and ran_through:
        state, fields["message"] = "failed", first_line(failures[0])
    try:
        counts.write(state, report=None if failures else job.report, **fields)
    except OSError as exc:
        failures.append(exc)
    if failures and ran_through:
        raise failures[0]
    if failures:
        logger.warning("job %s: cannot write its report and status: %s", job.id, failures[0])


def _earlier(line: dict | None, finished: bool, options: Options) -> RunResult | None:
    """The result of an item that this run does not redo: ok before (``line``, its latest) and still
    ``finished`` (:func:`_finished`: skipped), or failed before (kept unless ``retry_failed``); None: run it."""
    if line is None:
        return None
    if line["status"] == "ok" and finished:
        return _from_line(line, "skipped")
    if line["status"] == "failed" and not options.retry_failed:
        return _from_line(line, "failed")
    return None


def _stamps(files) -> list[list]:
    """:func:`~tilemask.sources.input_stamp` of each file an item reads."""
    return [input_stamp(f) for f in files]


def _weights_stamp(files: tuple[str, ...]) -> list:
    """What a job's line records of the weights: their :func:`~tilemask.sources.input_stamp`, or a list of each
    checkpoint's for an ensemble (nnU-Net's folds: one fold retrained redoes every item)."""
    return input_stamp(files[0]) if len(files) == 1 else [input_stamp(f) for f in files]


def _same_stamps(now: list, recorded: list | None, files: list[str]) -> bool:
    """Whether ``files`` (an item's, or its weights) are as a line recorded them: its stamps, or a job's line written
    before an archive's members had stamps of their own (a zip's 2026-12-07, a tar's 2026-12-08), with the archive's
    time and size, where the archive is as it was (its members then are too: not each redone once; weights read
    from a zip were, every item of the job)."""
    if now == recorded:
        return True
    members = (["zip"], ["tar"])
    if recorded is None or not any(stamp[:1] in members for stamp in now):
        return False
    before = [stamp if stamp[:1] not in members else list(file_stamp(f)) for stamp, f in zip(now, files)]
    return before == recorded and [0, 0] not in before  # [0, 0]: a remote archive's member, which nothing told


def _regions(plan: WorkflowPlan, item: InputItem) -> str | None:
    """The regions file of an item's statistics (``stats.regions``), if any: edited, the item is redone."""
    stats = plan.workflow.stats_for(item.name)
    return stats.regions if stats else None


SHAPEFILE_SIDECARS = (".dbf", ".shx", ".prj", ".cpg")


def _regions_stamp(path: str) -> list[list]:
    """:func:`~tilemask.sources.input_stamp` of a regions file, and of a local shapefile's sidecars: a district
    renamed rewrites its ``.dbf`` alone. An archive's member (``/vsizip/districts.zip/districts.shp``): with those
    of the members beside it of its name (:func:`~tilemask.sources.archive.sidecars`), which are read with it."""
    stamps = [input_stamp(path)]
    if (member := split_member(path)) is not None:
        archive, name = member
        if (remote := network_object(archive)) is not None:  # by the archive's version: the members beside it too
            return [*stamps, [object_version(remote)]]
        try:
            beside = sidecars(archive, name) if os.path.isfile(archive) else []
        except InputError:  # unreadable now: not the archive stamped before
            return [*stamps, [None]]
        return stamps + [input_stamp(member_path(archive, other)) for other in beside]
    base, suffix = os.path.splitext(path)
    if suffix.lower() == ".shp" and not network_object(path):
        for ext in SHAPEFILE_SIDECARS:
            sidecar = base + (ext if suffix.islower() else ext.upper())
            if os.path.exists(sidecar):
                stamps.append(input_stamp(sidecar))
    return stamps


def _finished(lines: dict[str, dict], weights: tuple[tuple[str, ...], list], files: dict[str, list[str]],
              regions: dict[str, str | None], say_unversioned: bool = True) -> set[str]:  # fmt: skip
    """The names of the items whose latest line (``lines``) is ok (or failed only to send its outputs on), whose
    files (``files``, by name, as listed now: a list file or STAC Item may name other files under the same name),
    statistics' regions (``regions``, by name) and weights (``weights``: their files, and :func:`_weights_stamp` now)
    are as they were (a replaced input, edited regions or retrained weights, is redone; lines written before the files
    and stamps were recorded count as unchanged) and whose outputs are complete
    (:func:`~tilemask.jobs.outputs_complete`).
    Asked in parallel: objects on the network a request each, a GeoPackage's mark a few ms.  ``say_unversioned``:
    warn of an item redone because a file of it names no version (not under ``--overwrite``, which redoes every
    item)."""

    weights_files, weights_stamp = weights
    one = len(weights_files) == 1  # a line records one file's stamp, or a list of an ensemble's

    def finished(line: dict) -> bool:
        current = files[line["name"]]  # stamped, not the files as recorded: a URL signed then may have expired
        recorded = line.get("files")  # None: a line written before the files and stamps were recorded
        same_files = recorded is None or list(map(redacted, recorded)) == list(map(redacted, current))
        now = _stamps(current) if recorded is not None and same_files else None
        recorded_stamps = line.get("stamps")
        unchanged = same_files and (now is None or ([None] not in now and _same_stamps(now, recorded_stamps, current)))
        if say_unversioned and now is not None and [None] in now:  # redone run after run: said, or it looks a bug
            logger.warning("%s: done before, redone: %s names no version (no ETag or Last-Modified from its server, "
                           "or no answer), so it cannot be told from a replaced file; every run redoes it",
                           line["name"], redacted(current[now.index([None])]))  # fmt: skip
        region_file = regions[line["name"]]
        same_regions = region_file is None or "regions_stamp" not in line or (
            (now := region_stamps[region_file]) == line["regions_stamp"] and [None] not in now)
        recorded_weights = line.get("weights_stamp", weights_stamp)
        model_now, model_then = ([weights_stamp], [recorded_weights]) if one else (weights_stamp, recorded_weights)
        same_model = [None] not in model_now and _same_stamps(model_now, model_then, list(weights_files))
        return (unchanged and same_regions and same_model and own_labels(line)
                and outputs_complete(line["outputs"]))  # fmt: skip

    ok = {name: line for name, line in lines.items() if line["status"] == "ok" or line.get("undelivered")}
    shared = {regions[name] for name in ok} - {None}  # one file for every item, as a rule: stamped once
    region_stamps = {path: _regions_stamp(path) for path in shared}
    with ThreadPoolExecutor(max_workers=16) as pool:
        return {name for name, done in zip(ok, pool.map(finished, ok.values())) if done}


def _no_result(item: InputItem, seconds: float) -> RunResult:
    """What a failed attempt at ``item`` left: no outputs."""
    return RunResult(input=item.files[0], outputs=[], windows=None, tasks=0, seconds=seconds, status="failed",
                     name=item.name)  # fmt: skip


def _from_line(line: dict, status: str) -> RunResult:
    return RunResult(
        input=line["input"], outputs=line.get("outputs", []), windows=0, tasks=0, seconds=0.0,
        class_pixels=line.get("class_pixels") or {}, status=status, error=line.get("error"), name=line.get("name", ""),
    )  # fmt: skip


class _ItemRunner:
    """Plans, checks, runs and records one item at a time (called from the item threads of :func:`run_items`)."""

    def __init__(self, job, plan, options, begun, counts, progress, stop, weights, on_result=None, forget=None,
                 callers_client=False):  # fmt: skip
        self.job: JobFolder = job
        self.plan: WorkflowPlan = plan
        self.options: Options = options
        self.begun: set[str] = begun  # the names of the items this job began before
        self.counts: _Progress = counts
        self.progress: bool = progress
        self.stop: threading.Event = stop
        self.weights_stamp: list = weights  # the weights' input_stamp when this run began
        self.on_result: Callable[[RunResult], None] = on_result or (lambda result: None)  # each, as it finishes
        self.warn_skipped = on_result is None  # a skipped failure is the caller's to show (the command's line)
        self.out_channels = 0
        self.callers_client: bool = callers_client  # the run's client is the caller's, who may close it
        self.prepared: dict[int, tuple[InputPlan, OutputLock]] = {}  # prepared before the cluster started
        self.listings = FolderListings()  # each output folder listed once for leftovers, not once per item
        self.in_flight: dict[int, str] = {}  # item -> its first file, while it runs: a lost scheduler names them all
        self.undelivered: dict[str, dict] = {}  # name -> the failed line of an item whose outputs are only sent on
        self.forget: Callable[[], None] | None = forget  # --overwrite's, called before the run's first record
        self.forgetting = threading.Lock()

    def first_plannable(self, todo: list[int], results: list) -> int | None:
        """Prepare items in order until one is ready: that one fixes the channels the network is probed with.
        A failure here is before any work (exit 2), and the item stays pending (the next run checks it afresh);
        with ``on_error="skip"`` it is recorded as failed and the next tried."""
        for index in todo:
            try:
                self.prepared[index] = self._prepare(index)
                return index
            except TilemaskError as exc:
                if self.options.on_error == "abort":
                    raise
                item = self.plan.items[index]
                results[index] = self._skipped(self._failed(index, item, exc, _no_result(item, 0.0)))
        return None

    def tell(self, result: RunResult) -> None:
        """Hand ``result`` to the caller's ``on_result``, whose failure (a closed pipe under ``tilemask run | head``)
        is a warning, not the item's: the item is recorded already, and the run goes on."""
        try:
            self.on_result(result)
        except Exception as exc:  # noqa: BLE001 - whatever the caller's callback raises
            logger.warning("cannot pass on the result of %s: %s: %s", result.input, type(exc).__name__, exc)

    def record(self, line: dict, durable: bool = True) -> None:
        """Append ``line`` to the job's manifest, the manifest first forgotten if this is the first record of a run
        with ``--overwrite``."""
        with self.forgetting:
            if self.forget is not None:
                self.forget()
                self.forget = None
        self.job.record(line, durable=durable)

    def release(self) -> None:
        """Release what was prepared and never run (the run failed before it)."""
        for _, lock in self.prepared.values():
            lock.release()
        self.prepared.clear()

    def _prepare(self, index: int) -> tuple[InputPlan, OutputLock]:
        """Plan one item, take its outputs' locks and check its outputs with them held; the folders both make are
        noted in the plan (``plan.made``: a run refused before any work removes them)."""
        planned = self.plan.plan_input(self.plan.items[index])
        keep = None if self.options.overwrite else self.job.id  # what this job staged before is resumed
        files = self.plan.output_files(planned)
        lock = OutputLock(files, keep=keep, listings=self.listings, made=self.plan.made).acquire()
        try:
            self.plan.check_item_outputs(planned, self.options.overwrite or self.plan.items[index].name in self.begun)
        except BaseException:
            lock.release()
            raise
        return planned, lock

    def run(self, client: Client, index: int) -> RunResult:
        item = self.plan.items[index]
        start = time.perf_counter()
        stamps = _stamps(item.files)  # as the run reads them: changed later, the next run redoes the item
        regions = _regions(self.plan, item)
        regions_stamp = {"regions_stamp": _regions_stamp(regions)} if regions else {}
        self.in_flight[index] = item.files[0]
        try:
            planned, lock = self.prepared.pop(index, None) or self._prepare(index)
            try:
                started = {"item": index, "name": item.name, "input": planned.input, "status": "started", "time": time.time()}
                self.record(started, durable=False)  # lost only with the machine: its outputs then need --overwrite
                self.begun.add(item.name)
                item_job = replace(self.plan.job(planned, self.out_channels), stamps=[*stamps, self.weights_stamp])
                earlier = self.undelivered.get(item.name)
                if earlier is None:
                    result = run_job(client, item_job, self.plan, self.progress)  # resumed chunks need the stamps
                    result = replace(result, name=item.name)
                else:  # its outputs, to be sent on: not the failure that left them
                    result = replace(_from_line(earlier, "ok"), error=None)
                stamped = {"files": list(item.files), "stamps": stamps, "weights_stamp": self.weights_stamp,
                           "labels_stamp": labels_stamp(result.outputs), **regions_stamp}  # fmt: skip
                deliver(client, item_job.sink, self.progress)
            finally:
                lock.release()
        except Undelivered as exc:  # in place, not sent on: recorded failed with its outputs, for a retry to send
            del self.in_flight[index]
            undelivered = replace(result, windows=None, seconds=time.perf_counter() - start)  # None: failed in this run
            failed = self._failed(index, item, exc.error, undelivered, {**stamped, "undelivered": True})
            if exc.stop is not None:  # the run was stopped meanwhile: the stop goes on
                raise exc.stop from None
            return self._abort_or_skip(exc.error, failed)
        except Abandoned:
            raise
        except Exception as exc:
            if self.callers_client and _closed(client):  # the caller closed it: no lost scheduler, no failed item
                raise ClientClosed(f"the Dask client was closed while running {self._running()}: run it again to "
                                   "resume the job") from exc  # fmt: skip
            if client.status != "running":
                raise SchedulerLost(f"lost the Dask scheduler while running {self._running()}") from exc
            if isinstance(exc, NoWorkers):  # not the item's fault either: left as started for the next run
                raise NoWorkers(f"{first_line(exc)} while running {self._running()}") from exc
            del self.in_flight[index]  # a lost scheduler's message names the items still in flight, even after it
            failed = self._failed(index, item, exc, _no_result(item, time.perf_counter() - start))
            return self._abort_or_skip(exc, failed)
        del self.in_flight[index]
        self.record(_line(index, item.name, result) | stamped)
        self.counts.add("ok")
        self.tell(result)
        return result

    def _running(self) -> str:
        """The inputs in flight, in item order: each is redone when the job runs again."""
        files = [file for _, file in sorted(self.in_flight.items())]
        return files[0] if len(files) == 1 else f"{len(files)} inputs ({', '.join(files)})"

    def _abort_or_skip(self, exc: Exception, failed: RunResult) -> RunResult:
        """A failed item: raised again with ``on_error="abort"``, else warned of and its result returned."""
        if self.options.on_error == "abort":
            if isinstance(exc, TilemaskError):
                exc.exit_status = 1  # found while running: a run failure, whatever its kind
            raise exc
        return self._skipped(failed)

    def _skipped(self, failed: RunResult) -> RunResult:
        """A failure ``on_error="skip"`` goes past: told to the caller, else warned of."""
        if self.warn_skipped:
            logger.warning("%s: failed, skipped: %s", failed.named, failed.error)
        self.tell(failed)
        return failed

    def _failed(self, index: int, item: InputItem, exc: BaseException, result: RunResult, kept=None) -> RunResult:
        """Record ``result`` (what the attempt left: nothing, or its outputs in place) as failed with ``exc``;
        ``kept``: more of its line (the stamps of outputs a retry sends on alone)."""
        error = f"{type(exc).__name__}: {first_line(exc)}" if not isinstance(exc, TilemaskError) else first_line(exc)
        error = redacted(error)  # as the terminal shows it: the report and the manifest are shared too
        result = replace(result, status="failed", error=error)
        try:
            self.record(_line(index, item.name, result) | (kept or {}))
            self.counts.add("failed")
        except OSError as record_error:  # the item's own error is the one to report
            logger.warning("job %s: cannot record the failure of %s: %s", self.job.id, item.files[0], record_error)
        return result


def _line(index: int, name: str, result: RunResult) -> dict:
    return {
        "item": index, "name": name, "input": result.input, "status": result.status, "outputs": result.outputs,
        "error": result.error, "seconds": round(result.seconds, 3), "windows": result.windows,
        "class_pixels": result.class_pixels, "time": time.time(),
    }  # fmt: skip


@contextlib.contextmanager
def _watch_cancel(job: JobFolder, stop: threading.Event, every: float = 0.5):
    """Set ``stop`` once ``tilemask cancel`` has asked the job to stop."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            if job.cancel_requested():
                logger.info("job %s: cancel requested", job.id)  # a foreground run's one line is its JobCancelled
                stop.set()
                say_what_stopping_waits_for()
                return

    thread = threading.Thread(target=watch, name="tilemask-cancel", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class JobResults(list):
    """A job's results, one per input in order (``status`` ok, skipped or failed), and its folder."""

    def __init__(self, results: list[RunResult], job: JobFolder):
        super().__init__(results)
        self.job = job

    def failures(self) -> str | None:
        """The last line of a run with failed items: how many, and where the report is; None when none failed."""
        failed = sum(r.status == "failed" for r in self)
        return f"{failed} of {len(self)} items failed; report: {self.job.report}" if failed else None

