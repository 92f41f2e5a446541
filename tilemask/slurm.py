"""``tilemask submit --cluster slurm``: the job's driver as a SLURM job of its own.

The driver job runs ``tilemask drive FOLDER --cluster slurm`` (the job folder's run, as ``tilemask run`` runs
it), whose dask-jobqueue ``SLURMCluster`` submits the worker jobs; it outlives the submitting process, and its
worker jobs are cancelled when it ends (a ``scancel`` of it is a SIGTERM: it stops as Ctrl-C stops a run).
Its ``sbatch`` options come from the Dask config ``tilemask.slurm-driver``, each unset one from
``jobqueue.slurm`` where it has one (see ``cluster/slurm.yaml``).  ``status.json`` records its SLURM job id
(``slurm_job``), which ``tilemask status`` asks ``squeue`` about and ``tilemask cancel`` hands to ``scancel``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile

import dask
from dask.utils import parse_bytes

from .errors import RunError, UsageError

DRIVER_DEFAULTS = {"cores": 1, "memory": "4GB", "walltime": None, "queue": None, "account": None,
                   "job-extra-directives": []}  # fmt: skip
"""``tilemask.slurm-driver``: what the driver job asks of SLURM; ``walltime``, ``queue`` and ``account`` unset
are the worker jobs' (``jobqueue.slurm``): the driver must outlast its workers."""

