"""Detached jobs on a real ``dask scheduler`` and ``dask worker`` processes: submit, status, cancel, and the
faults a job outlives (its driver's worker killed, the scheduler gone).  Slow: each test starts its cluster."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio
import yaml

import tilemask
from tilemask import Workflow

from .conftest import GEO, REPO, run_cli, scheduler_address
from .test_trust import hidden

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, workers: int, *scheduler_options, config: dict | None = None):
    """A ``dask scheduler`` on a free port (``--port 0``, found through its scheduler file) and ``workers``
    ``dask worker`` processes (logs in ``tmp_path/logs``), all with the Dask ``config`` (as their
    ``DASK_...`` variables); yields ``(address, processes)``; stops whatever is left."""
    import dask

    scheduler_file = tmp_path / "scheduler.json"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, **dask_variables(config or {})}
    procs = [subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--dashboard-address",
         "127.0.0.1:0", "--scheduler-file", scheduler_file, *scheduler_options],
        stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )]  # fmt: skip
    try:
        address = scheduler_address(scheduler_file, procs[0])
        for i in range(workers):
            procs.append(subprocess.Popen(
                [BIN / "dask", "worker", "--scheduler-file", scheduler_file, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
            ))  # fmt: skip
        if workers:
            from distributed import Client

            with dask.config.set(config or {}), Client(address, timeout=30) as client:
                client.wait_for_workers(workers, timeout=60)
        yield address, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def dask_variables(config: dict) -> dict[str, str]:
    """Dask ``config`` keys (``"distributed.comm.tls.ca-file"``) as the environment variables Dask reads them from."""
    return {"DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value) for key, value in config.items()}


@pytest.fixture
def cluster(tmp_path):
    """A scheduler and two workers (:func:`dask_cluster`)."""
    with dask_cluster(tmp_path, 2) as running:
        yield running


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie its parent has not reaped yet too)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def scenes_workflow(tmp_path) -> Path:
    """Twelve copies of the demo scene and the demo model: a job of about a second an item."""
    (tmp_path / "scenes").mkdir()
    for i in range(12):
        shutil.copy(GEO["RGB.byte.tif"], tmp_path / "scenes" / f"s{i:02d}.tif")
    workflow = yaml.safe_load((REPO / "workflows" / "demo_landsat.yaml").read_text())
    workflow["input"] = "scenes/*.tif"
    workflow["model"]["weights"] = str(REPO / "workflows" / "demo" / "landsat_water_land_cloud.pt")
    workflow["inference"]["device"] = "cpu"
    workflow["output"] = {"path": "out/{stem}_mask.tif", "chunks": 256}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow))
    return path


def status(job: str, cwd) -> dict:
    done = run_cli("status", job, "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def manifest(job_folder: str) -> list[dict]:
    return [json.loads(line) for line in (Path(job_folder) / "manifest.jsonl").read_text().splitlines()]


def submit(workflow: Path, address: str, *options: str, quiet: bool = False) -> str:
    """``tilemask submit [OPTIONS]``; ``quiet``: ``tilemask -q submit``, which prints the job's id and nothing else."""
    started = time.monotonic()
    done = run_cli(*(["-q"] if quiet else []), "submit", workflow, "--scheduler", address, *options, cwd=workflow.parent)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30, "submit returns at once; the job runs on the cluster"
    job = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{12}", job), done.stdout  # the id alone on the last line
    if quiet:
        assert (done.stdout, done.stderr) == (f"{job}\n", "")
    return job


def ok_items(folder: str) -> int:
    path = Path(folder) / "manifest.jsonl"
    return sum(1 for line in manifest(folder) if line["status"] == "ok") if path.exists() else 0


