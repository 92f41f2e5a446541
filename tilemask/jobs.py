"""Jobs: every run has a folder that records what was planned and what finished (docs/DESIGN.md section 9).

``<output folder>/.tilemask/jobs/<job-id>/`` (or ``--job-dir``) holds:

* ``job.json``: the id, the workflow's folder (relative paths resolve against
  it), where the workflow came from, the options the job runs with;
* ``workflow.yaml``: the workflow, validated and complete (the defaults written out);
* ``items.jsonl``: the planned items, one a line (name, files, labels output);
* ``manifest.jsonl``: append-only, fsynced, one line per finished attempt of an
  item (``item``, ``name``, ``input``, ``status`` ok | failed, ``outputs``, ``error``,
  ``seconds``, ``windows``, ``class_pixels``), and a ``started`` line when an
  attempt begins, so a later attempt knows the item's outputs are this job's
  own; a truncated last line (a crash mid-write) is dropped on reload;
* ``status.json``: the state (queued | running | done | failed | cancelled),
  the item counts, who runs it (host, pid, scheduler, driver key, the SLURM job id of a driver job), rewritten
  atomically; ``lost`` is not written but found by :func:`live_state`;
* ``report.csv``: one row per item at the end of each run (ok, skipped: ok in
  an earlier run and not redone, failed, not run);
* ``cancel``: present when ``tilemask cancel`` asked the job to stop.

The job's id is a hash of the validated workflow and its folder, so running
the same workflow again finds the same folder and resumes.  A lock file held
by the process that drives the job keeps a second run of it out.  Each job
folder is also listed in ``$TILEMASK_HOME/jobs/`` (default
``~/.local/share/tilemask``) so that ``tilemask status ID`` and ``tilemask
jobs`` find it.

A job folder on object storage (``s3://``: the default for outputs there) is
worked on through a copy in local scratch (:class:`RemoteJobFolder`): read from
the store when opened, each file put back whole when it changes (the manifest
after every line), the lock held on the machine that runs the job.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import storage
from .errors import JobCancelled, JobError, OutputError, RunError, TilemaskError, option  # noqa: F401 - as before
from .formats import for_path, written_by_tilemask
from .outputs import describe_write_error, exists, make_folder, remove_made, why_unwritable

logger = logging.getLogger(__name__)

WRITTEN = ("queued", "running", "done", "failed", "cancelled")  # the states status.json records
ACTIVE = ("queued", "running")
# the fields of status.json that say who runs a job, and their types (None: not recorded)
STATUS_FIELDS = {"state": (str, type(None)), "host": (str, type(None)), "pid": (int, type(None)),
                 "scheduler": (str, type(None)), "driver": (str, type(None)),
                 "slurm_job": (str, type(None))}  # fmt: skip
# a driver task the scheduler holds but no worker runs: not started yet, or started again after its worker died
HELD = ("released", "waiting", "queued", "no-worker")


def _afresh() -> str:
    """What to do with a job whose record is damaged: its run with --overwrite starts it afresh (:meth:`reset`)."""
    return f" (a run with {option('overwrite', 'True')} starts the job afresh)"


ADDED_LATER = {"inference": {"slice_axis": None}, "output": {"seg_type": "labelmap"}}
"""Workflow keys added after jobs were made, with their defaults: left out of a job's identity at those, so that an
upgrade does not make each earlier job a new one (which refused the outputs its earlier runs wrote as another
workflow's, and redid nothing it had done)."""


def job_id(workflow_dict: dict, base_dir: str) -> str:
    """The same validated workflow, resolved from the same folder, is the same job: its URLs taken without their
    credentials (a signature, a password), so that one signed anew for its next run is the same job."""
    identity = storage.redacted_values(dict(workflow_dict))
    for section, defaults in ADDED_LATER.items():
        if isinstance(identity.get(section), dict):
            identity[section] = {k: v for k, v in identity[section].items() if k not in defaults or v != defaults[k]}
    text = json.dumps({"workflow": identity, "base": base_dir}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_job_dir(output_path: str, base_dir: str | Path, identity: str) -> Path | str:
    """``<output folder>/.tilemask/jobs/<id>``: the output folder is ``output.path`` up to its first ``{stem}``."""
    prefix = output_path.split("{")[0]
    folder = prefix if prefix.endswith("/") or not prefix else os.path.dirname(prefix)
    if storage.is_remote(folder):
        return f"{folder.rstrip('/')}/.tilemask/jobs/{identity}"
    folder_path = Path(folder or ".").expanduser()
    if not folder_path.is_absolute():
        folder_path = Path(base_dir) / folder_path
    return Path(os.path.normpath(folder_path)) / ".tilemask" / "jobs" / identity


def home() -> Path:
    return Path(os.environ.get("TILEMASK_HOME") or Path.home() / ".local" / "share" / "tilemask")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """The manifest read back: every line in order, and the latest per item."""

    lines: list[dict] = field(default_factory=list)

    def latest(self) -> dict[str, dict]:
        """Each item's last attempt where it finished (ok or failed), by the item's name: its index moves when a glob
        matches more files than before.  An item begun again since (redone, then stopped) has none: its earlier
        ``ok`` was the report's and the status's for outputs no longer there (a review)."""
        last = self._last(("started", "ok", "failed"))
        return {name: line for name, line in last.items() if line["status"] != "started"}

    def _last(self, statuses: tuple[str, ...]) -> dict[str, dict]:
        """Each item's last line of one of ``statuses``, by name."""
        return {line["name"]: line for line in self.lines if line.get("status") in statuses}

    def started(self) -> set[str]:
        """The names of the items this job has begun at least once (their outputs are this job's own).  An item
        refused before it began (its output was someone else's) has a ``failed`` line and no ``started`` one:
        what is at its outputs is still not the job's; nor are labels another workflow wrote over the job's
        (:func:`own_labels`; its last ``ok`` line says, even where a redo stopped since: a review)."""
        replaced = {name for name, line in self._last(("ok", "failed")).items()
                    if line["status"] == "ok" and not own_labels(line)}  # fmt: skip
        return {line["name"] for line in self.lines if line.get("status") == "started"} - replaced


def labels_stamp(outputs: list[str]) -> list | None:
    """:func:`~tilemask.sources.file_stamp` of an item's labels (its first output) where they are local, else None:
    what tells the labels a job wrote from those another workflow wrote over them with ``--overwrite`` (they were
    taken for the job's own, "done in an earlier run", an exploratory review). The labels only: a derived product
    (a statistics table) may be shared by items and rewritten after."""
    from .sources import file_stamp

    return list(file_stamp(outputs[0])) if outputs and not storage.is_remote(outputs[0]) else None


def own_labels(line: dict) -> bool:
    """Whether the labels of an item's ``ok`` line are those it wrote, or gone (nobody else's are there; a line
    without their stamp: taken so)."""
    return line.get("labels_stamp") is None or labels_stamp(line["outputs"]) in (line["labels_stamp"], [0, 0])


def job_folder(location: str | os.PathLike) -> JobFolder:
    """The job folder at ``location``: a local folder, or a prefix on object storage."""
    return RemoteJobFolder(os.fspath(location)) if storage.is_remote(location) else JobFolder(location)


_HELD_HERE: set[tuple[int, int]] = set()
"""The lock files (device, inode) of the jobs this process runs: a job refused as running is named as running in
this process (a notebook's ``tilemask.run`` on a thread of its own, called again meanwhile, was told "another
process"), what its status cannot say before the run writes its pid there, nor where two hosts' processes share a
name and a pid (containers).  Changed and read under :data:`_HELD_LOCK`, with the ``flock`` taken or given up: a
thread refused between another's ``flock`` and its noting the lock here was told "another process"."""
_HELD_LOCK = threading.Lock()


def _lock_key(fd: int) -> tuple[int, int] | None:
    """The lock file's (device, inode), None where it cannot be read: the lock is what matters, this only names
    who holds it."""
    try:
        stat = os.fstat(fd)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class JobFolder:
    """One job's folder: its record on disk and the lock of the process that runs it."""

    FILES = ("job.json", "workflow.yaml", "items.jsonl", "manifest.jsonl", "status.json", "report.csv", "cancel")

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self._lock_fd: int | None = None
        self._made: list[Path] = []  # the folders made for the job (:meth:`acquire`), uppermost first

    @property
    def location(self) -> str:
        """Where the job's record is, as users name it."""
        return str(self.path)

    @property
    def report(self) -> str:
        """Where the report is, as users name it."""
        return f"{self.location}/report.csv"

    def _saved(self, name: str) -> None:
        """``name`` in the folder was written (a folder on object storage puts it back)."""

    @property
    def id(self) -> str:
        """What names the job (``tilemask status ID``, its staged files): recorded in ``job.json`` when the job
        is created (:meth:`create`); until then, the folder's name."""
        try:
            return json.loads((self.path / "job.json").read_text())["id"]
        except (OSError, ValueError, KeyError, TypeError):  # TypeError: JSON, not an object
            return self.path.name

    @property
    def report_path(self) -> Path:
        return self.path / "report.csv"

    def exists(self) -> bool:
        return (self.path / "job.json").is_file()

    def incomplete(self) -> list[str]:
        """The files of the job's record that :meth:`create` writes after ``job.json`` and that are not there: a run
        stopped (killed, a full disk) while it wrote them; its next run writes them.  None of a job not created."""
        if not self.exists():
            return []
        return [name for name in ("workflow.yaml", "items.jsonl") if not (self.path / name).is_file()]

    # -- creating and reading ------------------------------------------------------------------------------

    def create(
        self, workflow_dict: dict, base_dir: str, source: str | None, options: dict, items: Iterable[dict],
        replace: bool = False,
    ) -> None:
        """Write the job's record: kept if the same job is there (its manifest carries over); a folder that holds
        another workflow's job is refused (exit 2) unless ``replace`` (``--overwrite``: it is started afresh) or
        that job never began an item."""
        workflow_id = job_id(workflow_dict, base_dir)
        if self.exists() and self.info().get("workflow_id") != workflow_id:
            manifest = self.path / "manifest.jsonl"
            begun = manifest.is_file() and manifest.stat().st_size > 0
            if not replace and (begun or live_state(self) in ACTIVE):  # one that never began an item and is not
                # queued or running (it was refused when planning) has nothing to keep
                raise JobError(f"job folder {self.location} holds the job of another workflow; choose another "
                               f"{option('job_dir')}, or pass {option('overwrite', 'True')} to start it afresh")
            (self.path / "job.json").unlink()
            self.reset(begun=False)  # what another workflow's job began is not this one's
        # A default folder is named by the workflow's hash; one a user named (--job-dir) is not unique: two
        # workflows whose --job-dir folders share a name resumed each other's staged chunks.
        identity = workflow_id
        if self.path.name != workflow_id:
            identity = hashlib.sha256(f"{workflow_id} {self.location}".encode()).hexdigest()[:12]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            info = {"id": identity, "workflow_id": workflow_id, "created": now(), "base_dir": base_dir,
                    "workflow_file": source, "options": options}  # fmt: skip
            if self.exists():
                info = {**self.info(), "options": options}
            # job.json first: a run stopped after it (a kill, a full disk) leaves a folder that is this job's, which
            # the next run completes; the other files first left one refused as holding files not a job's.  Listed
            # at once: one stopped while it wrote the rest was a job `tilemask jobs` did not show
            _write_atomic(self.path / "job.json", json.dumps(info, indent=2) + "\n")
            register(self)
            _write_atomic(self.path / "workflow.yaml", yaml.safe_dump(workflow_dict, sort_keys=False))
            _write_atomic(self.path / "items.jsonl", "".join(json.dumps(item) + "\n" for item in items))
            (self.path / "cancel").unlink(missing_ok=True)  # an earlier run's request is not this one's
            for name in ("job.json", "workflow.yaml", "items.jsonl", "cancel"):
                self._saved(name)
        except OSError as exc:
            raise JobError(f"job folder {self.location} is not writable: {why_unwritable(self.path, exc)}") from None

    def info(self) -> dict:
        try:
            info = json.loads((self.path / "job.json").read_text())
        except FileNotFoundError:
            raise JobError(f"{self.path}: not a tilemask job folder (no job.json)") from None
        except (OSError, ValueError) as exc:
            raise JobError(f"{self.path}/job.json: unreadable: {exc}") from None
        if not isinstance(info, dict):
            raise JobError(f"{self.path}/job.json: unreadable: not a JSON object")
        return info

    def workflow(self):
        """The job's workflow, resolved against the folder it was written for."""
        from .workflow import Workflow

        raw = yaml.safe_load((self.path / "workflow.yaml").read_text(encoding="utf-8"))
        return Workflow.from_dict(raw, base_dir=self.info()["base_dir"])

    def items(self) -> list[dict]:
        """The inputs as listed (``item``, ``name``, ``files``, ``output``); a damaged line is a :class:`JobError`."""
        path = self.path / "items.jsonl"
        items = []
        for number, line in enumerate(_lines(path), 1):
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            if not isinstance(item, dict) or "name" not in item:
                raise JobError(f"{path} line {number}: not an input's record; the job's record is damaged")
            items.append(item)
        return items

    # -- the manifest ----------------------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        """The manifest's lines; a truncated last line (a crash mid-write) is dropped, here and on disk."""
        path = self.path / "manifest.jsonl"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return Manifest()
        whole, _, partial = data.rpartition(b"\n")
        if partial:
            logger.warning("%s: dropped a truncated last line", path)
            with open(path, "r+b") as f:
                f.truncate(len(whole) + 1 if whole else 0)
        lines = []
        for number, text in enumerate(whole.splitlines(), 1):  # JSON of bytes: one not UTF-8 is not JSON
            try:
                line = json.loads(text)
            except ValueError:
                raise JobError(f"{path} line {number} is not JSON; the manifest is damaged{_afresh()}") from None
            if not _attempt(line):  # JSON, but no attempt's record ([], null, a line without a name)
                raise JobError(f"{path} line {number}: not an attempt's record; the manifest is damaged{_afresh()}")
            lines.append(line)
        return Manifest(lines)

    def record(self, line: dict, durable: bool = True) -> None:
        """Append one line to the manifest; ``durable``: fsync it, so that it survives a crash of the machine
        too (a line that is only written survives the process, not the machine)."""
        path = self.path / "manifest.jsonl"
        with _writing(path), open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            if durable:
                os.fsync(f.fileno())
        self._saved("manifest.jsonl")

    def reset(self, begun: bool = True, cancel: bool = True) -> None:
        """Forget every attempt (``--overwrite``: every item is redone); with ``begun``, not which items the job
        began: their outputs are still its own, so that its next run, should this one be interrupted, resumes
        without ``--overwrite`` (it refused them as someone else's).  ``cancel``: an earlier request to cancel too;
        not from a run under way (its first record), where the request is this run's (``tilemask cancel``)."""
        started = {}
        try:
            if begun:
                started = {line["name"]: line for line in self.manifest().lines if line["status"] == "started"}
        except JobError:  # a damaged manifest: --overwrite is how a job starts afresh
            pass
        if started:
            _write_atomic(self.path / "manifest.jsonl", "".join(json.dumps(line) + "\n" for line in started.values()))
        else:
            (self.path / "manifest.jsonl").unlink(missing_ok=True)
        forgotten = ("report.csv", "cancel") if cancel else ("report.csv",)
        for name in forgotten:
            (self.path / name).unlink(missing_ok=True)
        for name in ("manifest.jsonl", *forgotten):
            self._saved(name)
        try:
            self.status()
        except JobError:  # a damaged record of its state, as a damaged manifest: written again as the job runs
            (self.path / "status.json").unlink(missing_ok=True)
            self._saved("status.json")

    # -- status, cancel, report -------------------------------------------------------------------------------

    def status(self) -> dict:
        try:
            status = json.loads((self.path / "status.json").read_text())
        except FileNotFoundError:
            return {"job": self.id, "state": "queued"}
        except ValueError as exc:
            raise JobError(f"{self.path}/status.json: unreadable: {exc}{_afresh()}") from None
        if not isinstance(status, dict):
            raise JobError(f"{self.path}/status.json: unreadable: not a JSON object{_afresh()}")
        wrong = next((key for key, kind in STATUS_FIELDS.items() if not isinstance(status.get(key), kind)), None)
        if wrong is not None:  # what tilemask writes there is none of these: an edited or damaged record
            raise JobError(f"{self.path}/status.json: unreadable: {wrong} {status[wrong]!r} is not a {wrong}"
                           f"{_afresh()}")  # fmt: skip
        if status.get("state") not in (None, *WRITTEN):
            raise JobError(f"{self.path}/status.json: unreadable: state {status['state']!r} is not one of "
                           f"{', '.join(WRITTEN)}{_afresh()}")  # fmt: skip
        return status

    def set_status(self, state: str, **fields) -> None:
        if fields.get("message"):  # printed by status and jobs, shared as the report is: no URL's credentials
            fields["message"] = storage.redacted(fields["message"])
        status = {**self.status(), **fields, "job": self.id, "state": state, "folder": self.location, "updated": now()}
        _write_atomic(self.path / "status.json", json.dumps(status, indent=2) + "\n")
        self._saved("status.json")

    def cancel_requested(self) -> bool:
        return (self.path / "cancel").exists()

    def request_cancel(self) -> None:
        (self.path / "cancel").write_text(now() + "\n")
        self._saved("cancel")

    def counts(self, names: set[str]) -> dict[str, int]:
        """How many of the items ``names`` are ok, failed and pending."""
        total = len(names)
        latest = {name: line for name, line in self.manifest().latest().items() if name in names}
        ok = sum(1 for line in latest.values() if line["status"] == "ok")
        failed = len(latest) - ok
        return {"items": total, "ok": ok, "failed": failed, "pending": total - ok - failed}

    def write_report(self, items: list[dict], skipped: set[str]) -> Path:
        """``report.csv``: each item's latest attempt (ok, skipped, failed) or ``not run``."""
        latest = self.manifest().latest()
        rows = []
        for item in items:
            line = latest.get(item["name"], {})
            status = line.get("status", "not run")
            if status == "ok" and item["name"] in skipped:
                status = "skipped"
            rows.append({
                "item": item["item"], "name": item["name"], "input": storage.redacted(";".join(item["files"])),
                "status": status, "outputs": ";".join(line.get("outputs", [])),
                "error": storage.redacted(line.get("error") or ""),
                "seconds": line.get("seconds", ""), "windows": line.get("windows", ""),
                "class_pixels": json.dumps(line["class_pixels"]) if line.get("class_pixels") else "",
            })  # fmt: skip
        staged = self.report_path.with_suffix(".csv.tmp")
        with _writing(self.report_path):
            try:
                with open(staged, "w", newline="", encoding="utf-8") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["item"])
                    writer.writeheader()
                    writer.writerows(rows)
                os.replace(staged, self.report_path)
            except OSError:  # a full disk: no staged copy left beside the records
                staged.unlink(missing_ok=True)
                raise
        self._saved("report.csv")
        return self.report_path

    # -- one driver at a time --------------------------------------------------------------------------------

    def acquire(self) -> JobFolder:
        """Take the job's lock, or refuse: another process runs this job, or the folder holds files of the job's
        record's names but no job's record (a user's own ``report.csv`` in a ``--job-dir``: a run would write over
        them, and a refused first run remove them with its own, :meth:`discard`)."""
        foreign = [name for name in self.FILES if name != "job.json" and (self.path / name).exists()]
        if foreign and not self.exists():
            raise JobError(f"job folder {self.location} holds {', '.join(foreign)} but no job.json: they are not a "
                           f"tilemask job's; move them, or choose another {option('job_dir')}")  # fmt: skip
        try:
            make_folder(self.path, self._made)
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JobError(f"job folder {self.location} is not writable: {why_unwritable(self.path, exc)}") from None
        with _HELD_LOCK:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                here = _lock_key(fd) in _HELD_HERE
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    where = "in this process (another thread's tilemask.run)" if here else "in another process"
                    raise JobError(f"job {self.id} is running {where}; see tilemask status {self.id}") from None
                raise
            self._lock_fd = fd
            if (key := _lock_key(fd)) is not None:
                _HELD_HERE.add(key)
        return self

    def discard(self) -> None:
        """Remove a job its first run created and then refused before any work (exit 2): its files, its listing in
        ``$TILEMASK_HOME`` and the folders made for it (:meth:`acquire`), so that no job is listed that never ran."""
        (home() / "jobs" / self.id).unlink(missing_ok=True)
        for name in self.FILES:
            (self.path / name).unlink(missing_ok=True)
            self._saved(name)
        (self.path / "lock").unlink(missing_ok=True)
        remove_made(self._made)  # one that holds something else stays

    def release(self) -> None:
        if self._lock_fd is not None:
            with _HELD_LOCK:
                _HELD_HERE.discard(_lock_key(self._lock_fd))
                os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> JobFolder:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RemoteJobFolder(JobFolder):
    """A job folder on object storage, worked on through a copy in this machine's scratch.

    Opening it reads the record from the store; every file the job writes is put back whole (S3 has no append:
    the manifest is put again after each line, which costs as the manifest grows).  The lock is held on this
    machine only: object storage has none, so two machines must not run one job at once.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:20]
        super().__init__(storage.scratch("tilemask-jobs") / digest / self.url.rsplit("/", 1)[-1])
        self._pull()

    @property
    def location(self) -> str:
        return self.url

    def _pull(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            present = set(storage.names(self.url))
            for name in self.FILES:
                if name in present:
                    storage.download(f"{self.url}/{name}", self.path / f".{name}.part")
                    os.replace(self.path / f".{name}.part", self.path / name)
                else:
                    (self.path / name).unlink(missing_ok=True)
        except (FileNotFoundError, PermissionError) as exc:  # no such bucket; a key that may not read
            raise JobError(f"job folder {self.url} cannot be read: {exc}") from None

    def _saved(self, name: str) -> None:
        try:
            if (self.path / name).exists():
                storage.upload(self.path / name, f"{self.url}/{name}")
            else:
                storage.remove(f"{self.url}/{name}")
        except (FileNotFoundError, PermissionError) as exc:  # no such bucket; a key that may not write
            raise JobError(f"job folder {self.url} is not writable: {exc}") from None

    def cancel_requested(self) -> bool:
        return storage.exists(f"{self.url}/cancel")


def _attempt(line) -> bool:
    """Whether a manifest line is an attempt's record as :meth:`JobFolder.record` writes it: a ``started`` line
    names its item; an ``ok`` or ``failed`` line its input too, and an ``ok`` line the list of its outputs."""
    if not (isinstance(line, dict) and isinstance(line.get("name"), str)):
        return False
    status = line.get("status")
    if status == "started":
        return True
    return status in ("ok", "failed") and "input" in line and (status == "failed" or isinstance(line.get("outputs"), list))


def outputs_complete(outputs: list[str]) -> bool:
    """Whether every output of an item exists, each label output is a finished tilemask output, and no derived
    product is a file without tilemask's mark (someone's own saved over it; CSV has no mark: it counts if there)."""
    for path in outputs:
        if not (exists(path) and written_by_tilemask(path)):
            return False
        fmt = for_path(path)
        if fmt.writable and not fmt.is_complete(path):
            return False
    return True


# -- finding jobs ---------------------------------------------------------------------------------------------


def register(job: JobFolder) -> None:
    """List the job in ``$TILEMASK_HOME/jobs`` (best effort: the folder is the record)."""
    try:
        index = home() / "jobs"
        index.mkdir(parents=True, exist_ok=True)
        _write_atomic(index / job.id, job.location + "\n")
    except OSError as exc:
        logger.warning("cannot list job %s in %s: %s", job.id, home(), exc)


def find(job: str) -> JobFolder:
    """A job by folder or by id (listed in ``$TILEMASK_HOME/jobs``)."""
    if not job.strip():  # an unset $JOB: "" was the current folder
        raise JobError("no job given: give its id from tilemask jobs, or its folder")
    if os.sep in job or Path(job).is_dir():
        folder = job_folder(job)
    else:
        entry = home() / "jobs" / job
        if not entry.is_file():
            raise JobError(f"no job {job!r} (give its id from tilemask jobs, or its folder)")
        folder = _listed_folder(entry)
        if not folder.exists() and not folder.path.exists():  # "not a tilemask job folder" said it was not one
            raise JobError(f"job {job}: its folder {folder.location} is not there (moved, removed, or not mounted "
                           f"here); give the folder where it is now, or to forget the job remove {entry}")
    if not folder.exists():
        raise JobError(f"{folder.location}: not a tilemask job folder (no job.json)")
    return folder


def _listed_folder(entry: Path) -> JobFolder:
    """The job folder an entry of ``$TILEMASK_HOME/jobs`` names (:func:`register`); one that names none is a
    :class:`JobError` that names it."""
    try:
        location = entry.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        location, reason = "", getattr(exc, "strerror", None) or exc
    else:
        reason = "empty"
    if not location:
        raise JobError(f"{entry}: names no job folder ({reason}); to forget the job, remove it")
    return job_folder(location)


def listed() -> Iterator[JobFolder]:
    """The jobs listed in ``$TILEMASK_HOME/jobs`` whose folder is there; those whose folder is not (removed, or
    not mounted on this host) are named in one warning at the end, the first three of them by id and folder."""
    index = home() / "jobs"
    gone: list[tuple[Path, JobFolder]] = []
    for entry in sorted(index.iterdir()) if index.is_dir() else ():
        try:
            folder = _listed_folder(entry)
        except TilemaskError as exc:  # a folder on object storage that cannot be reached now; a damaged entry
            logger.warning("job %s: %s", entry.name, exc)
            continue
        if folder.exists():
            yield folder
        elif not folder.path.exists():
            gone.append((entry, folder))
    if len(gone) == 1:
        (entry, folder), = gone
        logger.warning("job %s: its folder %s is not there (removed, or not mounted here); to forget the "
                       "job, remove %s", entry.name, folder.location, entry)
    elif gone:
        named = ", ".join(f"{entry.name} ({folder.location})" for entry, folder in gone[:3])
        more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
        logger.warning("%d jobs' folders are not there (removed, or not mounted here): %s%s; to forget a job, "
                       "remove its file in %s", len(gone), named, more, index)


def live_state(job: JobFolder, status: dict | None = None, timeout: float = 5.0) -> str:
    """The recorded state, or ``lost`` when it says queued or running but nothing runs the job any more:
    the scheduler that held its driver is gone or no longer knows it, or the process that ran it on this
    host has exited."""
    return live_driver(job, status, timeout)[0]


def live_driver(
    job: JobFolder, status: dict | None = None, timeout: float = 5.0, asked: dict | None = None,
) -> tuple[str, str | None]:
    """:func:`live_state`, and the scheduler's state of the job's driver task (``None``: no driver on a scheduler,
    or not asked: the job is not active), from the one question to the scheduler: ``cancel`` sees a driver the
    scheduler holds but no worker runs (:data:`HELD`) without connecting again while a running driver reacts to
    its request (a Client that connects while the scheduler tells every client of cancelled keys fails in
    distributed's handshake, a bare AssertionError). ``asked``: the drivers' states already asked of their
    schedulers, by ``(scheduler, key)`` (:func:`driver_states`), and of SLURM, by ``("slurm", job id)``
    (:func:`~tilemask.slurm.job_states`); a driver not in it is asked of its scheduler or SLURM."""
    status = job.status() if status is None else status
    state = status.get("state", "queued")
    if state not in ACTIVE:
        return state, None
    if status.get("slurm_job"):  # the driver job of submit --cluster slurm: SLURM's state of it
        from . import slurm

        where = ("slurm", status["slurm_job"])
        task = asked[where] if asked and where in asked else slurm.job_state(status["slurm_job"])
        if task is None:  # SLURM cannot be asked from here: the record is all there is
            return state, None
        if task in slurm.ALIVE:
            return ("queued" if task in slurm.PENDING else "running"), task
        # it ended: as it ended it may have written its final state, after the record was read
        again = job.status().get("state", "queued")
        return (again if again not in ACTIVE else "lost"), task
    if status.get("driver") and status.get("scheduler"):
        where = (status["scheduler"], status["driver"])
        task = asked[where] if asked and where in asked else driver_state(*where, timeout)
        return (state if task not in (None, UNANSWERED, "forgotten", "erred", "memory") else "lost"), task
    if status.get("host") == socket.gethostname() and status.get("pid"):
        return (state if _pid_alive(int(status["pid"])) and _holds_lock(job) else "lost"), None
    if not status.get("host") and not storage.is_remote(job.location):  # no state recorded yet (no status.json):
        # the process creating the job holds its lock; one on object storage may be created on another machine
        return (state if _holds_lock(job) else "lost"), None
    return state, None


UNANSWERED = "unanswered"
""":func:`driver_state` where something took the connection and said nothing within the timeout: a stalled
scheduler (its driver may run on), or a port another service took since; such a job reads ``lost`` all the same."""


def driver_state(address: str, key: str, timeout: float) -> str | None:
    """The state of task ``key`` on the scheduler at ``address``; ``None`` if it has no such task or cannot be
    reached (nothing there), :data:`UNANSWERED` if what is there does not answer within ``timeout``."""
    return driver_states(address, [key], timeout)[key]


def driver_states(address: str, keys: list[str], timeout: float) -> dict[str, str | None]:
    """:func:`driver_state` of each of ``keys``, asked over one connection: ``tilemask jobs`` asked a scheduler
    once per job, and one that is gone took a connect timeout for every 16 of its jobs (48 jobs: 15 s)."""
    from .cluster import scheduler_client

    def task_states(keys: list[str], dask_scheduler=None) -> dict[str, str | None]:  # sent by value (nested): a
        tasks = dask_scheduler.tasks  # scheduler without tilemask runs it (cluster.check_scheduler)
        return {key: (tasks[key].state if key in tasks else None) for key in keys}

    def alike(state: str | None) -> dict[str, str | None]:
        return dict.fromkeys(keys, state)

    for attempt in range(3):
        try:
            client = scheduler_client(address, timeout, set_as_default=False)
        except RunError:  # the connection taken, no answer: "did not answer as a Dask scheduler within 5 s"
            return alike(UNANSWERED)
        except (TilemaskError, ValueError):  # ValueError: no address distributed can read (an edited status.json)
            return alike(None)
        except AssertionError:  # distributed's handshake (assert len(msg) == 1): the scheduler sent its
            if attempt == 2:  # "stream-start" with a message to every client (another one cancelled keys: a
                raise  # driver stopping its items); connecting again gets a clean one
            logger.debug("the Client's handshake with %s met a broadcast; connecting again", address)
            continue
        try:
            with client:
                return client.run_on_scheduler(task_states, keys=list(keys))
        except OSError:
            return alike(None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holds_lock(job: JobFolder) -> bool:
    """Whether some process holds the job's lock (a pid can be reused; the lock cannot outlive its process).  Asked
    through a read-only descriptor, of a folder this user may not write too, for a shared lock: on NFS ``flock`` is
    a byte-range lock, and an exclusive one needs the file open to write (EBADF).  Only a lock that conflicts
    (EWOULDBLOCK) is held; a lock that cannot be asked is not taken for one that is."""
    try:
        fd = os.open(job.path / "lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        logger.warning("%s: cannot ask whether a process holds it: %s", job.path / "lock", exc)
    finally:
        os.close(fd)
    return False


def _lines(path: Path) -> list[bytes]:
    """The lines of ``path`` that are not blank, as bytes (``json.loads`` reads them; one not UTF-8 is not JSON)."""
    try:
        return [line for line in path.read_bytes().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _write_atomic(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    with _writing(path):
        try:
            staged.write_text(text, encoding="utf-8")
            os.replace(staged, path)
        except OSError:  # a full disk: no empty staged copy left beside the records
            staged.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed write of the job's records as one line naming the file, a full disk as such (the job folder
    sits in the output folder: a run that fills that disk can fill it first)."""
    try:
        yield
    except OutputError:  # an OSError already named
        raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the job's record: {describe_write_error(exc, path)}") from None
