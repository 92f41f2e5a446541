"""``tilemask submit``, ``status``, ``cancel`` and ``jobs``: jobs that run on a cluster without the terminal.

``submit`` checks the workflow, its first input and that input's outputs (exit 2 if invalid), creates
the job's folder, starts :func:`tilemask.driver.drive` on the cluster as a
task nobody waits for (``fire_and_forget``), prints the job id alone on the
last line of stdout and exits.  The job folder is the durable record; the
scheduler holds the live state (``lost``: it no longer knows the job).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import sys
import time
import uuid
from pathlib import Path

import click

from .cli import job_options, main
from .command import TilemaskCommand, errors_only, first_line, scheduler_address


@main.command(cls=TilemaskCommand, short_help="Start a workflow as a detached job; print its id.")
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--scheduler", metavar="ADDRESS", callback=scheduler_address,
              help="The Dask scheduler the job runs on: its address, or its scheduler file.")
@click.option("--cluster", "cluster_kind", type=click.Choice(["slurm"]),
              help="Instead of --scheduler: the job's driver as a SLURM job, which starts its workers as SLURM jobs "
                   "(dask-jobqueue; Dask config jobqueue.slurm and tilemask.slurm-driver).")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), help="With --cluster slurm: the worker jobs (default 1).")
@job_options
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def submit(workflow, scheduler, cluster_kind, workers, overrides, overwrite, on_error, retry_failed, job_dir,
           debug) -> None:  # fmt: skip
    """Start WORKFLOW.yaml as a job on a Dask cluster and print its id; the job goes on after this exits."""
    from .cluster import check_cluster_options
    from .driver import Options, prepare
    from .errors import UsageError, option
    from .outputs import OutputLock
    from .workflow import Workflow

    if scheduler is None and cluster_kind is None:
        raise UsageError(f"give {option('scheduler')} ADDRESS (a Dask scheduler) or {option('cluster')} slurm")
    if workers is not None and cluster_kind is None:
        raise UsageError(f"{option('workers')} applies to {option('cluster')} slurm, not to a scheduler given by "
                         f"{option('scheduler')}: leave it out")  # fmt: skip
    check_cluster_options(scheduler, cluster_kind or "local")
    wf = Workflow.from_yaml(workflow, overrides)
    plan, job, record = prepare(wf, Options(on_error, retry_failed, overwrite), job_dir, str(Path(workflow).resolve()))
    # the first input opens and fits the workflow, and its outputs may be written (exit 2 if not, as tilemask run
    # refuses them: one there that is not the job's, an output folder not writable); under skip the driver records
    # its failure and goes on, as tilemask run does
    new = not job.exists()
    try:
        if not new:  # first: its own outputs read as "being written by another tilemask run" (a review)
            _refuse_if_active(job)
        if plan.items and on_error == "abort":
            first = plan.plan_input(plan.items[0])
            keep = None if overwrite else job.id  # what this job staged before is resumed, as tilemask run keeps it
            # with their locks held, as tilemask run checks them: outputs another run is writing are refused (a
            # second job was made, then failed on its driver's lock)
            with OutputLock(plan.output_files(first), keep=keep, made=plan.made):
                plan.check_item_outputs(first, overwrite or plan.items[0].name in job.manifest().started())
        if cluster_kind == "slurm":
            _submit_slurm(job, record, workers, overwrite, new)
        else:
            _submit(plan, job, record, scheduler, overwrite, new)
    except BaseException:
        if new and not job.exists():  # refused, or interrupted, before it created the job: it leaves nothing
            plan.remove_made()  # the outputs' folders its check made (in plan.made), if still empty
        raise
    if not errors_only():
        click.echo(f"submitted; follow it with: tilemask status {job.id}", err=True)
    click.echo(job.id)


def _refuse_if_active(job) -> None:
    from .jobs import JobError, live_state

    state = live_state(job)
    status = job.status()
    if state in ("queued", "running") and (status.get("driver") or status.get("slurm_job")):
        raise JobError(f"job {job.id} is {state} already; see tilemask status {job.id}")


def _record(job, record, new: bool) -> None:
    from .errors import TilemaskError
    from .jobs import JobError

    try:
        record()
    except TilemaskError:  # a first submit that cannot write it (a full disk) leaves no job, as run's
        if new:
            with contextlib.suppress(OSError, JobError):
                job.discard()
        raise


def _submit_slurm(job, record, workers: int | None, overwrite: bool, new: bool) -> None:
    """Create the job (``record``) and ``sbatch`` its driver job (:mod:`tilemask.slurm`): submitted held, its
    SLURM job id recorded in ``status.json``, then released, so that no driver runs a job whose record does not
    name it. The driver job's settings are tried first (``sbatch --test-only``): refused, no job is created."""
    from . import slurm
    from .interrupts import shielded
    from .storage import is_remote

    script = slurm.driver_script(job.location, workers, local=not is_remote(job.location))
    slurm.check_driver(script)
    slurm_job = None
    try:
        with job:  # no process runs the job here (its driver, or a tilemask run, would hold this lock)
            _refuse_if_active(job)
            _record(job, record, new)
            if overwrite:
                job.reset()  # once: the driver does not (it resumes, as a driver job requeued would)
            with shielded():  # Ctrl-C meanwhile: the driver job, once submitted, is known, and taken back below
                slurm_job = slurm.submit_held(script)
                job.set_status("queued", scheduler=None, driver=None, host=None, pid=None, slurm_job=slurm_job,
                               submitted=time.time(), finished=None, message=None)  # fmt: skip
        slurm.release(slurm_job)
    except BaseException:
        if slurm_job is not None:  # submitted: taken back, and the job says why it will not run
            with shielded(), contextlib.suppress(Exception):
                slurm.cancel(slurm_job)
                job.set_status("cancelled", message=f"cancelled: its submit failed or was interrupted (SLURM job "
                                                    f"{slurm_job} cancelled)")  # fmt: skip
        raise


