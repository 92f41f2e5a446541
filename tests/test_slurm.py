"""``tilemask run --cluster slurm`` on a real single-node SLURM (Debian's ``slurm-wlm`` and ``munge``):
``slurmctld`` and ``slurmd`` on loopback with free ports, started and stopped here.  Slow."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

import tilemask
from tilemask import Workflow

from .conftest import REPO, _free_port, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _need(program: str) -> str:
    path = shutil.which(program) or (f"/usr/sbin/{program}" if os.path.exists(f"/usr/sbin/{program}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (.ci/run installs slurm-wlm and munge)")
        pytest.skip(f"{program} is not installed (apt-get install slurm-wlm munge)")
    return path


@pytest.fixture
def slurm(tmp_path):
    """munged (if not running), slurmctld and slurmd on 127.0.0.1; yields the environment to reach them."""
    munged, slurmctld, slurmd = _need("munged"), _need("slurmctld"), _need("slurmd")
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        subprocess.run([munged, "--force"], check=True)
    root = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True)
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=tilemask", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "AuthType=auth/munge", "CredType=cred/munge",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "ReturnToService=2",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "PartitionName=short Nodes=ALL MaxTime=00:30:00 State=UP", "",
    ]))  # fmt: skip
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen([slurmctld, "-D", "-f", conf], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([slurmd, "-D", "-f", conf], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM did not come up; logs in {root}")
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def test_a_run_on_slurm_workers_equals_the_embedded_cluster(slurm, tmp_path, client):
    config = tmp_path / "dask-config"
    config.mkdir()
    logs = tmp_path / "slurm-logs"
    (config / "jobqueue.yaml").write_text(yaml.safe_dump({"jobqueue": {"slurm": {
        "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:10:00", "python": sys.executable,
        "scheduler-options": {"host": "127.0.0.1"}, "worker-extra-args": ["--host", "127.0.0.1"],
        "log-directory": str(logs), "local-directory": str(tmp_path / "scratch"),
    }}}))  # fmt: skip
    workflow = yaml.safe_load((REPO / "workflows" / "demo_landsat.yaml").read_text())
    workflow["input"] = str(REPO / "workflows" / "demo" / "RGB.byte.tif")
    workflow["model"]["weights"] = str(REPO / "workflows" / "demo" / "landsat_water_land_cloud.pt")
    workflow["inference"]["device"] = "cpu"
    workflow["output"] = {"path": "slurm/{stem}_mask.tif", "chunks": 256}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow))

    done = run_cli("run", path, "--cluster", "slurm", "--workers", "2", cwd=tmp_path, env={**slurm, "DASK_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr
    (dashboard,) = re.findall(r"dask dashboard: (\S+)", done.stdout)
    assert dashboard.startswith("http://127.0.0.1:") and ":8787/" not in dashboard, "a free port, not dask-jobqueue's 8787"
    worker_logs = sorted(logs.glob("*.err"))
    assert len(worker_logs) == 2, "two SLURM jobs, one worker each"
    assert all("Start worker" in log.read_text() for log in worker_logs)

    def squeue() -> list[str]:  # the state of each job in the queue
        return subprocess.run(["squeue", "-h", "-o", "%T"], env=slurm, capture_output=True, text=True).stdout.split()

    states = squeue()  # the command exits as soon as it has cancelled them: a job may still be completing
    assert set(states) <= {"COMPLETING"}, f"the jobs are cancelled when the run ends: {states}"
    deadline = time.monotonic() + 30
    while squeue() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert squeue() == [], "and they leave the queue"

    local = Workflow.from_dict({**workflow, "output": {"path": "local/{stem}_mask.tif", "chunks": 256}}, base_dir=tmp_path)
    (expected,) = tilemask.run(local, client)
    with rasterio.open(tmp_path / "slurm" / "RGB.byte_mask.tif") as a, rasterio.open(expected.outputs[0]) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def demo_with_jobqueue(tmp_path: Path, slurm: dict) -> tuple[Path, Path]:
    """The demo workflow (outputs in tmp_path/out) and a Dask config folder whose ``jobqueue.slurm`` is ``slurm``."""
    config = tmp_path / "dask-config"
    config.mkdir()
    (config / "jobqueue.yaml").write_text(yaml.safe_dump({"jobqueue": {"slurm": slurm}}))
    workflow = yaml.safe_load((REPO / "workflows" / "demo_landsat.yaml").read_text())
    workflow["input"] = str(REPO / "workflows" / "demo" / "RGB.byte.tif")
    workflow["model"]["weights"] = str(REPO / "workflows" / "demo" / "landsat_water_land_cloud.pt")
    workflow["output"] = {"path": "out/{stem}_mask.tif"}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow))
    return path, config


def test_slurm_without_jobqueue_settings_is_a_one_line_usage_error(tmp_path):
    path, config = demo_with_jobqueue(tmp_path, {"cores": None, "memory": None})
    done = run_cli("run", path, "--cluster", "slurm", "--quiet", cwd=tmp_path, env={"DASK_CONFIG": str(config)})
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tilemask: error: --cluster slurm:") and "jobqueue.slurm" in line
    assert not (tmp_path / "out").exists(), "refused before the job's folder is made"


def test_a_slurm_that_sbatch_cannot_reach_is_one_line_at_once(tmp_path):
    """sbatch failing ("Could not establish a configuration source") was a logged traceback from dask-jobqueue's
    callback, then a 60 s wait, then "no Dask worker joined the cluster", exit 1."""
    _need("sbatch")
    path, config = demo_with_jobqueue(tmp_path, {"cores": 1, "memory": "2GB"})
    (tmp_path / "slurm.conf").write_text("ClusterName=nowhere\n")  # no controller: sbatch gives up at once
    env = {"DASK_CONFIG": str(config), "SLURM_CONF": str(tmp_path / "slurm.conf")}
    started = time.monotonic()
    done = run_cli("run", path, "--cluster", "slurm", cwd=tmp_path, env=env)
    assert time.monotonic() - started < 40
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tilemask: error: --cluster slurm: sbatch refused the worker job: "), line
    assert "No SlurmctldHost defined" in line
    assert not (tmp_path / "out" / "RGB.byte_mask.tif").exists()


def test_worker_job_options_that_sbatch_itself_refuses_are_a_usage_error(tmp_path):
    """A ``walltime: bogus``, or an unknown option or a ``--gres`` in ``job-extra-directives``, is refused by sbatch
    before it asks the controller ("Invalid --time specification", "unrecognized option"): settings, exit 2, as a
    partition the controller does not have; they were exit 1, as a SLURM that cannot be reached (for now) is."""
    _need("sbatch")
    # a controller named but not there: sbatch reads the job's options first, and refuses these at once
    conf = f"ClusterName=nowhere\nSlurmctldHost=localhost\nSlurmctldPort={_free_port()}\n"
    (tmp_path / "slurm.conf").write_text(conf)
    refusals = [({"walltime": "bogus"}, "error: Invalid --time specification"),
                ({"job-extra-directives": ["--bogus"]}, "unrecognized option '--bogus'"),
                ({"job-extra-directives": ["--gres=gpu:1"]}, "error: Invalid generic resource")]
    for n, (setting, said) in enumerate(refusals):
        folder = tmp_path / f"case{n}"
        folder.mkdir()
        path, config = demo_with_jobqueue(folder, {"cores": 1, "memory": "2GB", **setting})
        env = {"DASK_CONFIG": str(config), "SLURM_CONF": str(tmp_path / "slurm.conf")}
        done = run_cli("run", path, "--cluster", "slurm", "--quiet", cwd=folder, env=env, timeout=60)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"tilemask: error: --cluster slurm: sbatch refused the worker job: {said}"), line
        assert line.endswith("set the Dask config jobqueue.slurm (see cluster/slurm.yaml)"), line
        assert not (folder / "out" / "RGB.byte_mask.tif").exists()


def test_a_worker_job_that_slurm_refuses_for_its_settings_is_a_usage_error(slurm, tmp_path):
    """A partition the cluster does not have is a setting (exit 2), as a missing ``cores`` is; it was exit 1, as a
    SLURM that cannot be reached is (a reviewer's). The line gives SLURM's reason and where the setting lives."""
    path, config = demo_with_jobqueue(tmp_path, {"cores": 1, "memory": "2GB", "queue": "nosuchpartition"})
    done = run_cli("run", path, "--cluster", "slurm", cwd=tmp_path, env={**slurm, "DASK_CONFIG": str(config)})
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tilemask: error: --cluster slurm: sbatch refused the worker job: "), line
    assert "invalid partition" in line.lower() and "jobqueue.slurm" in line, line
    assert not (tmp_path / "out" / "RGB.byte_mask.tif").exists()


def test_ctrl_c_of_a_slurm_run_is_an_interrupt_and_cancels_its_jobs(slurm, tmp_path):
    """Importing dask-jobqueue had set SIGINT's handler to ``sys.exit()``: a Ctrl-C of a ``--cluster slurm`` run
    exited 0 with nothing said, the job recorded as failed (a reviewer's, at 4, 7 and 25 s). It is exit 130, one
    line, and the worker jobs leave the queue."""
    path, config = demo_with_jobqueue(tmp_path, {
        "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:10:00", "python": sys.executable,
        "scheduler-options": {"host": "127.0.0.1"}, "worker-extra-args": ["--host", "127.0.0.1"],
        "log-directory": str(tmp_path / "slurm-logs"), "local-directory": str(tmp_path / "scratch"),
    })  # fmt: skip
    env = {**os.environ, **slurm, "DASK_CONFIG": str(config)}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "tilemask"), "run", str(path), "--cluster", "slurm",
                             "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip

    def squeue() -> list[str]:
        return subprocess.run(["squeue", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()

    deadline = time.monotonic() + 120
    while "RUNNING" not in squeue() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None and "RUNNING" in squeue(), "a worker job running before the Ctrl-C"
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr.strip().splitlines()[-1:]) == (130, ["tilemask: interrupted"]), stderr
    assert not (tmp_path / "out" / "RGB.byte_mask.tif").exists()
    deadline = time.monotonic() + 30
    while squeue() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert squeue() == [], "its worker jobs are cancelled"


def test_slurm_worker_jobs_that_die_at_once_are_named_with_where_they_logged(slurm, tmp_path):
    """A worker job that cannot start (a wrong ``python``) left 60 s of silence, then "no Dask worker joined",
    naming neither SLURM nor where its jobs wrote why (a reviewer's). The line names the jobs and their logs."""
    logs = tmp_path / "slurm-logs"
    path, config = demo_with_jobqueue(tmp_path, {
        "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:10:00", "python": str(tmp_path / "no-python"),
        "scheduler-options": {"host": "127.0.0.1"}, "log-directory": str(logs),
    })  # fmt: skip
    env = {**slurm, "DASK_CONFIG": str(config), "DASK_TILEMASK__NO_WORKERS_TIMEOUT": "10"}
    done = run_cli("run", path, "--cluster", "slurm", "--quiet", cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert re.fullmatch(rf"tilemask: error: no Dask worker joined the cluster at \S+ within 10 s; its SLURM worker "
                        rf"jobs \((\d+)\) wrote their output to {re.escape(str(logs))}", line), line  # fmt: skip
    (job_id,) = re.findall(r"jobs \((\d+)\)", line)
    assert "no-python" in (logs / f"dask-worker-{job_id}.err").read_text()


def test_jobs_over_the_partitions_time_limit_are_named_with_slurms_reason(slurm, tmp_path):
    """A reviewer's: a walltime over the partition's MaxTime, which ``sbatch --test-only`` accepts (the partitions
    do not enforce their limits at submission), left the jobs pending for ever: ``run`` failed after 60 s naming an
    empty log folder, and a submitted job read ``queued`` with no word why. ``run`` is refused within seconds (exit
    2) with SLURM's reason, its worker jobs cancelled; ``status`` of the submitted job gives the reason.  (SLURM
    said PartitionConfig once in CI, where it says PartitionTimeLimit here: its check of the partition's limits
    failed on another of them first; either is a job SLURM will not start as submitted.)"""
    path, env = _slurm_submit_setup(tmp_path, slurm, jobqueue={"walltime": "02:00:00", "queue": "short"})
    started = time.monotonic()
    done = run_cli("run", path, "--cluster", "slurm", "--quiet", cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert re.fullmatch(r"tilemask: error: --cluster slurm: SLURM will not start the worker jobs as configured "
                        r"\(squeue's reason: \d+ Partition(TimeLimit|Config)\): set the Dask config jobqueue\.slurm \(walltime, "
                        r"queue, cores, memory\) within the partition's limits \(scontrol show partition\)", line), line
    assert time.monotonic() - started < 40
    _wait_until(lambda: _squeue(env) == [], 30, f"its worker jobs are cancelled: {_squeue(env)}")

    done = run_cli("submit", path, "--cluster", "slurm", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().splitlines()[-1]
    status = _wait_until(lambda: (s := _status(job, env, tmp_path))["message"].endswith("submit it again") and s, 30,
                         "status gives SLURM's reason")  # fmt: skip
    assert status["state"] == "queued"
    assert re.search(r"is pending and SLURM will not start it as submitted \(Partition(TimeLimit|Config)\)",
                     status["message"]), status
    assert run_cli("cancel", job, cwd=tmp_path, env=env).returncode == 0
    assert _squeue(env) == []


def _slurm_submit_setup(tmp_path: Path, slurm: dict, driver: dict | None = None,
                        jobqueue: dict | None = None) -> tuple[Path, dict]:
    """The demo workflow and the environment of a ``submit --cluster slurm``: worker jobs of one core that reach
    their scheduler on loopback (and ``jobqueue``'s settings), and ``driver`` as ``tilemask.slurm-driver``."""
    path, config = demo_with_jobqueue(tmp_path, {
        "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:10:00", "python": sys.executable,
        "scheduler-options": {"host": "127.0.0.1"}, "worker-extra-args": ["--host", "127.0.0.1"],
        "log-directory": str(tmp_path / "slurm-logs"), "local-directory": str(tmp_path / "scratch"),
        **(jobqueue or {}),
    })  # fmt: skip
    if driver:
        (config / "tilemask.yaml").write_text(yaml.safe_dump({"tilemask": {"slurm-driver": driver}}))
    return path, {**slurm, "DASK_CONFIG": str(config)}


def _squeue(env: dict) -> list[str]:
    """``job-id:state`` of each job in the queue."""
    return subprocess.run(["squeue", "-h", "-o", "%i:%T"], env={**os.environ, **env}, capture_output=True,
                          text=True).stdout.split()  # fmt: skip


def _status(job: str, env: dict, cwd: Path) -> dict:
    done = run_cli("status", job, "--json", cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _wait_until(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (answer := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.5)
    return answer


def test_submit_to_slurm_is_a_driver_job_that_outlives_the_submit_and_equals_a_plain_run(slurm, tmp_path, client):
    """``submit --cluster slurm`` sbatches a driver job (``tilemask drive`` of the job folder, whose SLURMCluster
    starts the worker jobs) and exits at once; ``status`` follows the driver job to ``done``, the labels equal a
    plain run's, and no SLURM job is left."""
    path, env = _slurm_submit_setup(tmp_path, slurm)
    started = time.monotonic()
    done = run_cli("submit", path, "--cluster", "slurm", "--set", "inference.device=cpu", cwd=tmp_path, env=env)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{12}", job), done.stdout
    assert took < 20, f"submit waits for nothing but sbatch ({took:.1f} s)"
    record = json.loads((tmp_path / "out" / ".tilemask" / "jobs" / job / "status.json").read_text())
    slurm_job = record["slurm_job"]
    assert slurm_job.isdigit() and any(line.startswith(f"{slurm_job}:") for line in _squeue(env)), _squeue(env)
    assert _status(job, env, tmp_path)["state"] in ("queued", "running")

    final = _wait_until(lambda: (s := _status(job, env, tmp_path))["state"] not in ("queued", "running") and s, 240,
                        "the job ends")  # fmt: skip
    log = tmp_path / "out" / ".tilemask" / "jobs" / job / f"driver-{slurm_job}.log"
    assert final["state"] == "done", (final, log.read_text() if log.exists() else "no driver log")
    assert (final["counts"]["ok"], final["counts"]["failed"]) == (1, 0)
    assert len(list((tmp_path / "slurm-logs").glob("*.err"))) == 1, "one worker job, started by the driver job"
    _wait_until(lambda: _squeue(env) == [], 60, f"no SLURM job is left: {_squeue(env)}")

    workflow = yaml.safe_load(path.read_text())
    workflow["inference"]["device"] = "cpu"
    local = Workflow.from_dict({**workflow, "output": {"path": "local/{stem}_mask.tif"}}, base_dir=tmp_path)
    (expected,) = tilemask.run(local, client)
    with rasterio.open(tmp_path / "out" / "RGB.byte_mask.tif") as a, rasterio.open(expected.outputs[0]) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def test_a_job_folder_with_a_space_is_submitted_and_logs_there(slurm, tmp_path):
    """The driver job's ``#SBATCH -o`` names the job folder: one with a space (an output folder ``my out``) was
    cut there by sbatch ("Invalid directive found in batch script"), exit 1, so no such job could be submitted."""
    path, env = _slurm_submit_setup(tmp_path, slurm)
    workflow = yaml.safe_load(path.read_text())
    workflow["output"] = {"path": "my out/{stem}_mask.tif", "quicklook": False}
    path.write_text(yaml.safe_dump(workflow))
    done = run_cli("submit", path, "--cluster", "slurm", "--set", "inference.device=cpu", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().splitlines()[-1]
    folder = tmp_path / "my out" / ".tilemask" / "jobs" / job
    slurm_job = json.loads((folder / "status.json").read_text())["slurm_job"]
    final = _wait_until(lambda: (s := _status(job, env, tmp_path))["state"] not in ("queued", "running") and s, 240,
                        "the job ends")  # fmt: skip
    assert final["state"] == "done", final
    assert (folder / f"driver-{slurm_job}.log").exists(), sorted(p.name for p in folder.iterdir())
    _wait_until(lambda: _squeue(env) == [], 60, f"no SLURM job is left: {_squeue(env)}")


@pytest.mark.parametrize("here", ["slurm", "no slurm"])
def test_cancel_of_a_slurm_job_scancels_its_driver_and_workers_and_the_job_resumes(slurm, tmp_path, here):
    """``cancel`` of a running ``submit --cluster slurm`` job scancels its driver job (SIGTERM: it stops as Ctrl-C
    stops a run, and its SLURMCluster cancels the worker jobs): the queue empties, the job reads ``cancelled``, and
    ``tilemask run`` of the workflow resumes it to ``done``.  Thirty scenes: with the demo's one, its worker could
    finish the job in the seconds between its SLURM job running and the cancel.  Where ``scancel`` cannot reach
    SLURM (``no slurm``), the driver stops at the job folder's request all the same: ``cancel`` said "scancel
    failed", exit 1, for a job it had cancelled (a review)."""
    path, env = _slurm_submit_setup(tmp_path, slurm)
    (tmp_path / "scenes").mkdir()
    for i in range(30):
        shutil.copy(REPO / "workflows" / "demo" / "RGB.byte.tif", tmp_path / "scenes" / f"s{i:02d}.tif")
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "input": str(tmp_path / "scenes" / "*.tif")}))
    done = run_cli("submit", path, "--cluster", "slurm", "--set", "inference.device=cpu", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().splitlines()[-1]
    _wait_until(lambda: [s for s in _squeue(env) if s.endswith(":RUNNING")][1:], 120, "driver and worker jobs run")
    elsewhere = {**env, "SLURM_CONF": str(tmp_path / "no" / "slurm.conf")} if here == "no slurm" else env
    cancelled = run_cli("cancel", job, cwd=tmp_path, env=elsewhere)
    assert (cancelled.returncode, cancelled.stdout.strip(), cancelled.stderr) == (0, f"job {job}: cancelled", "")
    _wait_until(lambda: _squeue(env) == [], 60, f"no SLURM job is left: {_squeue(env)}")
    assert _status(job, env, tmp_path)["state"] == "cancelled"
    assert len(list((tmp_path / "out").glob("*_mask.tif"))) < 30

    again = run_cli("run", path, "--set", "inference.device=cpu", "--quiet", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert _status(job, env, tmp_path)["state"] == "done"
    assert len(list((tmp_path / "out").glob("*_mask.tif"))) == 30


def test_a_pending_slurm_driver_job_is_queued_and_cancel_takes_it_out_of_the_queue(slurm, tmp_path):
    """A driver job SLURM holds back (here: not before an hour from now) is ``queued``, saying so; ``cancel``
    takes it out of the queue and records the job cancelled."""
    path, env = _slurm_submit_setup(tmp_path, slurm, {"job-extra-directives": ["--begin=now+3600"]})
    done = run_cli("submit", path, "--cluster", "slurm", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().splitlines()[-1]
    status = _status(job, env, tmp_path)
    assert status["state"] == "queued" and "is pending" in status["message"], status
    assert [s.split(":")[1] for s in _squeue(env)] == ["PENDING"]
    cancelled = run_cli("cancel", job, cwd=tmp_path, env=env)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"job {job}: cancelled"), cancelled.stderr
    assert _squeue(env) == []
    assert _status(job, env, tmp_path)["state"] == "cancelled"


@pytest.mark.parametrize(
    ("driver", "key"),
    [({"cores": 0}, "cores"), ({"memory": "lots"}, "memory"), ({"job-extra-directives": "--gres=gpu:1"},
                                                                 "job-extra-directives")],
)
def test_a_driver_job_setting_that_is_no_setting_is_one_line_before_any_job(tmp_path, driver, key):
    """``tilemask.slurm-driver`` is checked before ``sbatch`` is asked and before the job's folder is made: exit 2
    naming the key, and nothing left that looks like a job (no SLURM here: none is asked)."""
    path, env = _slurm_submit_setup(tmp_path, {}, driver)
    done = run_cli("submit", path, "--cluster", "slurm", cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"tilemask: error: --cluster slurm: tilemask.slurm-driver.{key} is "), line
    assert not done.stdout.strip(), "no job id printed"
    assert not (tmp_path / "out").exists(), "refused before the job's folder is made"


def test_submit_workers_without_a_slurm_cluster_is_refused(tmp_path):
    path, env = _slurm_submit_setup(tmp_path, {})
    done = run_cli("submit", path, "--scheduler", "tcp://127.0.0.1:1", "--workers", "2", cwd=tmp_path, env=env)
    assert done.returncode == 2 and "--workers applies to --cluster slurm" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_pending_driver_job_without_a_reason_yet_says_no_none(monkeypatch):
    """squeue gives the reason ``None`` for a job it has not yet considered (a driver job just released):
    ``tilemask status`` said "its driver job, SLURM job 2, is pending (None)", as if a value were missing (a review
    of a submit of 227 inputs)."""
    from tilemask import slurm
    from tilemask.job_commands import _pending_reason

    monkeypatch.setattr(slurm, "pending_reasons", lambda ids: dict.fromkeys(ids, "None"))
    assert _pending_reason("2") == ""
    monkeypatch.setattr(slurm, "pending_reasons", lambda ids: dict.fromkeys(ids, "Resources"))
    assert _pending_reason("2") == " (Resources)"