PENDING = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
ALIVE = PENDING | {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
"""SLURM job states in which the driver job may still run (squeue's ``%T``); any other (COMPLETED, CANCELLED,
FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, ...), or a job SLURM no longer knows, has ended."""

GONE = "GONE"
""":func:`job_state` of a job SLURM no longer lists."""


def driver_setting(key: str):
    """The driver job's ``key``: ``tilemask.slurm-driver.KEY``, else the worker jobs' for walltime, queue and
    account, else :data:`DRIVER_DEFAULTS`."""
    value = dask.config.get(f"tilemask.slurm-driver.{key}", None)
    if value is None and key in ("walltime", "queue", "account"):
        value = dask.config.get(f"jobqueue.slurm.{key}", None)
    return DRIVER_DEFAULTS[key] if value is None else value


def driver_script(folder: str, workers: int | None, local: bool) -> str:
    """The batch script of the driver job of the job in ``folder`` (``local``: a folder on a file system, where
    it writes its output as ``driver-<SLURM job id>.log``; else jobqueue.slurm's ``log-directory``, or sbatch's
    default)."""
    cores, memory = driver_setting("cores"), driver_setting("memory")
    extra = driver_setting("job-extra-directives")
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise UsageError(f"--cluster slurm: tilemask.slurm-driver.cores is {cores!r}, not a whole number of at least "
                         "1: set it in the Dask config (see cluster/slurm.yaml)")  # fmt: skip
    try:
        mem_mb = -(-parse_bytes(memory) // 2**20)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--cluster slurm: tilemask.slurm-driver.memory is {memory!r}, not an amount of memory "
                         f"({exc}): set it in the Dask config (see cluster/slurm.yaml)") from None  # fmt: skip
    if not isinstance(extra, list) or not all(isinstance(line, str) for line in extra):
        raise UsageError(f"--cluster slurm: tilemask.slurm-driver.job-extra-directives is {extra!r}, not a list of "
                         "sbatch options: set it in the Dask config (see cluster/slurm.yaml)")  # fmt: skip
    lines = ["#!/usr/bin/env bash", f"#SBATCH -J tilemask-{os.path.basename(folder.rstrip('/'))}", "#SBATCH -n 1",
             f"#SBATCH --cpus-per-task={cores}", f"#SBATCH --mem={mem_mb}M"]  # fmt: skip
    logs = dask.config.get("jobqueue.slurm.log-directory", None)
    if local:  # quoted as a shell word: sbatch reads a directive's words so, and cut a path at its first space
        lines.append(f"#SBATCH -o {shlex.quote(f'{folder}/driver-%j.log')}")
    elif logs:
        lines.append(f"#SBATCH -o {shlex.quote(f'{logs}/tilemask-driver-%j.log')}")
    for option, key in (("-t", "walltime"), ("-p", "queue"), ("-A", "account")):
        if driver_setting(key) is not None:
            lines.append(f"#SBATCH {option} {driver_setting(key)}")
    lines += [f"#SBATCH {line}" for line in extra]
    lines += list(dask.config.get("jobqueue.slurm.job-script-prologue", None) or [])
    python = dask.config.get("jobqueue.slurm.python", None) or sys.executable
    command = [python, "-m", "tilemask", "drive", folder, "--cluster", "slurm"]
    if workers:
        command += ["--workers", str(workers)]
    lines.append("exec " + " ".join(shlex.quote(str(word)) for word in command))  # the SIGTERM of scancel reaches it
    return "\n".join(lines) + "\n"


def _sbatch(script: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="tilemask-driver-") as file:
        file.write(script)
        file.flush()
        try:
            return subprocess.run(["sbatch", *args, file.name], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RunError(f"--cluster slurm: cannot run sbatch: {exc}") from None


def _refused(done: subprocess.CompletedProcess) -> None:
    from .cluster import _refused_as_configured

    said = [line.strip().removeprefix("sbatch: ") for line in done.stderr.splitlines() if line.strip()]
    reason = "; ".join(said[-2:]) or f"exit {done.returncode}"
    if _refused_as_configured(said):
        raise UsageError(f"--cluster slurm: sbatch refused the driver job: {reason}: set the Dask config "
                         "tilemask.slurm-driver or jobqueue.slurm (see cluster/slurm.yaml)")  # fmt: skip
    raise RunError(f"--cluster slurm: sbatch refused the driver job: {reason}")


def check_driver(script: str) -> None:
    """``sbatch --test-only`` of the driver job, before the job is created: a setting SLURM refuses is exit 2,
    a SLURM that cannot be reached exit 1, both one line."""
    done = _sbatch(script, "--test-only")
    if done.returncode != 0:
        _refused(done)


def submit_held(script: str) -> str:
    """Submit the driver job held (``--hold``: it starts once :func:`release` lets it, after its id is recorded);
    its SLURM job id."""
    done = _sbatch(script, "--hold", "--parsable")
    if done.returncode != 0:
        _refused(done)
    job_id = done.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise RunError(f"--cluster slurm: sbatch gave no job id: {done.stdout.strip()!r}")
    return job_id


def release(job_id: str) -> None:
    done = _run(["scontrol", "release", job_id])
    if done.returncode != 0:
        raise RunError(f"--cluster slurm: scontrol release {job_id} failed: {_said(done)}")


def cancel(job_id: str) -> None:
    """``scancel`` the job (a running one gets SIGTERM, then SIGKILL after SLURM's KillWait); one already gone is
    no error."""
    done = _run(["scancel", job_id])
    if done.returncode != 0 and "invalid job id" not in done.stderr.lower():
        raise RunError(f"scancel {job_id} failed: {_said(done)}")


def job_state(job_id: str) -> str | None:
    """The SLURM state of ``job_id`` (squeue's ``%T``: PENDING, RUNNING, COMPLETED, ...), :data:`GONE` when SLURM
    no longer lists it, ``None`` when SLURM cannot be asked from here."""
    return job_states([job_id])[job_id]


def job_states(job_ids: list[str], reasons: dict[str, str] | None = None) -> dict[str, str | None]:
    """:func:`job_state` of each of ``job_ids``, from one ``squeue``: ``tilemask jobs`` ran one per job, and where
    the controller does not answer each took 18 s here. squeue lists the jobs it knows of several; one job it does
    not know, asked alone, is its error "Invalid job id specified". ``reasons`` gets the pending jobs' reasons, as
    :func:`pending_reasons` gives them. Jobs are named by ``%A``, the id a job records (``SLURM_JOB_ID``): ``%i``
    names an array task ``12_4``."""
    if not job_ids:
        return {}
    try:
        done = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%A %T %r"], timeout=30)
    except RunError:
        return dict.fromkeys(job_ids)
    if done.returncode != 0:
        if "invalid job id" in done.stderr.lower() and len(job_ids) > 1:  # an id squeue cannot read (an edited
            # record: "Invalid job id: x7") fails the question for all of them: each is asked alone
            return {job: job_states([job], reasons)[job] for job in job_ids}
        return dict.fromkeys(job_ids, GONE if "invalid job id" in done.stderr.lower() else None)
    lines = [fields for line in done.stdout.splitlines() if len(fields := line.split(None, 2)) >= 2]
    if reasons is not None:
        reasons.update((fields[0], fields[2]) for fields in lines if len(fields) == 3 and fields[1] in PENDING)
    listed = {fields[0]: fields[1] for fields in lines}
    return {job: listed.get(job, GONE) for job in job_ids}


NEVER_STARTS = frozenset({"PartitionTimeLimit", "PartitionNodeLimit", "PartitionConfig", "BadConstraints",
                          "AccountNotAllowed", "QOSNotAllowed", "InvalidAccount", "InvalidQOS"})  # fmt: skip
"""squeue's reasons (``%r``) for a pending job that SLURM will not start as submitted (its settings over a limit of
the partition, such as a walltime over its MaxTime, or that none of its nodes meet); so are the per-job limits of
its QOS or association, ``QOSMax*PerJob*`` and ``AssocMax*PerJob*`` (:func:`never_starts`).  ``sbatch --test-only``
accepts them where the partitions do not enforce their limits at submission (``EnforcePartLimits=NO``)."""


def never_starts(reason: str) -> bool:
    return reason in NEVER_STARTS or (reason.startswith(("QOSMax", "AssocMax")) and "PerJob" in reason)


def pending_reasons(job_ids: list[str]) -> dict[str, str]:
    """squeue's reason (``%r``) for each of ``job_ids`` that SLURM holds pending; none when it cannot be asked."""
    reasons: dict[str, str] = {}
    job_states(job_ids, reasons)
    return reasons


def _run(command: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RunError(f"cannot run {command[0]}: {exc}") from None


def _said(done: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return "; ".join(lines[-2:]) or f"exit {done.returncode}"