def _submit(plan, job, record, scheduler: str, overwrite: bool, new: bool) -> None:
    """Create the job (``record``) and hand its driver to the scheduler."""
    from distributed import fire_and_forget

    from .cluster import check_workers, cluster_client
    from .driver import drive
    from .interrupts import shielded

    key = f"tilemask-job-{job.id}-{uuid.uuid4().hex[:8]}"
    with cluster_client(scheduler) as client:
        check_workers(client)  # those there now: a driver no worker can unpickle would wait forever
        with job:  # no process runs the job here (its driver, or a tilemask run, would hold this lock)
            _refuse_if_active(job)
            _record(job, record, new)
            if overwrite:
                job.reset()  # once: the driver does not, as Dask may start it again (its worker died)
            job.set_status("queued", scheduler=scheduler, driver=key, slurm_job=None, submitted=time.time(),
                           message=None)  # fmt: skip
        future = None
        try:
            # Ctrl-C during the handover waits for its end, then takes the driver back: an interrupted submit
            # (exit 130) leaves no job running
            with shielded():
                future = client.submit(drive, job.location, key=key, pure=False, retries=0)
                fire_and_forget(future)
                _wait_until_known(client, key)
        except KeyboardInterrupt:
            with shielded():
                _withdraw(job, client, future)
            raise


def _withdraw(job, client, future) -> None:
    """Undo a submit interrupted after it created the job: its driver cancelled on the scheduler and, should a
    worker have started it already, asked to stop as ``tilemask cancel`` asks."""
    if future is not None:
        job.request_cancel()
        client.cancel([future], force=True)
    job.set_status("cancelled", message="cancelled: its submit was interrupted")


def _wait_until_known(client, key: str, timeout: float = 30.0) -> None:
    """The scheduler holds the driver before this process may exit."""
    def has(key: str, dask_scheduler=None) -> bool:  # sent by value, nested (cluster.check_scheduler)
        return key in dask_scheduler.tasks

    deadline = time.monotonic() + timeout
    while not client.run_on_scheduler(has, key=key):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the scheduler did not take the job's driver {key} within {timeout:g} s")
        time.sleep(0.05)