def labels(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


@pytest.mark.parametrize("options", [(), ("--overwrite",)], ids=["", "overwrite"])
def test_a_submitted_job_outlives_its_submitter_and_a_killed_driver_resumes_from_the_manifest(
    cluster, scenes_workflow, tmp_path, client, options
):
    """Under ``--overwrite`` the driver Dask started again forgot the manifest and redid every item (a
    reviewer's): ``submit`` forgets the earlier attempts once, when it records the job."""
    address, _ = cluster
    job = submit(scenes_workflow, address, *options, quiet=True)
    folder = status(job, tmp_path)["folder"]
    wait_for(lambda: ok_items(folder) >= 3, "three items done")
    driver = json.loads((Path(folder) / "status.json").read_text())  # read at once: a status command takes a second
    assert driver["state"] == "running" and driver["driver"].startswith(f"tilemask-job-{job}"), driver
    os.kill(driver["pid"], signal.SIGKILL)  # the worker process the driver runs in
    wait_for(lambda: _gone(driver["pid"]), "the driver's process to die")  # no line of its own after this read
    lines = manifest(folder)
    before = {line["item"] for line in lines if line["status"] == "ok"}
    in_flight = {line["item"] for line in lines if line["status"] == "started"} - before
    wait_for(lambda: status(job, tmp_path)["state"] not in ("queued", "running"), "the job to end")
    final = status(job, tmp_path)
    assert final["state"] == "done", final
    assert final["counts"] == {"items": 12, "ok": 12, "failed": 0, "pending": 0}
    assert manifest(folder)[: len(lines)] == lines, "the record of the items done before the kill was kept"
    started = Counter(line["item"] for line in manifest(folder) if line["status"] == "started")
    assert all(started[item] == 1 for item in before), "an item done before the kill was redone"
    assert {item for item, n in started.items() if n > 1} <= in_flight, "only the items in flight at the kill were redone"
    rows = (Path(folder) / "report.csv").read_text().splitlines()[1:]
    assert len(rows) == 12 and all(",ok," in row or ",skipped," in row for row in rows)

    # every output equals a run of the scene in the foreground
    reference = Workflow.from_yaml(scenes_workflow, ["input=scenes/s00.tif", "output.path=ref/{stem}.tif"])
    (expected,) = tilemask.run(reference, client)
    truth = labels(expected.outputs[0])
    for i in range(12):
        np.testing.assert_array_equal(labels(tmp_path / "out" / f"s{i:02d}_mask.tif"), truth)
    assert hidden(tmp_path / "out") == []


def test_a_lost_scheduler_leaves_the_job_lost_and_run_resumes_it(cluster, scenes_workflow, tmp_path):
    address, procs = cluster
    job = submit(scenes_workflow, address)
    folder = status(job, tmp_path)["folder"]
    wait_for(lambda: ok_items(folder) >= 2, "two items done")
    for proc in procs:  # the whole cluster goes away (a restarted scheduler does not know the job)
        os.killpg(proc.pid, signal.SIGKILL)
    before = {line["item"] for line in manifest(folder) if line["status"] == "ok"}
    assert status(job, tmp_path)["state"] == "lost"
    done = run_cli("run", scenes_workflow, "--quiet", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    final = status(job, tmp_path)
    assert final["state"] == "done" and final["counts"]["ok"] == 12
    started = Counter(line["item"] for line in manifest(folder) if line["status"] == "started")
    assert all(started[item] == 1 for item in before)
    assert done.stdout.count("done in an earlier run") >= len(before)


def test_a_run_that_loses_its_scheduler_names_every_input_in_flight(cluster, scenes_workflow, tmp_path):
    """Each of them is redone when the job runs again; a message that named one hid the others."""
    address, procs = cluster
    run = subprocess.Popen(
        [BIN / "tilemask", "run", scenes_workflow, "--quiet", "--scheduler", address], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"COLUMNS": "1000"},
    )  # fmt: skip
    jobs = tmp_path / "out" / ".tilemask" / "jobs"

    def in_flight() -> set[str]:
        lines = [line for folder in jobs.glob("*") if (folder / "manifest.jsonl").exists() for line in manifest(folder)]
        ended = {line["item"] for line in lines if line["status"] != "started"}
        return {Path(line["input"]).name for line in lines if line["status"] == "started" and line["item"] not in ended}

    wait_for(lambda: len(in_flight()) >= 2 and run.poll() is None, "two inputs in flight")
    os.killpg(procs[0].pid, signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1, stderr
    (line,) = [line for line in stderr.splitlines() if "lost the Dask scheduler" in line]
    named = set(re.findall(r"s\d\d\.tif", line))
    assert len(named) >= 2 and named >= in_flight(), (line, in_flight())  # one just starting may have no line yet


def test_cancel_takes_back_a_driver_whose_workers_all_died(cluster, scenes_workflow, tmp_path):
    """Every worker killed, the scheduler holds the driver again, waiting for one: ``status`` said running and
    ``cancel`` waited 60 s, then exit 1 "still running", leaving the driver to start on the next worker (a
    reviewer's). It is taken back at once; the items done stay done."""
    address, procs = cluster
    job = submit(scenes_workflow, address)
    folder = status(job, tmp_path)["folder"]
    wait_for(lambda: ok_items(folder) >= 1, "an item done")
    for proc in procs[1:]:  # the workers, not the scheduler
        os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs[1:]:
        proc.wait(timeout=30)
    wait_for(lambda: status(job, tmp_path)["state"] == "queued", "status to say queued", timeout=30)  # was running
    assert "waits for a Dask worker" in status(job, tmp_path)["message"]
    begin = time.monotonic()
    done = run_cli("cancel", job, "--wait", "20", cwd=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, f"job {job}: cancelled"), (done.stdout, done.stderr)
    assert time.monotonic() - begin < 15
    final = status(job, tmp_path)
    assert final["state"] == "cancelled" and final["counts"]["ok"] >= 1, final
    from distributed import Client

    with Client(address, timeout=30) as client:
        assert not client.run_on_scheduler(lambda key, dask_scheduler=None: key in dask_scheduler.tasks,
                                           key=final["driver"]), "the scheduler no longer holds the driver"  # fmt: skip


def test_cancel_stops_a_running_job_and_leaves_finished_items_whole(cluster, scenes_workflow, tmp_path):
    address, _ = cluster
    for i in range(12, 40):  # 40 items: with 12 the job had once finished them all before the cancel landed
        shutil.copy(tmp_path / "scenes" / "s00.tif", tmp_path / "scenes" / f"s{i:02d}.tif")
    job = submit(scenes_workflow, address)
    folder = status(job, tmp_path)["folder"]
    wait_for(lambda: ok_items(folder) >= 1, "an item done")
    twice = run_cli("submit", scenes_workflow, "--scheduler", address, cwd=tmp_path)  # its outputs were "being
    assert (twice.returncode, twice.stderr) == (  # written by another tilemask run" (a review)
        2, f"tilemask: error: job {job} is running already; see tilemask status {job}\n")
    done = run_cli("cancel", job, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"job {job}: cancelled"
    final = status(job, tmp_path)
    assert final["state"] == "cancelled" and 1 <= final["counts"]["ok"] < 40, final
    staged = hidden(tmp_path / "out")  # the items in flight keep their written chunks, for the job's next run
    assert all(name.startswith(f".tilemask-{job}-") for name in staged), staged
    # pathlib's * matches hidden names too: an item cancelled while its COG was assembled keeps it staged
    finished = sorted(p.name for p in (tmp_path / "out").glob("*_mask.tif") if not p.name.startswith("."))
    assert len(finished) == final["counts"]["ok"]
    again = run_cli("submit", scenes_workflow, "--scheduler", address, cwd=tmp_path)  # and it can be resumed
    assert again.returncode == 0, again.stderr
    wait_for(lambda: status(job, tmp_path)["state"] == "done", "the resumed job")


def test_cancel_of_a_job_whose_scheduler_does_not_answer_stops_its_driver_when_it_can(cluster, scenes_workflow,
                                                                                       tmp_path):  # fmt: skip
    """A stalled scheduler (or one this host cannot reach) makes a running job read as lost; ``cancel`` then
    recorded it cancelled and wrote no request, and the driver, still running, finished the job and published its
    outputs ("done", with the message "cancelled after it was lost"; a review). It now stops as it sees the
    request."""
    address, procs = cluster
    for i in range(12, 40):
        shutil.copy(tmp_path / "scenes" / "s00.tif", tmp_path / "scenes" / f"s{i:02d}.tif")
    job = submit(scenes_workflow, address)
    folder = status(job, tmp_path)["folder"]
    wait_for(lambda: ok_items(folder) >= 1, "an item done")
    os.killpg(procs[0].pid, signal.SIGSTOP)  # the scheduler stalls; the driver and workers run on
    try:
        stalled = status(job, tmp_path)  # "lost" said no more
        assert stalled["state"] == "lost" and stalled["message"] == (
            f"its scheduler, {address}, took the connection and did not answer (stalled?): its driver may still run, "
            "and stops at a cancel once it sees it"), stalled  # fmt: skip
        done = run_cli("cancel", job, cwd=tmp_path)
        assert (done.returncode, done.stdout.strip()) == (0, f"job {job}: cancelled"), done.stderr
    finally:
        os.killpg(procs[0].pid, signal.SIGCONT)
    wait_for(lambda: (Path(folder) / "report.csv").exists(), "the driver's end (its report)", timeout=150)
    final = status(job, tmp_path)
    assert final["state"] == "cancelled" and final["counts"]["ok"] < 40, final


def test_under_on_error_skip_a_bad_first_input_is_the_jobs_failure_not_a_refusal(cluster, scenes_workflow, tmp_path):
    """As ``tilemask run --on-error skip`` records it and goes on; ``submit`` refused it (exit 2)."""
    address, _ = cluster
    (tmp_path / "inputs.txt").write_text("scenes/missing.tif\nscenes/s00.tif\n")
    workflow = tmp_path / "listed.yaml"
    workflow.write_text(yaml.safe_dump(yaml.safe_load(scenes_workflow.read_text()) | {"input": {"list": "inputs.txt"}}))
    done = run_cli("submit", workflow, "--scheduler", address, "--on-error", "skip", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().splitlines()[-1]
    wait_for(lambda: status(job, tmp_path)["state"] not in ("queued", "running"), "the job to end")
    final = status(job, tmp_path)
    assert final["state"] == "failed" and final["counts"] == {"items": 2, "ok": 1, "failed": 1, "pending": 0}, final
    refused = run_cli("submit", workflow, "--scheduler", address, "--overwrite", cwd=tmp_path)
    assert refused.returncode == 2 and "missing.tif" in refused.stderr, refused.stderr  # under abort: exit 2



def test_a_submit_whose_outputs_another_run_is_writing_is_refused_as_run_refuses_it(cluster, scenes_workflow, tmp_path):
    """A review's: while another job's driver held the first input's outputs, ``run`` was refused (exit 2) and
    ``submit`` made a job that failed on its driver. It is refused as ``run`` is, and leaves no job."""
    from tilemask.outputs import OutputLock

    address, _ = cluster
    (tmp_path / "out").mkdir()
    with OutputLock([str(tmp_path / "out" / "s00_mask.tif")]):  # as another run writing it holds it
        for command in ("run", "submit"):
            refused = run_cli(command, scenes_workflow, "--scheduler", address, cwd=tmp_path)
            assert refused.returncode == 2, refused.stderr
            assert refused.stderr.strip() == (f"tilemask: error: output {tmp_path / 'out' / 's00_mask.tif'} is being "
                                              "written by another tilemask run")  # fmt: skip
    assert not (tmp_path / "out" / ".tilemask").exists() and run_cli("jobs", "--json").stdout.strip() == "[]"

def test_a_submit_interrupted_while_it_hands_over_the_driver_leaves_no_job_running(scenes_workflow, tmp_path):
    """Ctrl-C while the scheduler takes the driver (here 3 s, a slow scheduler; usually 50 ms): submit said
    "interrupted", exit 130, and the job ran anyway (a reviewer's). Now the driver is taken back."""
    with dask_cluster(tmp_path, 1, "--preload", REPO / "tests" / "slow_scheduler.py") as (address, _):
        submitter = subprocess.Popen(
            [BIN / "tilemask", "submit", scenes_workflow, "--scheduler", address],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        statuses = tmp_path / "out" / ".tilemask" / "jobs"

        def queued() -> bool:
            found = list(statuses.glob("*/status.json")) if statuses.exists() else []
            return bool(found) and json.loads(found[0].read_text())["state"] == "queued"

        wait_for(queued, "submit to hand the driver over")
        time.sleep(1.0)  # the scheduler is still taking the graph
        submitter.send_signal(signal.SIGINT)
        out, err = submitter.communicate(timeout=60)
        assert (submitter.returncode, err.strip()) == (130, "tilemask: interrupted"), (out, err)
        job = json.loads(next(statuses.glob("*/status.json")).read_text())["job"]
        time.sleep(8)  # a driver left running would have finished items by now (about a second each)
        final = status(job, tmp_path)
        assert final["state"] == "cancelled" and final["counts"]["ok"] == 0, final
        assert not any((tmp_path / "out").glob("*_mask.tif"))


def test_a_queued_job_says_its_driver_waits_for_a_worker(scenes_workflow, tmp_path):
    """A job submitted to a scheduler without workers read ``queued`` and nothing more, for ever; docs/jobs.md says
    ``tilemask status`` shows it "with 'its driver waits for a Dask worker'", as it did only for a driver held again
    after its worker died."""
    with dask_cluster(tmp_path, 0) as (address, _):  # a scheduler without workers
        job = submit(scenes_workflow, address)
        summary = status(job, tmp_path)
        assert (summary["state"], summary["message"]) == ("queued", "its driver waits for a Dask worker"), summary
        shown = run_cli("status", job, cwd=tmp_path).stdout.splitlines()
        assert shown[:2] == [f"job {job}: queued, 0 of 12 items ok, 0 failed, 12 pending",
                             "  its driver waits for a Dask worker"], shown  # fmt: skip
        assert run_cli("cancel", job, cwd=tmp_path).returncode == 0


def test_cancel_of_a_job_no_worker_has_started_answers_at_once(scenes_workflow, tmp_path):
    """A queued job (a scheduler without workers): its driver cannot see the request, and cancel waited out
    its whole --wait (60 s) before it said "cancelled"."""
    with dask_cluster(tmp_path, 0) as (address, _):  # a scheduler without workers
        job = submit(scenes_workflow, address)
        assert status(job, tmp_path)["state"] == "queued"
        # queued, it has begun no input yet, and it is still not another workflow's to take
        other = yaml.safe_load(scenes_workflow.read_text()) | {"output": {"path": "other/{stem}.tif"}}
        (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
        taken = run_cli("run", tmp_path / "other.yaml", "--job-dir", status(job, tmp_path)["folder"], cwd=tmp_path)
        assert taken.returncode == 2 and "holds the job of another workflow" in taken.stderr, taken.stderr
        started = time.monotonic()
        done = run_cli("cancel", job, cwd=tmp_path)
        assert done.returncode == 0 and done.stdout.strip() == f"job {job}: cancelled", (done.stdout, done.stderr)
        assert time.monotonic() - started < 20
        final = json.loads((Path(status(job, tmp_path)["folder"]) / "status.json").read_text())
        assert final["state"] == "cancelled" and final["message"] == "cancelled before its driver started", final