@main.command(cls=TilemaskCommand, short_help="The state of a job and its items.")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def status(job, as_json, debug) -> None:
    """The state of JOB (an id or a job folder) and its items: queued, running, done, failed, cancelled, lost."""
    from .jobs import find

    folder = find(job)
    summary = _summary(folder)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    counts = summary["counts"]
    if counts["items"] is None:  # its record is incomplete: the inputs were never listed
        click.echo(f"job {folder.id}: {summary['state']}, its inputs not listed")
    else:
        click.echo(f"job {folder.id}: {summary['state']}, {counts['ok']} of {counts['items']} items ok, "
                   f"{counts['failed']} failed, {counts['pending']} pending")
    if summary.get("message"):
        click.echo(f"  {summary['message']}")
    if summary["report"]:
        click.echo(f"  report: {summary['report']}")


def _pending_reason(slurm_job: str, asked: dict | None = None) -> str:
    """squeue's reason for a pending driver job, and what to do where SLURM will not start it as submitted;
    ``asked``: what :func:`tilemask.slurm.job_states` said of it already (``tilemask jobs``), if it was asked."""
    from . import slurm

    if asked and ("slurm", slurm_job) in asked:
        reason = asked.get(("slurm-reason", slurm_job))
    else:
        reason = slurm.pending_reasons([slurm_job]).get(slurm_job)
    if reason in (None, "None"):  # squeue's "None": none given yet (a job just released), not one to print
        return ""
    if slurm.never_starts(reason):
        return (f" and SLURM will not start it as submitted ({reason}): cancel the job, set the Dask config "
                "tilemask.slurm-driver (or jobqueue.slurm) within the partition's limits, and submit it again")
    return f" ({reason})"


def _summary(folder, asked: dict | None = None) -> dict:
    from .jobs import HELD, UNANSWERED, live_driver

    recorded = folder.status()
    state, task = live_driver(folder, recorded, asked=asked)
    if task == UNANSWERED:
        recorded = {**recorded, "message": f"its scheduler, {recorded['scheduler']}, took the connection and did not "
                                           "answer (stalled?): its driver may still run, and stops at a cancel "
                                           "once it sees it"}  # fmt: skip
    elif state in ("queued", "running") and task in HELD:  # not started yet, or held again: its worker is gone
        waiting = "its driver waits for a Dask worker" + (" (the one it ran on is gone)" if state == "running" else "")
        state, recorded = "queued", {**recorded, "message": waiting}
    elif recorded.get("slurm_job") and task is not None:
        where = f"its driver job, SLURM job {recorded['slurm_job']},"
        if state == "queued":
            recorded = {**recorded, "message": f"{where} is pending{_pending_reason(recorded['slurm_job'], asked)}"}
        elif state == "lost":
            log = folder.path / f"driver-{recorded['slurm_job']}.log"
            said = f"; its output: {log}" if log.is_file() else ""
            recorded = {**recorded, "message": f"{where} ended ({task.lower()}) without recording how the job "
                                               f"ended{said}"}  # fmt: skip
    summary = {**recorded, "job": folder.id, "folder": folder.location, "state": state}
    missing = folder.incomplete()
    if missing:  # a run stopped (killed, a full disk) after job.json, before it listed the inputs: 0 of 0 items
        # ok was no count; the job's next run completes the record (a run that writes it now holds its lock)
        source = folder.info().get("workflow_file")
        again = f"tilemask run {source}" if isinstance(source, str) else "run its workflow again"
        why = ("its run is writing its record" if state in ("queued", "running") else
               f"its record is incomplete (no {', '.join(missing)}): the run that created it stopped before it "
               f"listed the inputs; {again} (or submit it) to complete the record and run the job")  # fmt: skip
        counts = {"items": None, "ok": 0, "failed": 0, "pending": None}
        return {**summary, "counts": counts, "incomplete": missing, "message": why, "report": None}
    return {
        **summary,
        "counts": folder.counts({item["name"] for item in folder.items()}),
        "report": folder.report if folder.report_path.exists() else None,
    }


def _seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """``--wait``: -1 or nan wrote the cancel request, then said "still running after -1 s", exit 1, at once."""
    if not value >= 0:
        raise click.BadParameter(f"{value:g} is not a number of seconds (0 or more)")
    return value


@main.command(cls=TilemaskCommand, short_help="Stop a job; its finished items stay done.")
@click.argument("job")
@click.option("--wait", "wait_s", type=float, default=60.0, show_default=True, callback=_seconds,
              help="Seconds to wait for the job to stop.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def cancel(job, wait_s, debug) -> None:
    """Stop JOB: the items in flight are abandoned and clean up; finished items stay done."""
    from .jobs import ACTIVE, HELD, find, live_driver, live_state

    folder = find(job)
    if folder.status().get("state", "queued") in ACTIVE:  # asked first: a driver that runs stops within half a
        folder.request_cancel()  # second, even where its scheduler or SLURM does not answer here (a minute's wait)
    state, task = live_driver(folder)
    if state not in ACTIVE:
        if state == "lost":
            _cancel_lost(folder)
        click.echo(f"job {folder.id}: {live_state(folder)}")
        return
    if folder.status().get("slurm_job"):
        _cancel_slurm(folder, wait_s)
        return
    # a driver the scheduler holds but no worker runs (queued; or started again after its worker died, waiting
    # for one) would never see the request: taken back at once. Only then: a running driver's reaction to the
    # request (cancelling its items' tasks) can fail the handshake of a Client that connects meanwhile
    if task in HELD and _take_back_driver(folder.status()):
        message = "before its driver started" if state == "queued" else "while its driver waited for a worker"
        folder.set_status("cancelled", message=f"cancelled {message}")
        click.echo(f"job {folder.id}: cancelled")
        return
    deadline = time.monotonic() + wait_s
    while live_state(folder) in ACTIVE and time.monotonic() < deadline:
        time.sleep(0.25)
    if not folder.exists():  # a first run whose scheduler could not be reached leaves no job
        click.echo(f"job {folder.id}: ended before any input began; no job is left")
        return
    state = live_state(folder)
    if state == "queued" and folder.status().get("driver"):
        _take_back_driver(folder.status(), unless_started=False)  # a driver the scheduler has not started
        folder.set_status("cancelled", message="cancelled before its driver started")
        state = "cancelled"
    elif state in ACTIVE:
        click.echo(f"job {folder.id}: cancel requested; still {state} after {wait_s:g} s")
        sys.exit(1)
    elif state == "lost":
        _cancel_lost(folder)
        state = "cancelled"
    click.echo(f"job {folder.id}: {state}")


def _cancel_lost(folder) -> None:
    """A job whose driver this host finds gone is recorded cancelled; its request was written all the same: a
    scheduler that does not answer (stalled, or not reachable from here) reads as gone, and its driver, still
    running, ran on and published its outputs (a review)."""
    folder.set_status("cancelled", message="cancelled after it was lost")


def _cancel_slurm(folder, wait_s: float) -> None:
    """``scancel`` the job's driver job: a pending one leaves the queue, a running one gets SIGTERM and stops as
    Ctrl-C stops a run (its worker jobs cancelled as its SLURM cluster closes); a job whose driver ended without
    recording it (pending, or killed) is recorded cancelled."""
    from . import slurm
    from .errors import RunError
    from .jobs import ACTIVE, live_state

    slurm_job = folder.status()["slurm_job"]
    try:
        slurm.cancel(slurm_job)
        unsent = None
    except RunError as exc:  # SLURM not reachable from here: a running driver still stops at the request (a review)
        unsent = exc
    deadline = time.monotonic() + wait_s
    while (state := live_state(folder)) in ACTIVE and time.monotonic() < deadline:
        time.sleep(0.25)
    if state in ACTIVE:
        if unsent is not None:  # a pending driver job stays in the queue: scancel it where SLURM answers
            click.echo(f"tilemask: warning: {first_line(unsent)}", err=True)
        click.echo(f"job {folder.id}: cancel requested; still {state} after {wait_s:g} s")
        sys.exit(1)
    if state == "lost":
        folder.set_status("cancelled", message=f"cancelled: its driver job, SLURM job {slurm_job}, was cancelled")
        state = "cancelled"
    click.echo(f"job {folder.id}: {state}")


def _take_back_driver(status: dict, unless_started: bool = True) -> bool:
    """Cancel a queued job's driver task; with ``unless_started``, only if no worker has started it (asked of the
    scheduler itself: one that has started is left to see the cancel request and stop). Whether it was."""
    from distributed import Future

    from .cluster import scheduler_client
    from .errors import TilemaskError
    from .jobs import HELD

    if not (status.get("scheduler") and status.get("driver")):
        return False

    def not_started(dask_scheduler, key: str) -> bool:
        task = dask_scheduler.tasks.get(key)
        return task is not None and task.state in HELD

    try:
        with scheduler_client(status["scheduler"], 5, set_as_default=False) as client:
            if unless_started and not client.run_on_scheduler(not_started, key=status["driver"]):
                return False
            client.cancel([Future(status["driver"], client)], force=True)
            return True
    except (OSError, TilemaskError):  # gone, or no scheduler answers there any more
        return False


@main.command(cls=TilemaskCommand, hidden=True)
@click.argument("folder")
@click.option("--cluster", "cluster_kind", type=click.Choice(["slurm"]), required=True)
@click.option("--workers", type=click.IntRange(min=1))
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def drive(folder, cluster_kind, workers, debug) -> None:
    """Run the job in FOLDER: the driver job that tilemask submit --cluster slurm hands to sbatch."""
    from .driver import drive_folder

    failed = drive_folder(folder, cluster_kind, workers)
    if failed:
        click.echo(f"tilemask: {failed} items failed; see tilemask status {folder}", err=True)
        sys.exit(1)


@main.command(cls=TilemaskCommand, short_help="List the jobs this user has run or submitted.")
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def jobs(as_json, debug) -> None:
    """The jobs this user has run or submitted, newest last: id, state, items ok / failed / total, folder."""
    from concurrent.futures import ThreadPoolExecutor

    from .jobs import ACTIVE, JobError, driver_states, listed

    folders = list(listed())
    drivers: dict[str, list[str]] = {}  # each queued or running job's driver, by the scheduler that holds it, or
    for folder in folders:  # by "slurm": a driver job of submit --cluster slurm
        with contextlib.suppress(JobError, OSError):  # a damaged record: named below, as its summary fails
            recorded = folder.status()
            if recorded.get("state", "queued") not in ACTIVE:
                continue
            if recorded.get("slurm_job"):
                drivers.setdefault("slurm", []).append(recorded["slurm_job"])
            elif recorded.get("driver") and recorded.get("scheduler"):
                drivers.setdefault(recorded["scheduler"], []).append(recorded["driver"])

    def ask(address: str) -> dict:
        if address == "slurm":  # one squeue for all: each took 18 s where SLURM's controller did not answer
            from . import slurm

            reasons: dict[str, str] = {}  # and why those pending wait, which status says
            states = slurm.job_states(drivers[address], reasons)
            return {**{("slurm", job): state for job, state in states.items()},
                    **{("slurm-reason", job): reason for job, reason in reasons.items()}}  # fmt: skip
        return {(address, key): state for key, state in driver_states(address, drivers[address], 5.0).items()}

    def summary(folder, asked: dict) -> dict | str:
        try:
            return _summary(folder, asked)
        except (JobError, OSError) as exc:  # one damaged record does not hide the other jobs
            return f"tilemask: warning: {first_line(exc)}; left out of the list"

    # each scheduler (and SLURM) is asked once whether it still holds its jobs' drivers, the schedulers at once: one
    # gone waits out the connect timeout (5 s), and was asked once per job, 16 at a time (48 jobs: 15 s)
    with ThreadPoolExecutor(max_workers=16) as pool:  # in this command's context: its errors in its words
        asked: dict = {}
        for answer in [pool.submit(contextvars.copy_context().run, ask, address) for address in drivers]:
            asked.update(answer.result())
        summaries = [pool.submit(contextvars.copy_context().run, summary, folder, asked) for folder in folders]
        answers = [answer.result() for answer in summaries]
    for warning in (a for a in answers if isinstance(a, str)):
        click.echo(warning, err=True)
    summaries = [a for a in answers if isinstance(a, dict)]
    summaries.sort(key=lambda s: s.get("updated") or "")
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
        return
    counts = []
    for s in summaries:
        c = s["counts"]
        total = "?" if c["items"] is None else c["items"]  # its record is incomplete: the inputs were never listed
        counts.append(f"{c['ok']}/{c['failed']}/{total}")
    width = max(map(len, counts), default=0)  # the folders in one column, whatever the counts' widths
    for s, count in zip(summaries, counts):
        click.echo(f"{s['job']}  {s['state']:<9}  {count:<{width}}  {s['folder']}")
