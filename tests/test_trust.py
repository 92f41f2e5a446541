"""Trust on first contact: no data lost, nothing that looks finished after a failure, nothing hangs.

Every test runs the real thing: the installed ``tilemask`` command, embedded or
real ``dask scheduler`` / ``dask worker`` processes, a range HTTP server in its
own process, tmpfs mounts for a full or read-only disk, real signals.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import nibabel as nib
import numpy as np
import pandas as pd
import psutil
import pytest
import rasterio
import torch
import yaml
import zarr
from rasterio.control import GroundControlPoint

import tilemask
from tilemask import Workflow
from tilemask.errors import InputError, ReadError, WeightsError, WorkflowError

from .conftest import (
    GEO,
    REPO,
    UNET_2D,
    UNET_3D,
    _free_port,
    raster_workflow,
    run_cli,
    start_scheduler,
    volume_workflow,
)

EXE = str(Path(sys.executable).parent / "tilemask")


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith(("tilemask: error:", "tilemask: interrupted")), lines[0]
    return lines[0]


def hidden(folder: Path) -> list[str]:
    """Hidden files in ``folder`` but the job records (``.tilemask/jobs``): what a run staged and left."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".tilemask") if folder.exists() else []


def outputs_in(folder: Path) -> list[str]:
    """The files in ``folder`` but the job records (``.tilemask/jobs``)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".tilemask") if folder.exists() else []


def start(args, cwd, env=None) -> subprocess.Popen:
    """``tilemask ARGS`` in its own process group, as a terminal would run it."""
    return subprocess.Popen(
        [EXE, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def in_session(sid: int) -> list[str]:
    """The processes still in session ``sid`` (a command started by :func:`start`, and its children)."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(OSError):
            if os.getsid(p.info["pid"]) == sid:
                left.append(" ".join(p.info["cmdline"] or []))
    return left


def wait_for(predicate, timeout=100.0, what="condition", proc: subprocess.Popen | None = None):
    """Poll ``predicate``; fail (never hang) after ``timeout`` s or as soon as ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def big_run(make_raster, make_model, write_workflow, tmp_path):
    """A workflow that runs for some seconds (4000 x 4000, 256 windows) with a float32 probabilities COG.

    Its backend is torch, not ``auto``: the tests compare a resumed or disturbed run's output with a clean run's bit
    for bit, and ``auto`` measures once the session's jobs of this network add up to 15 s in torch, which may fall
    between two of a test's runs; measured, it runs this network's batches in torch-mkldnn, 1e-7 away (a CI run
    failed so, its clean run 1 ulp from the resumed one in a fifth of the probabilities).  The session's
    ``TILEMASK_AUTO_MEASURE_AFTER=inf`` (conftest) keeps auto from measuring too; this holds without it."""
    path, _ = make_raster((3, 4000, 4000), name="big.tif")
    weights, _ = make_model()

    def make(output="out/{stem}_mask.tif", roi=256, **sections):
        workflow = raster_workflow(path, weights, **sections)
        workflow["inference"].update(roi_size=[roi, roi], overlap=0.0, batch_size=8, backend="torch")
        workflow["output"] = {"path": output, "probabilities": "float32", "chunks": 1024, "quicklook": False}
        return write_workflow(workflow)

    return make


# -- data loss ----------------------------------------------------------------------------------


@pytest.mark.slow  # 19 s in a loaded default run (2026-12-07)
def test_output_equal_to_input_is_refused_and_the_input_kept(make_raster, make_model, write_workflow, tmp_path):
    path, data = make_raster(name="scene.tif")
    weights, _ = make_model()
    before = path.read_bytes()
    for output in (str(path), str(tmp_path / "{stem}.tif")):
        wf = write_workflow(raster_workflow(path, weights, output={"path": output}))
        result = run_cli("run", wf, "--quiet", "--overwrite")
        assert result.returncode == 2, result.stderr
        assert "is the input" in one_line(result.stderr)
    assert path.read_bytes() == before


def test_zarr_input_inside_the_output_is_refused(make_model, write_workflow, tmp_path):
    image = tmp_path / "data.zarr"
    arr = zarr.create_array(str(image), shape=(3, 64, 80), chunks=(3, 64, 80), dtype="float32")
    arr[:] = np.random.default_rng(0).random((3, 64, 80), dtype=np.float32)
    weights, _ = make_model()
    wf = write_workflow(raster_workflow(image, weights, output={"path": str(image)}))
    result = run_cli("run", wf, "--quiet", "--overwrite")
    assert result.returncode == 2 and "is the input" in one_line(result.stderr)
    np.testing.assert_array_equal(zarr.open_array(str(image), mode="r").shape, (3, 64, 80))


@pytest.mark.slow  # 15 s in a loaded default run (2026-12-07)
def test_existing_output_needs_overwrite_and_foreign_folders_are_never_replaced(
    make_raster, make_model, write_workflow, tmp_path, client
):
    path, _ = make_raster()
    weights, _ = make_model()
    wf = Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path)
    (first,) = tilemask.run(wf, client)
    out = Path(first.outputs[0])
    (again,) = tilemask.run(wf, client)
    assert again.status == "skipped"  # the same workflow is the same job: it resumes, nothing is redone
    changed = raster_workflow(path, weights, inference={"overlap": 0.5})
    with pytest.raises(tilemask.TilemaskError, match=r"exists; pass overwrite=True to replace it$") as refused:
        tilemask.run(Workflow.from_dict(changed, base_dir=tmp_path), client)  # Python's words (it said --overwrite)
    assert refused.value.exit_status == 2
    result = run_cli("run", write_workflow(changed), cwd=tmp_path)  # and the command's, from the same check
    assert (result.returncode, result.stderr) == (2, f"tilemask: error: output {out} exists; pass --overwrite to "
                                                     "replace it\n")  # fmt: skip
    changed = Workflow.from_dict(changed, base_dir=tmp_path)
    (second,) = tilemask.run(changed, client, overwrite=True)
    assert zarr.open_group(second.outputs[0], mode="r").attrs["tilemask"]["complete"] is True

    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    other = Workflow.from_dict(raster_workflow(path, weights, output={"path": str(foreign)}), base_dir=tmp_path)
    with pytest.raises(tilemask.TilemaskError, match="not written by tilemask"):
        tilemask.run(other, client, overwrite=True)
    assert (foreign / "important.txt").read_text() == "keep me"
    assert hidden(out.parent) == [], "nothing staged may be left"


def test_a_failed_rerun_keeps_the_previous_complete_output(make_model, write_workflow, tmp_path, client):
    scene = tmp_path / "scene.tif"
    shutil.copy(GEO["corrupt.tif"], scene)
    with rasterio.open(scene) as ds:
        count = ds.count
    args = dict(UNET_2D, in_channels=count)
    weights, _ = make_model(args)
    good = tmp_path / "good.tif"
    with rasterio.open(GEO["shade.tif"]) as src:
        profile = src.profile
        data = src.read(1)
    profile.update(count=count, nodata=None)
    with rasterio.open(good, "w", **profile) as dst:
        dst.write(np.stack([data] * count))
    raw = raster_workflow(good, weights, args=args, output={"path": "out/result.zarr", "chunks": 256})
    (first,) = tilemask.run(Workflow.from_dict(raw, base_dir=tmp_path), client)
    labels = zarr.open_group(first.outputs[0], mode="r")["labels"][:]
    raw["input"] = str(scene)  # fails mid-run: truncated tiles
    with pytest.raises(ReadError) as failed:  # the worker's error, its type kept
        tilemask.run(Workflow.from_dict(raw, base_dir=tmp_path), client, overwrite=True)
    assert failed.value.exit_status == 1
    group = zarr.open_group(first.outputs[0], mode="r")
    assert group.attrs["tilemask"]["complete"] is True and group.attrs["tilemask"]["input"] == str(good)
    np.testing.assert_array_equal(group["labels"][:], labels)
    assert hidden(tmp_path / "out") == []


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused(big_run, tmp_path):
    wf = big_run(output="out/{stem}_mask.zarr")
    first = start(["run", wf, "--quiet"], tmp_path)
    try:
        wait_for(lambda: any(n.startswith(".tilemask-lock-") for n in hidden(tmp_path / "out")), what="the lock", proc=first)
        second = run_cli("run", wf, "--quiet", "--overwrite", timeout=120)  # the same job: its lock refuses it
        assert second.returncode == 2, second.stderr
        assert re.fullmatch(r"tilemask: error: job [0-9a-f]{12} is running in another process; see tilemask status [0-9a-f]{12}",
                            one_line(second.stderr)), second.stderr  # fmt: skip
        other = run_cli("run", wf, "--quiet", "--overwrite", "--set", "inference.overlap=0.5", timeout=120)  # another job
        assert other.returncode == 2, other.stderr
        assert "being written by another tilemask run" in one_line(other.stderr)
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
    assert zarr.open_group(str(tmp_path / "out" / "big_mask.zarr"), mode="r").attrs["tilemask"]["complete"] is True
    assert hidden(tmp_path / "out") == []


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_that_reads_as_finished_and_the_next_run_cleans_up(big_run, tmp_path):
    wf = big_run()
    killed = start(["run", wf, "--quiet"], tmp_path)
    out = tmp_path / "out"
    wait_for(lambda: any(n.endswith(".parts") for n in hidden(out)), what="chunk pieces", proc=killed)
    time.sleep(1.0)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (out / "big_mask.tif").exists()
    assert any(n.startswith(".tilemask-lock-") for n in hidden(out)) and len(hidden(out)) > 1
    with pytest.raises(InputError):
        tilemask.open_result(str(out / "big_mask.tif"))
    again = run_cli("run", wf, "--quiet", timeout=600)  # takes over the dead run's lock, removes its pieces
    assert again.returncode == 0, again.stderr
    assert hidden(out) == []
    with rasterio.open(out / "big_mask.tif") as ds:
        assert ds.shape == (4000, 4000)


@pytest.mark.slow
def test_readers_refuse_an_unfinished_zarr(make_raster, make_model, tmp_path, client):
    path, _ = make_raster()
    weights, _ = make_model()
    (result,) = tilemask.run(Workflow.from_dict(raster_workflow(path, weights), base_dir=tmp_path), client)
    unfinished = tmp_path / "unfinished.zarr"
    shutil.copytree(result.outputs[0], unfinished)
    group = zarr.open_group(str(unfinished), mode="r+")
    group.attrs["tilemask"] = {**group.attrs["tilemask"], "complete": False}
    with pytest.raises(InputError, match="unfinished"):
        tilemask.open_result(str(unfinished))
    nobody = f"tcp://127.0.0.1:{_free_port()}"  # refused before any cluster: no scheduler listens there
    stats = run_cli("stats", unfinished, "-o", tmp_path / "s.csv", "--scheduler", nobody)
    assert stats.returncode != 0 and "unfinished" in one_line(stats.stderr)
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    "sig,when",
    [
        (signal.SIGINT, "inference"),
        pytest.param(signal.SIGTERM, "inference", marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, "assembly", marks=pytest.mark.slow),
    ],
)
@pytest.mark.slow  # 17 s in a loaded default run (2026-12-07)
def test_interrupts_exit_130_leave_nothing_and_print_one_line(big_run, tmp_path, sig, when):
    wf = big_run()
    proc = start(["run", wf, "--quiet"], tmp_path)
    out = tmp_path / "out"
    if when == "inference":
        wait_for(lambda: any(n.endswith(".parts") for n in hidden(out)), what="chunk pieces", proc=proc)
        time.sleep(1.0)
    else:  # the VRT of the pieces is written when the COG assembly starts
        wait_for(lambda: any(p.suffix == ".vrt" for p in out.glob(".tilemask-*.parts/*")), what="COG assembly", proc=proc)
    signals = _signal_sets(proc.pid)  # for the message below: whether the run caught or ignored the signal
    os.killpg(proc.pid, sig)  # the whole process group, as a terminal's Ctrl-C does
    sent = time.monotonic()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:  # still running: was the signal left pending, blocked by every thread?
        with contextlib.suppress(OSError):
            signals += f"; 3 s after it: {_signal_sets(proc.pid, threads=True)}"
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (f"exit {proc.returncode} {time.monotonic() - sent:.1f} s after the signal; "
                                    f"{signals}; stdout {stdout!r}; stderr {stderr!r}")  # fmt: skip
    assert one_line(stderr) == "tilemask: interrupted"
    assert only_staged_by_its_job(out), "an interrupted run leaves nothing but its job's staged chunks"


@pytest.mark.slow  # five commands interrupted at set moments of their start (9-14 s)
def test_ctrl_c_while_the_command_starts_is_an_interrupt_not_click_aborting(make_raster, make_model, write_workflow,
                                                                            tmp_path):  # fmt: skip
    """Ctrl-C in a command's first second or so (its logging set up, ``distributed`` imported) reached click,
    which printed ``Aborted!`` and exited 1, as for a failure (a reviewer's ``submit`` at 0.6-1.5 s); while the
    embedded cluster started it killed the half-started worker processes (their import tracebacks, then
    distributed's ``AssertionError: Status.init`` at exit). Now it is 130 and one line at every moment; before
    tilemask's own code runs (Python's imports) Python dies of the signal, which a shell reports as 130 too.
    The scene is big enough (seconds of windows) that the last signal still lands before its labels are in place:
    a scene of 90 x 120 was done by 2.5 s in a CI run, and stopping then waited for it to publish, as it should."""
    path, _ = make_raster((3, 1200, 1600))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights, output={"path": "out/{stem}.zarr"}))
    seen = []
    for after in (0.4, 0.8, 1.4, 2.0, 2.5):
        proc = start(["run", workflow, "--quiet"], tmp_path)
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        seen.append((after, proc.returncode, stderr.strip() if proc.returncode != -signal.SIGINT else ""))
        # nothing of the run outlives it: the workers' fork server and the workers exit with the command
        wait_for(lambda: not in_session(proc.pid), timeout=15, what=f"the run's processes to exit ({after} s)")
    assert all(rc == -signal.SIGINT or (rc, said) == (130, "tilemask: interrupted") for _, rc, said in seen), seen
    assert any(rc == 130 for _, rc, _ in seen), f"every signal landed in Python's own imports: {seen}"
    assert not (tmp_path / "out" / "scene.zarr").exists()


# ``tilemask ARGS...`` whose Ctrl-C is raised in a gc callback on the main thread, the first time WHEN holds after
# ``distributed`` is imported; the file "raised in the callback" says it was.
SWALLOWED_CTRL_C = """
import gc, os, signal, sys, threading
from tilemask.cli import main

def ctrl_c_in_a_gc_callback(phase, info):  # Python prints what a gc callback raises, "Exception ignored in ...",
    if phase != "stop" or "distributed" not in sys.modules or threading.current_thread() is not threading.main_thread():
        return  # and goes on
    if not (WHEN):
        return
    if not os.path.exists("fired"):
        open("fired", "w").close()
        try:
            signal.raise_signal(signal.SIGINT)  # to this thread: its handler runs before this returns
        except KeyboardInterrupt:
            open("raised in the callback", "w").close()
            raise

gc.callbacks.append(ctrl_c_in_a_gc_callback)
sys.argv[0] = "tilemask"
sys.exit(main())
"""


def test_a_ctrl_c_python_swallows_still_stops_the_run(make_raster, make_model, write_workflow, tmp_path):
    """A Ctrl-C whose ``KeyboardInterrupt`` is raised inside a weakref callback, a ``__del__`` or a gc callback is
    printed by Python as "Exception ignored in ..." and lost: a fresh clone's CI saw one in importlib's module-lock
    callback 0.8 s into a ``run``, which then finished, exit 0, its output written. Here the Ctrl-C is raised in
    a gc callback while ``distributed`` is imported; the run stops as at any other moment."""
    path, _ = make_raster((3, 90, 120))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights, output={"path": "out/{stem}.zarr"}))
    script = SWALLOWED_CTRL_C.replace("WHEN", "True")
    proc = subprocess.run([sys.executable, "-c", script, "run", workflow, "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=100)  # fmt: skip
    assert (tmp_path / "raised in the callback").exists()
    assert (proc.returncode, proc.stderr.strip()) == (130, "tilemask: interrupted")
    assert not (tmp_path / "out" / "scene.zarr").exists()


def test_a_handler_set_outside_python_is_put_back_as_the_default_action():
    """``signal.signal`` returns ``None`` for a handler set from C before Python started (Python embedded in an
    application), which ``signal.signal`` does not take back: restoring it raised ``TypeError`` at the end of a
    command or a cleanup. The default action stands in for it."""
    from tilemask.interrupts import _restore

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _restore({signal.SIGUSR1: None})
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


@pytest.mark.slow  # a whole run with spawned workers (10 s)
def test_a_fork_server_that_cannot_start_leaves_the_workers_spawned(make_raster, make_model, write_workflow, tmp_path):
    """The fork server listens on a Unix socket in the temporary folder, whose path may not be longer than 107
    bytes: under a deep TMPDIR it cannot start, and the run goes on with workers the nanny spawns."""
    path, _ = make_raster((3, 90, 120))
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights, output={"path": "out/{stem}.zarr"}))
    deep = tmp_path / ("t" * max(1, 100 - len(str(tmp_path))))
    deep.mkdir()
    done = run_cli("-vv", "run", workflow, "--quiet", cwd=tmp_path, env={"TMPDIR": str(deep)})
    assert done.returncode == 0, done.stderr
    assert "no fork server for the workers: AF_UNIX path too long" in done.stderr
    assert zarr.open_group(str(tmp_path / "out" / "scene.zarr"), mode="r")["labels"].shape == (90, 120)


@pytest.mark.slow
def test_ctrl_c_while_a_single_input_makes_its_products_lets_them_finish_and_records_it(tmp_path):
    """Past the point of no return (its labels published) an input is finished, products and record, whatever
    stops the run. A run of one input ran it on the main thread, where Ctrl-C cut its polygons short and left
    the labels in place with no record: they looked finished, and the next run redid the input. The demo's
    polygons take seconds after its labels are in place: the signal lands while they are made."""
    out = tmp_path / "out"
    wf = ["run", REPO / "workflows" / "demo_landsat.yaml", "--quiet", "--set", f"output.path={out}/{{stem}}_mask.tif",
          "--set", f"output.vectors={out}/{{stem}}_polygons.gpkg"]  # fmt: skip
    proc = start(wf, tmp_path)
    wait_for(lambda: (out / "RGB.byte_mask.tif").exists(), timeout=300, what="the labels published", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    *waits, last = stderr.strip().splitlines()  # what the stop waits for, said while it waits
    assert last == "tilemask: interrupted", stderr
    # Said where the signal finds the item publishing its labels or making its products. Between the two (the
    # engine's return from publishing) nothing is counted as finishing and nothing is said (stderr was the last
    # line alone once in a fresh clone's CI); the products' waits still do not abandon, and what must hold is
    # that the products and the record are made, as asserted below.
    assert len(waits) <= 1 and all(w.startswith("WARNING tilemask.batch: stopping once 1 item(s) whose labels are in "
                                                "place") for w in waits), stderr  # fmt: skip
    assert len(gpd.read_file(out / "RGB.byte_polygons.gpkg")) > 0 and (out / "RGB.byte_mask.png").exists()
    again = run_cli("run", *wf[1:])
    assert again.returncode == 0, again.stderr
    assert "done in an earlier run" in again.stdout, again.stdout


def _signal_sets(pid: int, threads: bool = False) -> str:
    """The signals process ``pid`` ignores, catches and blocks (its main thread), as ``/proc/PID/status`` lists
    them (hex masks); with ``threads``, also those pending for the process and each thread's blocked set."""
    with open(f"/proc/{pid}/status") as status:
        text = ", ".join(line.strip() for line in status if line.startswith(("SigIgn", "SigCgt", "SigBlk", "ShdPnd")))
    if threads:
        for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
            with open(task / "status") as status:
                fields = dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
            text += f"; {fields.get('Name')} {task.name}: SigBlk {fields.get('SigBlk')} SigPnd {fields.get('SigPnd')}"
    return text


def only_staged_by_its_job(out: Path) -> bool:
    """Nothing in ``out`` but the job's record and the hidden chunks its next run resumes from."""
    (job,) = [p.name for p in (out / ".tilemask" / "jobs").iterdir()]
    left = outputs_in(out)
    return bool(left) and all(name.startswith(f".tilemask-{job}-") for name in left)


@pytest.mark.slow
def test_an_interrupted_input_resumes_writing_only_the_chunks_it_had_not_written(big_run, tmp_path):
    wf = big_run()
    proc = start(["run", wf, "--quiet"], tmp_path)
    out = tmp_path / "out"
    done = lambda: [p for p in out.glob(".tilemask-*.done/*_*.json")]  # noqa: E731
    wait_for(lambda: len(done()) >= 5, what="five chunks written", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    written = len(done())
    assert 5 <= written < 16 and only_staged_by_its_job(out)

    resumed = run_cli("run", wf, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    windows = int(resumed.stdout.split(" windows in ")[0].rsplit(" ", 1)[1])
    assert 0 < windows <= 256 - 16 * written, resumed.stdout  # a chunk of 1024 owns 16 windows of 256
    assert f"windows/s; {written} chunks written in an earlier run) -> " in resumed.stdout, resumed.stdout
    assert hidden(out) == [] and sorted(outputs_in(out)) == ["big_mask.tif", "big_mask.tif.aux.xml", "big_mask_probabilities.tif"]

    clean = run_cli("run", wf, "--quiet", "--set", "output.path=clean/{stem}_mask.tif")
    assert clean.returncode == 0, clean.stderr
    for name in ("big_mask.tif", "big_mask_probabilities.tif"):
        with rasterio.open(out / name) as a, rasterio.open(tmp_path / "clean" / name) as b:
            np.testing.assert_array_equal(a.read(), b.read(), err_msg=name)
    assert resumed.stdout.split("[")[1] == clean.stdout.split("[")[1], "class totals count the chunks written before"


@pytest.mark.slow
@pytest.mark.parametrize("replaced", ["second file", "weights"])
def test_an_interrupted_input_starts_over_when_any_file_it_read_was_replaced(
    make_raster, make_model, write_workflow, tmp_path, replaced
):
    """The record of the chunks written was stamped with the input's first file only: a case read from two files
    whose second was replaced since, or weights retrained at the same path, resumed on the chunks that the old
    file or network had predicted."""
    for channel in range(2):
        make_raster((1, 4000, 4000), name=f"big_{channel:04d}.tif", seed=channel)
    args = dict(UNET_2D, in_channels=2)
    weights, _ = make_model(args)
    workflow = raster_workflow(tmp_path / "big_0000.tif", weights, args=args)
    workflow["input"] = {"channels": [str(tmp_path / "{case}_0000.tif"), str(tmp_path / "{case}_0001.tif")]}
    workflow["inference"].update(roi_size=[256, 256], overlap=0.0, batch_size=8)
    workflow["output"] = {"path": "out/{stem}_mask.tif", "probabilities": "float32", "chunks": 1024, "quicklook": False}
    wf = write_workflow(workflow)
    proc = start(["run", wf, "--quiet"], tmp_path)
    out = tmp_path / "out"
    wait_for(lambda: len(list(out.glob(".tilemask-*.done/*_*.json"))) >= 2, what="two chunks written", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130 and only_staged_by_its_job(out)

    if replaced == "weights":
        make_model(args, seed=7)
    else:
        make_raster((1, 4000, 4000), name="big_0001.tif", seed=9)
    again = run_cli("run", wf, "--quiet")
    assert again.returncode == 0, again.stderr
    windows = int(again.stdout.split(" windows in ")[0].rsplit(" ", 1)[1])
    assert windows == 256, again.stdout  # every window predicted again: nothing kept from the old file or weights


@pytest.mark.slow
def test_chunks_larger_than_the_image_are_clipped_and_booleans_refused(
    make_raster, make_model, write_workflow, tmp_path, client
):
    path, _ = make_raster((3, 120, 90))
    weights, _ = make_model()
    wf = write_workflow(raster_workflow(path, weights))
    result = run_cli("run", wf, "--quiet", "--set", "output.chunks=99999", "--scheduler", client.scheduler.address)
    assert result.returncode == 0, result.stderr
    assert zarr.open_group(str(tmp_path / "out" / "scene_mask.zarr"), mode="r")["labels"].chunks == (120, 90)
    refused = run_cli("run", wf, "--quiet", "--overwrite", "--set", "output.chunks=true")
    assert refused.returncode == 2 and "output.chunks" in one_line(refused.stderr)


# -- silently wrong answers -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["scattered", "corner"])
def test_nan_pixels_are_invalid(make_model, tmp_path, client, where):
    """Only the NaN pixels are invalid: scattered over every block, or in one corner, where the blocks without
    one overlap the chunks of a block with them (all of those chunks' other pixels came out nodata)."""
    rng = np.random.default_rng(0)
    data = (rng.random((3, 150, 170)) * 200).astype("float32")
    rows, cols = (rng.integers(0, 150, 100), rng.integers(0, 170, 100)) if where == "scattered" else np.indices((5, 5))
    flat = np.unique(rows * 170 + cols)
    data[0].flat[flat] = np.nan
    path = tmp_path / "nan.tif"
    with rasterio.open(path, "w", driver="GTiff", height=150, width=170, count=3, dtype="float32",
                       crs="EPSG:32618", transform=rasterio.transform.from_origin(0, 0, 30, 30)) as ds:  # fmt: skip
        ds.write(data)
    weights, _ = make_model()
    wf = Workflow.from_dict(raster_workflow(path, weights, output={"chunks": 64}), base_dir=tmp_path)
    (result,) = tilemask.run(wf, client)
    group = zarr.open_group(result.outputs[0], mode="r")
    labels, probabilities = group["labels"][:], group["probabilities"][:]
    nodata = group.attrs["tilemask"]["nodata"]
    assert nodata == 255
    np.testing.assert_array_equal(np.flatnonzero(labels == nodata), flat)
    assert np.isfinite(probabilities).all() and (probabilities[:, labels == nodata] == 0).all()
    assert sum(result.class_pixels.values()) == labels.size - flat.size


def test_nan_voxels_are_nodata_in_a_nifti_output_and_its_statistics(make_volume, make_model, tmp_path, client):
    """NIfTI has no nodata field: the label of invalid voxels goes in the header's descrip, where tilemask's
    label reader (and so ``stats``) finds it; one NaN voxel counts in no class."""
    import nibabel as nib

    from tilemask.stats import compute_stats

    path, data = make_volume(dtype="float32")
    data[3, 4, 5] = np.nan
    img = nib.load(path)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    weights, _ = make_model(UNET_3D)
    workflow = volume_workflow(path, weights, {}, {"chunks": 16, "probabilities": "none"})
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    out = nib.load(result.outputs[0])
    labels = np.asarray(out.dataobj)
    assert bytes(out.header["descrip"]).rstrip(b"\0") == b"tilemask labels; nodata 255"
    np.testing.assert_array_equal(np.argwhere(labels == 255), [[3, 4, 5]])
    table = pd.read_csv(compute_stats(result.outputs[0], tmp_path / "totals.csv", client=client))
    assert "class_255" not in set(table.iloc[:, 0].astype(str)) and table["voxels"].sum() == labels.size - 1, table


@pytest.mark.slow  # 9 s in a loaded default run (2026-12-07, the 17th session)
def test_gcp_only_raster_is_refused(make_model, write_workflow, tmp_path):
    path = tmp_path / "gcps.tif"
    gcps = [GroundControlPoint(0, 0, 500000, 4000000), GroundControlPoint(0, 99, 503000, 4000000),
            GroundControlPoint(99, 0, 500000, 3997000), GroundControlPoint(99, 99, 503000, 3997000)]  # fmt: skip
    with rasterio.open(path, "w", driver="GTiff", height=100, width=100, count=3, dtype="uint8") as ds:
        ds.write(np.zeros((3, 100, 100), "uint8"))
        ds.gcps = (gcps, rasterio.crs.CRS.from_epsg(32618))
    weights, _ = make_model()
    result = run_cli("run", write_workflow(raster_workflow(path, weights)), "--quiet")
    assert result.returncode == 2 and "ground control points" in one_line(result.stderr)


def scripted_unet(tmp_path, in_channels=3, out_channels=3) -> Path:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    args = dict(UNET_2D, in_channels=in_channels, out_channels=out_channels)
    path = tmp_path / f"unet_{in_channels}_{out_channels}.ts"
    torch.jit.script(UNet(**args).eval()).save(str(path))
    return path


def test_torchscript_channels_come_from_the_network(make_raster, tmp_path, client):
    path, _ = make_raster((3, 100, 120))
    weights = scripted_unet(tmp_path, out_channels=3)
    workflow = raster_workflow(path, weights)
    workflow["model"] = {"network": "UNet", "weights": str(weights)}  # no args: channels from the network
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    group = zarr.open_group(result.outputs[0], mode="r")
    assert group["probabilities"].shape[0] == 3
    assert group.attrs["tilemask"]["classes"] == ["class_0", "class_1", "class_2"]
    assert sum(result.class_pixels.values()) == 100 * 120
    workflow["classes"] = ["land", "water"]
    with pytest.raises(WorkflowError, match="network gives 3 classes") as refused:
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, overwrite=True)
    assert refused.value.exit_status == 2
    workflow.pop("classes")
    workflow["model"]["weights"] = str(scripted_unet(tmp_path, in_channels=1))
    with pytest.raises(WorkflowError, match="rejects a 3-channel window"):
        tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, overwrite=True)


def test_torchscript_of_the_wrong_channels_is_one_line_exit_2(make_raster, write_workflow, tmp_path, client):
    path, _ = make_raster((3, 100, 120))
    workflow = raster_workflow(path, scripted_unet(tmp_path, in_channels=1))
    workflow["model"].pop("args")
    wrong = run_cli("run", write_workflow(workflow), "--quiet", "--scheduler", client.scheduler.address)
    assert wrong.returncode == 2 and "rejects a 3-channel window" in one_line(wrong.stderr)


# -- hangs and dead parts -------------------------------------------------------------------------


def _wait_for_a_worker(address: str) -> None:
    """Until a worker has joined, whatever its status (a paused one too: Client.wait_for_workers counts only
    running workers)."""
    from distributed import Client

    deadline = time.monotonic() + 60
    with Client(address, timeout="60s") as client:
        while not client.scheduler_info()["workers"]:
            assert time.monotonic() < deadline, "no worker joined"
            time.sleep(0.1)


@pytest.mark.slow  # a `dask scheduler` process and a 3 s wait (7 s)
def test_a_cluster_without_workers_fails_with_one_line(make_raster, make_model, write_workflow, tmp_path):
    path, _ = make_raster()
    weights, _ = make_model()
    scheduler, address = start_scheduler(tmp_path)
    try:
        begin = time.monotonic()
        result = run_cli("run", write_workflow(raster_workflow(path, weights)), "--quiet", "--scheduler", address,
                         env={"DASK_TILEMASK__NO_WORKERS_TIMEOUT": "3"}, timeout=120)  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "no Dask worker joined" in one_line(result.stderr)
        assert time.monotonic() - begin < 60
    finally:
        scheduler.kill()


@pytest.mark.slow  # a `dask scheduler`, a paused `dask worker` and a 3 s wait (10 s)
def test_a_cluster_whose_workers_are_all_paused_fails_with_one_line(make_raster, make_model, write_workflow, tmp_path):
    """A reviewer's: a worker whose memory limit left it paused (over distributed.worker.memory.pause) from its
    first tasks ran nothing more, and the run waited for ever; a SIGTERM (timeout's) was held back by the same
    wait. It fails as a cluster without workers does, naming the pause."""
    path, _ = make_raster()
    weights, _ = make_model()
    scheduler, address = start_scheduler(tmp_path)
    paused = {"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "0.05", "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
              "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False"}  # fmt: skip (over 5% of 2 GB: paused at once)
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "dask"), "worker", address, "--nthreads", "2", "--memory-limit", "2GB",
         "--host", "127.0.0.1", "--no-dashboard"],
        stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT, env={**os.environ, **paused},
    )  # fmt: skip
    try:
        _wait_for_a_worker(address)  # a worker that joins after the 3 s is "no Dask worker joined"
        begin = time.monotonic()
        result = run_cli("run", write_workflow(raster_workflow(path, weights)), "--quiet", "--scheduler", address,
                         env={"DASK_TILEMASK__NO_WORKERS_TIMEOUT": "3"}, timeout=120)  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert f"the Dask cluster at {address} has had no worker running tasks for 3 s: its 1 worker(s) are " \
               "paused, over their memory's pause threshold" in one_line(result.stderr)  # fmt: skip
        assert time.monotonic() - begin < 60
        assert "Pausing worker" in (tmp_path / "worker.log").read_text()
    finally:
        worker.kill()
        scheduler.kill()


def _dask_worker(address: str, tmp_path, *options: str, env: dict | None = None) -> subprocess.Popen:
    """A ``dask worker`` process of one thread on 127.0.0.1 (``env`` added to its environment), logging to
    tmp_path/worker.log."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "dask"), "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
         "--no-dashboard", *options], stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


_WITHOUT_TILEMASK = """import sys
class Block:  # as if tilemask were not installed where this worker runs
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tilemask":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.slow  # a `dask scheduler` and a `dask worker` (10 s)
@pytest.mark.parametrize("without", ["worker", "scheduler"])
def test_workers_that_cannot_import_tilemask_are_named_before_a_job_is_made(make_raster, make_model, write_workflow,
                                                                             tmp_path, without):
    """A reviewer's: ``submit`` to workers in an environment without tilemask exited 0; the first worker to take the
    driver could not unpickle it, Dask closed the worker, and the job stayed ``queued`` for ever. ``run`` printed
    ``Exception: ModuleNotFoundError(...)`` and left a failed job. Both now name the worker and the package, exit
    2, and make no job; the worker lives on.  A scheduler without tilemask (it unpickles the graphs) failed ``run``
    with "Error during deserialization of the task graph", and ``submit`` with a bare ModuleNotFoundError after
    making a job that stayed queued; ``tilemask jobs`` then failed as it asked the scheduler about it."""
    path, _ = make_raster()
    weights, _ = make_model()
    workflow = write_workflow(raster_workflow(path, weights))
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(_WITHOUT_TILEMASK)
    blocked = {"PYTHONPATH": str(tmp_path / "blocker")}
    scheduler, address = start_scheduler(tmp_path, env=blocked if without == "scheduler" else None)
    worker = _dask_worker(address, tmp_path, env=blocked if without == "worker" else None)
    try:
        from distributed import Client

        with Client(address, timeout="60s") as c:
            c.wait_for_workers(1, timeout=60)
            worker_address = next(iter(c.nthreads()))
        for command in ("run", "submit"):
            result = run_cli(command, workflow, "--scheduler", address, timeout=120)
            assert result.returncode == 2, result.stderr
            assert one_line(result.stderr) == ((
                f"tilemask: error: Dask worker {worker_address} cannot import tilemask (ModuleNotFoundError: No module "
                "named 'tilemask'): install tilemask, with torch, in the environment its workers run in"
            ) if without == "worker" else (
                f"tilemask: error: the Dask scheduler at {address} cannot import tilemask (ModuleNotFoundError: No "
                "module named 'tilemask'): it unpickles the tasks' graphs; install tilemask in the environment it "
                "runs in"))  # fmt: skip
        assert run_cli("jobs", "--json").stdout.strip() == "[]"
        assert worker.poll() is None
    finally:
        worker.kill()
        scheduler.kill()


@pytest.mark.slow  # a `dask scheduler` and a `dask worker` that its nanny restarts (10 s)
def test_a_worker_restarted_as_it_loads_torch_is_named(make_raster, make_model, write_workflow, tmp_path):
    """A reviewer's: a worker whose memory limit cannot hold torch is restarted by its nanny as tilemask prepares
    it; the run ended with a bare ``CommClosedError``. It names the worker and the memory limit, exit 1."""
    path, _ = make_raster()
    weights, _ = make_model()
    scheduler, address = start_scheduler(tmp_path)
    worker = _dask_worker(address, tmp_path, "--memory-limit", "200MB")
    try:
        result = run_cli("run", write_workflow(raster_workflow(path, weights)), "--scheduler", address, timeout=120)
        assert result.returncode == 1, result.stderr
        assert re.fullmatch(r"tilemask: error: Dask worker tcp://127\.0\.0\.1:\d+ left as tilemask prepared it: "
                            r"killed, or restarted by its nanny \(one over the memory limit, distributed\.worker\."
                            r"memory\.terminate, which must hold torch and the network\)",
                            one_line(result.stderr))  # fmt: skip
        assert "exceeded 95% memory budget" in (tmp_path / "worker.log").read_text()
    finally:
        worker.kill()
        scheduler.kill()


@pytest.mark.slow  # a run of the demo workflow, its worker killed (10 s)
@pytest.mark.timeout(120)
def test_an_embedded_worker_killed_as_tilemask_prepares_it_is_prepared_again(tmp_path):
    """A review's: the embedded cluster's worker killed (SIGKILL) half a second after it started failed the run (6
    of 6 tries between 0.3 and 1 s), said to be over its memory limit. Its nanny starts it anew, and it is prepared
    again: the run ends as an uninterrupted one.  Killed half a second after the scheduler first called on it for
    tilemask's client, once the cluster stands: half a second after it appeared, or after it connected to the
    scheduler, was, in a loaded CI, before it had registered (the next test's case; here 0.4 s from its connection
    to its registration on a quiet machine)."""
    process = _demo_run(tmp_path)
    worker = _embedded_worker(process)
    while not _called_on(worker):
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    time.sleep(0.5)
    worker.kill()
    out, err = process.communicate(timeout=100)
    assert (process.returncode, err) == (0, ""), err
    assert "64 windows" in out and (tmp_path / "out" / "RGB.byte_mask.tif").is_file()


@pytest.mark.timeout(120)
def test_an_embedded_worker_killed_as_it_starts_is_named_so(tmp_path):
    """The embedded cluster's worker killed (SIGKILL) as it started, before it connected: the cluster cannot start,
    and the run said a Python script called tilemask.run unguarded (no script here: the command was run). It says
    how the worker ended, in one line, exit 1, and nothing looks finished."""
    for attempt in range(3):  # stopped (SIGSTOP) as soon as seen: one that had connected by then is tried again
        process = _demo_run(tmp_path / f"try{attempt}")
        worker = _embedded_worker(process)
        worker.suspend()
        if not _connected(worker):
            break
        process.kill()
        worker.kill()
        process.communicate(timeout=60)
    else:
        pytest.fail("the worker had connected as it was seen, three times")
    worker.kill()
    out, err = process.communicate(timeout=100)
    assert process.returncode == 1, err
    assert err == (f"tilemask: error: the embedded cluster's workers did not start (worker process {worker.pid} was "
                   "killed by signal 9 as it started; --debug shows why)\n")  # fmt: skip
    assert not (tmp_path / f"try{attempt}" / "out" / "RGB.byte_mask.tif").exists()


@pytest.mark.slow  # a run of the demo workflow, killed (5 s)
@pytest.mark.timeout(120)
def test_a_command_killed_leaves_no_words_from_its_resource_tracker(tmp_path):
    """A review's: after a ``kill -9`` of ``tilemask run`` once its cluster was up, multiprocessing's resource
    tracker, which outlives it, printed two lines of "leaked semaphore objects" on the command's stderr."""
    process = _demo_run(tmp_path)
    time.sleep(0.5)
    process.kill()
    _, err = process.communicate(timeout=60)  # once every process holding its stderr has ended
    assert (process.returncode, err) == (-signal.SIGKILL, "")


def _demo_run(tmp_path) -> subprocess.Popen:
    """``tilemask run`` of the demo workflow, once its embedded cluster's worker has started."""
    shutil.copytree(REPO / "workflows", tmp_path / "workflows")
    workflow = tmp_path / "workflows" / "demo_landsat.yaml"
    process = subprocess.Popen([sys.executable, "-m", "tilemask", "run", str(workflow), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while _embedded_worker(process) is None:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    return process


def _connected(worker: psutil.Process) -> bool:
    """Whether the worker holds a connection (to its scheduler) yet."""
    return any(c.status == psutil.CONN_ESTABLISHED for c in worker.net_connections("tcp"))


def _called_on(worker: psutil.Process) -> bool:
    """Whether a connection was made to the worker (by its scheduler, as a client calls on it: tilemask's, once the
    cluster has started; none is made to it as it starts)."""
    connections = worker.net_connections("tcp")
    listening = {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port in listening for c in connections)


def _embedded_worker(process: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "forkserver" in " ".join(child.parent().cmdline()):  # forked by the fork server: a worker
                return child
    return None


@pytest.mark.slow  # a `dask scheduler` and a `dask worker` (10 s each)
@pytest.mark.parametrize("worker_joins", ["before the run", "after the run connects"])
def test_workers_of_other_package_versions_are_one_warning_line(make_raster, make_model, write_workflow, tmp_path,
                                                                 worker_joins):
    """A reviewer's: Dask's warning that the workers run other versions of its packages (here numpy and Python, as
    its version check reports them) was hidden unless --debug. It is one warning line; the run goes on.  Dask
    checks as the client connects: a worker that joins later (a cluster just started; seen in CI) is checked once
    it has joined."""
    path, _ = make_raster()
    weights, _ = make_model()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sitecustomize.py").write_text(
        "import distributed.node as n, distributed.versions as v, distributed.worker as w\n"
        "_versions = v.get_versions\n"
        "def get_versions(packages=None):\n"
        "    found = _versions(packages)\n"
        "    found['packages'].update(numpy='1.26.4', python='3.10.12.final.0')\n"
        "    return found\n"
        "v.get_versions = w.get_versions = n.get_versions = get_versions\n"
    )
    scheduler, address = start_scheduler(tmp_path)
    workflow = write_workflow(raster_workflow(path, weights))
    start_worker = functools.partial(_dask_worker, address, tmp_path, env={"PYTHONPATH": str(tmp_path / "other")})
    worker = run = None
    try:
        if worker_joins == "before the run":
            worker = start_worker()
            _wait_for_a_worker(address)
            result = run_cli("run", workflow, "--scheduler", address, timeout=120)
        else:
            run = subprocess.Popen([str(Path(sys.executable).parent / "tilemask"), "run", str(workflow), "--scheduler",
                                    address], stderr=subprocess.PIPE, text=True)  # fmt: skip
            deadline = time.monotonic() + 60
            while "Receive client connection" not in (tmp_path / "scheduler.log").read_text():
                assert time.monotonic() < deadline and run.poll() is None, "the run never connected"
                time.sleep(0.1)
            worker = start_worker()
            _, stderr = run.communicate(timeout=120)
            result = subprocess.CompletedProcess(run.args, run.returncode, None, stderr)
        assert result.returncode == 0, result.stderr
        said = [line for line in result.stderr.splitlines() if "differ" in line or "Mismatch" in line]
        here = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
        assert len(said) == 1 and said[0].startswith(
            "WARNING tilemask.command: the Dask cluster's packages differ from this process's (--debug shows Dask's "
            f"table): numpy {np.__version__} here, {np.__version__} on the scheduler, 1.26.4 on the workers; python "
            f"{here}"), result.stderr  # fmt: skip
        assert said[0].endswith("3.10.12.final.0 on the workers"), said
    finally:
        for process in (run, worker, scheduler):
            if process is not None:
                process.kill()


@pytest.mark.slow  # 17 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(180)
def test_a_worker_of_another_tilemask_release_is_one_warning_line(make_raster, make_model, write_workflow, tmp_path):
    """A first-contact review: a worker whose environment held another release of tilemask (0.0.9 here, as its
    metadata says: Dask's version check reads that) ran the run's tasks without a word, Dask comparing only its own
    packages.  tilemask is compared too: one warning line; the run goes on."""
    path, _ = make_raster()
    weights, _ = make_model()
    other = tmp_path / "other" / "tilemask-0.0.9.dist-info"
    other.mkdir(parents=True)
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: tilemask\nVersion: 0.0.9\n")
    scheduler, address = start_scheduler(tmp_path)
    workflow = write_workflow(raster_workflow(path, weights))
    env = {"PYTHONPATH": os.pathsep.join([str(other.parent), os.environ.get("PYTHONPATH", "")])}
    worker = _dask_worker(address, tmp_path, env=env)
    try:
        _wait_for_a_worker(address)
        result = run_cli("run", workflow, "--scheduler", address, timeout=120)
        assert result.returncode == 0, result.stderr
        said = [line for line in result.stderr.splitlines() if "differ" in line or "Mismatch" in line]
        assert len(said) == 1 and said[0].startswith(
            "WARNING tilemask.command: the Dask cluster's packages differ from this process's (--debug shows Dask's "
            f"table): tilemask {tilemask.__version__} here, "), result.stderr  # fmt: skip
        assert said[0].endswith(" 0.0.9 on the workers"), said
    finally:
        for process in (worker, scheduler):
            process.kill()


@pytest.mark.slow
def test_workers_that_all_die_mid_run_fail_the_run_and_its_next_run_resumes(big_run, tmp_path):
    """Every worker gone (killed; on SLURM, jobs at their walltime) is not the item's fault: it was recorded as
    failed, its staged chunks deleted, and the job's next run did nothing without ``--retry-failed`` (a
    reviewer's). The run still fails (exit 1, one line), keeping the item's chunks; the next run resumes it."""
    scheduler, address = start_scheduler(tmp_path)

    def worker() -> subprocess.Popen:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "dask"), "worker", address, "--no-nanny", "--nthreads", "2",
             "--host", "127.0.0.1", "--no-dashboard"],
            stdout=open(tmp_path / "worker.log", "a"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    workers = [worker()]
    try:
        wf = big_run()
        _wait_for_a_worker(address)  # one that joins after the 3 s is "no Dask worker joined", not dying mid-run
        out = tmp_path / "out"
        proc = start(["run", wf, "--quiet", "--scheduler", address], tmp_path,
                     env={"DASK_TILEMASK__NO_WORKERS_TIMEOUT": "3"})  # fmt: skip
        wait_for(lambda: len(list(out.glob(".tilemask-*.done/*_*.json"))) >= 2, what="two chunks written", proc=proc)
        workers[0].kill()
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, stderr
        assert "no worker" in one_line(stderr) and one_line(stderr).endswith("while running " + str(tmp_path / "big.tif"))
        assert only_staged_by_its_job(out), "the item's chunks are kept for the next run"
        (job,) = (out / ".tilemask" / "jobs").iterdir()
        lines = [json.loads(line) for line in (job / "manifest.jsonl").read_text().splitlines()]
        assert [line["status"] for line in lines] == ["started"], "not recorded as failed"

        workers.append(worker())
        resumed = run_cli("run", wf, "--quiet", "--scheduler", address)
        assert resumed.returncode == 0, resumed.stderr
        windows = int(resumed.stdout.split(" windows in ")[0].rsplit(" ", 1)[1])
        assert 0 < windows <= 256 - 2 * 16, resumed.stdout  # a chunk of 1024 owns 16 windows of 256
        assert hidden(out) == [] and (out / "big_mask.tif").is_file()
    finally:
        for proc in workers:
            proc.kill()
        scheduler.kill()


@pytest.mark.slow  # waits out GDAL's HTTP timeout (11 s)
def test_a_stalled_http_server_fails_the_run_instead_of_hanging(make_model, write_workflow, tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(GEO["RGB.byte.tif"], served / "scene.tif")
    port_file, log = tmp_path / "port", tmp_path / "requests.log"
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("range_server.py")), served, port_file, log])
    try:
        wait_for(port_file.exists, what="the HTTP server")
        weights, _ = make_model()
        url = f"http://127.0.0.1:{port_file.read_text()}/scene.tif"
        workflow = raster_workflow(url, weights, output={"path": str(tmp_path / "out" / "{stem}.tif"), "quicklook": False})
        env = {"GDAL_HTTP_TIMEOUT": "3", "GDAL_HTTP_MAX_RETRY": "0", "VSI_CACHE": "FALSE"}
        proc = start(["run", write_workflow(workflow), "--quiet"], tmp_path, env=env)
        wait_for(lambda: any(n.startswith(".tilemask-lock-") for n in hidden(tmp_path / "out")), what="the plan", proc=proc)
        os.kill(server.pid, signal.SIGSTOP)  # the input was opened; every read from now on stalls
        begin = time.monotonic()
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 1, stderr
        assert "scene.tif" in one_line(stderr)
        assert time.monotonic() - begin < 120
        assert not (tmp_path / "out" / "scene.tif").exists()
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()


def test_a_dead_http_server_is_one_line(make_model, write_workflow, tmp_path):
    weights, _ = make_model()
    url = f"http://127.0.0.1:{_free_port()}/scene.tif"
    result = run_cli("run", write_workflow(raster_workflow(url, weights)), "--quiet")
    assert result.returncode == 2 and "scene.tif" in one_line(result.stderr)


@pytest.mark.slow
def test_killing_a_worker_mid_run_gives_the_same_output(big_run, tmp_path):
    wf = big_run(output="out/{stem}_mask.zarr", roi=48)  # about 7,000 windows: long enough to kill a worker mid-run
    args = ["run", wf, "--quiet", "--workers", "2", "--threads-per-worker", "1"]
    proc = start(args, tmp_path)
    staged = tmp_path / "out" / ".tilemask-*-big_mask.zarr" / "labels" / "c"
    wait_for(lambda: any(Path(tmp_path / "out").glob(str(staged.relative_to(tmp_path / "out")))), what="chunks written", proc=proc)
    # the workers are forked by multiprocessing's fork server, a child of the command (tilemask/forkserver.py)
    children = psutil.Process(proc.pid).children(recursive=True)
    servers = {p.pid for p in children if p.ppid() == proc.pid and "forkserver" in " ".join(p.cmdline())}
    workers = [p for p in children if p.ppid() in servers]
    assert workers, "no worker process found"
    workers[0].kill()
    assert proc.poll() is None, "the run had ended before a worker was killed: make it longer"
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    killed = zarr.open_group(str(tmp_path / "out" / "big_mask.zarr"), mode="r")["labels"][:]
    clean = run_cli(*args, "--overwrite", timeout=600)
    assert clean.returncode == 0, clean.stderr
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out" / "big_mask.zarr"), mode="r")["labels"][:], killed)


# -- disks and paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_a_full_disk_is_named_and_cleaned_up(make_raster, make_model, write_workflow, tmp_path, tmpfs, suffix, client):
    path, _ = make_raster((3, 700, 700))
    weights, _ = make_model()
    disk = tmpfs("600k")
    workflow = raster_workflow(path, weights, output={"path": str(disk / f"{{stem}}{suffix}"), "chunks": 128})
    result = run_cli("run", write_workflow(workflow), "--quiet", "--scheduler", client.scheduler.address)
    assert result.returncode == 1, result.stderr
    assert "no space left on device" in one_line(result.stderr)
    assert outputs_in(disk) == []


@pytest.mark.timeout(60)
def test_a_job_record_that_does_not_fit_leaves_no_staged_copy(tmpfs):
    """A job's status or report written onto a full disk is one line naming it; its staged copy is gone (an empty
    ``.status.json.tmp`` stayed beside the records, found by a fault sweep)."""
    from tilemask.errors import OutputError
    from tilemask.jobs import _write_atomic

    disk = tmpfs("64k")
    (disk / "status.json").write_text("{}")
    with pytest.raises(OutputError, match=r"status\.json: cannot write the job's record: no space left on device"):
        _write_atomic(disk / "status.json", "x" * 200_000)
    assert sorted(p.name for p in disk.iterdir()) == ["status.json"]
    assert (disk / "status.json").read_text() == "{}"


@pytest.mark.timeout(120)
def test_a_job_whose_records_do_not_fit_at_its_end_fails_when_nothing_else_did(make_raster, make_model, tmp_path,
                                                                                tmpfs, client, caplog):  # fmt: skip
    """A job's folder filled as the run ended: the run exited 0 with a warning, its state still "running"
    (``status``: lost), no report and an empty ``report.csv.tmp`` left (a first-contact review).  Now a run that
    ran through fails with the record's one line (the first that did not fit); one that failed keeps its own error
    and warns of the records; no staged copy is left."""
    from tilemask.driver import _Progress, _record_the_end
    from tilemask.errors import OutputError
    from tilemask.jobs import JobFolder

    path, _ = make_raster((3, 64, 64))
    weights, _ = make_model()
    tilemask.run(Workflow.from_dict(raster_workflow(path, weights, output={"path": "out/{stem}.zarr"}),
                                    base_dir=tmp_path), client)  # fmt: skip
    (done,) = (tmp_path / "out" / ".tilemask" / "jobs").iterdir()
    for ran_through in (True, False):
        disk = tmpfs("64k", name=f"disk-{ran_through}")
        shutil.copytree(done, disk / "job")
        (disk / "job" / "report.csv").unlink()
        job = JobFolder(disk / "job")
        (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 512))  # no page left for either
        if ran_through:
            with pytest.raises(OutputError, match=r"report\.csv: cannot write the job's record: no space left"):
                _record_the_end(job, _Progress(job, {"items": 1, "ok": 1}), "done", set(), ran_through)
            # the report alone not written (its staged name taken by a folder): the state says so, not "done"
            (disk / "filler").unlink()
            (disk / "job" / "report.csv.tmp").mkdir()
            with pytest.raises(OutputError, match=r"report\.csv: cannot write the job's record: "):
                _record_the_end(job, _Progress(job, {"items": 1, "ok": 1}), "done", set(), ran_through)
            (disk / "job" / "report.csv.tmp").rmdir()
            ended = json.loads((disk / "job" / "status.json").read_text())
            assert (ended["state"], ended["report"]) == ("failed", None) and "report.csv" in ended["message"]
        else:
            _record_the_end(job, _Progress(job, {"items": 1, "ok": 1}), "failed", set(), ran_through)
            assert "cannot write its report and status" in caplog.text
        assert sorted(p.name for p in (disk / "job").iterdir() if p.name.endswith(".tmp")) == []
        assert not (disk / "job" / "report.csv").exists()


def test_a_cog_assembled_onto_a_full_disk_is_named_so(tmp_path, tmpfs, client):
    """The chunks fitted, the COG did not: GDAL's error (a CPLE_AppDefinedError, not a RasterioError) went up as
    ``Exception: CPLE_AppDefinedError(3, 1, 'TIFFRewriteDirectory:...')``, and the partial file was removed before
    the free space was looked at (a first-contact review). Then, assembled on a worker as a run does it, the error
    came back as ``Exception: OutputError('...')``: Dask pickles it with the GDAL error it replaced, which does not
    unpickle (a first-contact run onto a full disk)."""
    from tilemask.errors import OutputError
    from tilemask.sinks.cog import CogRaster, CogSink

    source = tmp_path / "pieces.tif"
    noise = np.random.default_rng(0).integers(0, 255, (3, 1024, 1024), dtype=np.uint8)  # does not compress
    with rasterio.open(source, "w", driver="GTiff", width=1024, height=1024, count=3, dtype="uint8") as dst:
        dst.write(noise)
    sink = object.__new__(CogSink)  # the assembly step alone: a VRT of the pieces is any GDAL dataset to it
    # at 1 and 2 MB libtiff fails rewriting the directory ("TIFFRewriteDirectory:Error fetching directory count",
    # a review's at 7 MB), and GDAL has removed its temporary files before it returns: the disk looks roomy
    full = r"scene\.tif: cannot assemble the COG: no space left on device( \([\d.]+ MiB free there, for 3\.0 MiB " \
           r"uncompressed; libtiff: .*\))?$"
    for size in ("256k", "1m", "2m"):
        disk = tmpfs(size, name=f"disk{size}")
        raster = CogRaster(str(disk / "scene.tif"), str(disk / "parts"), 3, "uint8", "probabilities", "run")
        with pytest.raises(OutputError, match=full):
            sink._translate(raster, str(source))
        assert list(disk.iterdir()) == []
    with pytest.raises(OutputError, match=full):
        client.submit(sink._translate, raster, str(source), pure=False).result(timeout=60)
    assert list(disk.iterdir()) == []


@pytest.mark.slow  # seven runs of a volume (50 s)
def test_a_volume_written_onto_a_disk_of_any_size_is_whole_or_named(make_volume, make_model, write_workflow, tmp_path,
                                                                    tmpfs):  # fmt: skip
    """A NIfTI output through its model grid (a hidden Zarr), onto disks from 8 kB to 1.2 MB: a full disk went
    up as ``OSError: [Errno 28] No space left on device (run with --debug for details)``, naming no file, when
    the output lock, the model grid's Zarr or the final gzip met it, and the lock file stayed (a first-contact
    review). Now every size gives a whole output or one line naming the file and the full disk, and nothing
    left on the disk."""
    path, _ = make_volume()
    weights, _ = make_model(UNET_3D)
    failed, whole = [], 0
    for size in (8, 16, 24, 200, 600, 800, 1200):
        disk = tmpfs(f"{size}k", name=f"disk{size}")
        workflow = volume_workflow(path, weights, {}, {"path": str(disk / "{stem}_labels.nii.gz")})
        workflow["preprocess"]["spacing"] = [1.0, 1.0, 1.0]  # predicted on a grid of its own, then resampled
        done = run_cli("run", write_workflow(workflow, name=f"w{size}.yaml"), "--quiet", "--job-dir",
                       tmp_path / f"job{size}")  # fmt: skip
        if done.returncode == 0:
            assert nib.load(disk / "scan_labels.nii.gz").get_fdata().shape == (37, 29, 23)
            whole += 1
            continue
        line = one_line(done.stderr)
        assert done.returncode == 1 and f" {disk}" in line and line.endswith(": no space left on device"), (size, line)
        assert sorted(p.name for p in disk.iterdir()) == [], (size, line)
        failed.append(line.replace(str(disk), "DISK"))
    # the lock, the model grid's Zarr and the NIfTI met the full disk (a chunk's write too, named as before)
    kinds = ("DISK: no space", ".model.zarr: cannot write the output", ".nii.gz: cannot write the output")
    assert whole and {kind for kind in kinds for line in failed if kind in line} == set(kinds), (whole, failed)


def test_a_cog_assembled_onto_a_nearly_full_disk_is_whole_or_refused(tmp_path, tmpfs):
    """GDAL's COG driver returned from a copy onto a nearly full disk with no error and the file cut short: the
    run exited 0 and published a COG that did not read (a first-contact review; 8-40 of its 42 kB here). At
    every size of disk, the assembly now gives a COG that reads back whole, or says the disk is full and leaves
    nothing."""
    from tilemask.errors import OutputError
    from tilemask.sinks.cog import CogRaster, CogSink

    source = tmp_path / "pieces.tif"
    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        labels = (src.read(1) // 80).astype(np.uint8)  # compresses as labels do: the COG is about 42 kB
    with rasterio.open(source, "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=1,
                       dtype="uint8") as dst:  # fmt: skip
        dst.write(labels, 1)
    sink = object.__new__(CogSink)
    seen = {"refused": 0, "whole": 0}
    for size in range(8, 104, 8):
        disk = tmpfs(f"{size}k", name=f"disk{size}")
        raster = CogRaster(str(disk / "scene.tif"), str(disk / "parts"), 1, "uint8", "labels", "run")
        try:
            sink._translate(raster, str(source))
        except OutputError as exc:
            assert str(exc).endswith("scene.tif: cannot assemble the COG: no space left on device"), (size, exc)
            assert list(disk.iterdir()) == [], size
            seen["refused"] += 1
            continue
        with rasterio.open(raster.partial) as done:
            np.testing.assert_array_equal(done.read(1), labels, err_msg=f"a {size} kB disk")
        seen["whole"] += 1
    assert seen["refused"] and seen["whole"], seen  # the sizes span both


def test_polygons_and_a_table_written_onto_a_full_disk_are_named_so(tmp_path, tmpfs, client):
    """A GeoPackage's full disk is SQLite's "database or disk is full", or GDAL's "Failed to commit transaction":
    they went up as pyogrio's DataLayerError / DataSourceError, naming neither the file nor the full disk."""
    import geopandas as gpd
    import shapely

    from tilemask.errors import OutputError
    from tilemask.stats.tables import write_table
    from tilemask.vectors import write_polygons

    labels = tmp_path / "labels.tif"
    noise = np.random.default_rng(0).integers(0, 3, (400, 400), dtype=np.uint8)  # tens of thousands of polygons
    with rasterio.open(labels, "w", driver="GTiff", width=400, height=400, count=1, dtype="uint8", crs="EPSG:32618",
                       transform=rasterio.transform.from_origin(500000, 4000000, 30, 30)) as dst:  # fmt: skip
        dst.write(noise, 1)
    disk = tmpfs("200k")
    with pytest.raises(OutputError, match=r"/p\.gpkg: no space left on device$"):
        write_polygons(str(labels), str(disk / "p.gpkg"), client=client)
    frame = gpd.GeoDataFrame({"id": range(20000)}, geometry=shapely.points(np.arange(20000.0), 0.0), crs="EPSG:32618")
    with pytest.raises(OutputError, match=r"/t\.gpkg: no space left on device$"):
        write_table(frame, disk / "t.gpkg")
    assert list(disk.iterdir()) == []


@pytest.mark.timeout(60)
def test_a_geopackage_that_sqlite_rolls_back_on_a_full_disk_is_named_with_its_file(tmpfs):
    """SQLite rolls a GeoPackage back when a write or its commit fails on a full disk, freeing the room again: onto
    2 MiB the zonal statistics of 10,000 regions were ``tilemask: error: DataSourceError: Failed to commit
    transaction``, and a run's polygons ``tilemask: error: DataLayerError: Error while writing batch to OGR layer:
    sqlite3_exec(ROLLBACK) failed: cannot rollback - no transaction is active`` (exit 1), naming no file; the
    output's line now, and nothing left on the disk."""
    import geopandas as gpd
    import shapely

    from tilemask.errors import OutputError
    from tilemask.polygon_files import AreaRule, write_features
    from tilemask.stats.tables import write_table
    from tilemask.vectors import FeatureBatch

    disk = tmpfs("2M")
    i = np.arange(10000.0)
    frame = gpd.GeoDataFrame({"name": [f"r{k}" for k in range(10000)], **{f"c{c}": i * c for c in range(20)}},
                             geometry=shapely.box(i, 0.0, i + 0.5, 0.5), crs="EPSG:32618")  # fmt: skip
    named = r": (cannot write the output: \w+Error: .+|no space left on device)$"
    with pytest.raises(OutputError, match=rf"^{re.escape(str(disk / 't.gpkg'))}{named}"):
        write_table(frame, disk / "t.gpkg")
    i = np.arange(30000)
    boxes = shapely.box(i % 1000, i // 1000, i % 1000 + 0.5, i // 1000 + 0.5)
    batch = FeatureBatch(list(shapely.to_wkb(boxes)), np.array(["a"] * len(i), object), np.ones(len(i)))
    rule = AreaRule((500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0), "EPSG:32618")
    with pytest.raises(OutputError, match=rf"^{re.escape(str(disk / 'p.gpkg'))}{named}"):
        write_features(str(disk / "p.gpkg"), ".gpkg", iter([batch]), rule, 100)
    assert list(disk.iterdir()) == []


def test_gdals_vector_write_error_names_the_output_not_its_hidden_staged_file(tmp_path):
    """pyogrio's errors name the file GDAL wrote, the output's hidden staged sibling: the output's line that
    c2fb522 made of them read ``DIR/p.fgb: cannot write the output: DataSourceError: Failed to write features to
    dataset DIR/.tilemask-<run>-p.fgb; ...``, a name the user never gave, left nowhere."""
    from pyogrio.errors import DataSourceError

    from tilemask.errors import OutputError
    from tilemask.outputs import atomic_path

    with pytest.raises(OutputError) as raised, atomic_path(tmp_path / "p.fgb") as staged:
        Path(staged).write_bytes(b"x")
        raise DataSourceError(f"Failed to write features to dataset {staged}; Unexpected I/O failure: writing feature")
    assert str(raised.value) == (f"{tmp_path}/p.fgb: cannot write the output: DataSourceError: Failed to write "
                                 f"features to dataset {tmp_path}/p.fgb; Unexpected I/O failure: writing feature")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # 34 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
def test_a_runs_statistics_geopackage_onto_a_full_disk_is_one_line_not_gdals_errors(tmp_path, tmpfs):
    """A fault review's: a workflow's ``stats:`` GeoPackage onto a disk with 56 kB free printed six of GDAL's own
    lines ("ERROR 1: sqlite3_exec(COMMIT) failed: database or disk is full", ...) before tilemask's one line:
    pyogrio's GDAL, writing from a thread where no handler takes its errors, prints them itself."""
    workflow = yaml.safe_load((REPO / "workflows" / "demo_landsat.yaml").read_text())
    workflow["input"] = str(GEO["RGB.byte.tif"])
    workflow["model"]["weights"] = str(REPO / "workflows" / "demo" / "landsat_water_land_cloud.pt")
    workflow["output"].update(path="out/{stem}_mask.tif", vectors="out/{stem}_polygons.gpkg", probabilities="none")
    with rasterio.open(GEO["RGB.byte.tif"]) as ds:
        x0, y0, x1, y1 = ds.bounds
        crs = ds.crs.to_string()
    (tmp_path / "regions.geojson").write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs}},
        "features": [{"type": "Feature", "properties": {"name": "all"}, "geometry": {
            "type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}]}))  # fmt: skip
    disk = tmpfs("2M")
    workflow["stats"] = {"output": str(disk / "{stem}_stats.gpkg"), "regions": "regions.geojson"}
    (disk / "filler").write_bytes(b"\0" * (2048 - 56) * 1024)  # 56 kB left
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(workflow))
    done = run_cli("run", tmp_path / "w.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"tilemask: error: {disk}/RGB.byte_stats.gpkg: no space left on device\n"
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out", "regions.geojson", "w.yaml"]  # no log file


@pytest.mark.timeout(60)
def test_polygons_whose_spatial_index_does_not_fit_are_not_published(tmpfs):
    """GDAL builds a GeoPackage's R-tree as the layer closes; where the disk filled then, it said nothing and the
    file, every feature in it but no index, was published (exit 0, an exploratory review)."""
    import sqlite3

    import shapely

    from tilemask.errors import OutputError
    from tilemask.polygon_files import AreaRule, write_features
    from tilemask.vectors import FeatureBatch

    rule = AreaRule((500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0), "EPSG:32618")
    seen = {"whole": 0, "full": 0, "no index": 0}
    for count in (8000, 17000, 18500, 20000, 30000):  # on 4 MB, GDAL 3.x: whole, no index (x3), full
        disk = tmpfs("4m", name=f"disk{count}")
        i = np.arange(count)
        boxes = shapely.box(i % 1000, i // 1000, i % 1000 + 0.5, i // 1000 + 0.5)
        batch = FeatureBatch(list(shapely.to_wkb(boxes)), np.array(["a"] * count, object), np.ones(count))
        try:
            write_features(str(disk / "p.gpkg"), ".gpkg", iter([batch]), rule, 100)
        except OutputError as exc:
            assert list(disk.iterdir()) == [], count
            full = str(exc).endswith("/p.gpkg: no space left on device")
            assert full or re.search(r"/p\.gpkg: GDAL wrote the features without their spatial index, as it does when "
                                     r"the disk fills as it builds it \([\d.]+ MiB free there\)$", str(exc)), str(exc)
            seen["full" if full else "no index"] += 1
            continue
        with sqlite3.connect(disk / "p.gpkg") as db:
            assert db.execute("SELECT count(*) FROM rtree_p_geom").fetchone() == (count,)
        seen["whole"] += 1
    assert all(seen.values()), seen


@pytest.mark.timeout(60)
def test_flatgeobuf_polygons_onto_a_full_disk_are_named_so(tmpfs):
    """FlatGeobuf writes the features into a temporary file, then the file from it, and GDAL removes the first when
    a write fails: the disk looked empty again, and an EO review's polygons onto a 4 MB disk failed as
    ``DataSourceError: Failed to write features to dataset DISK/.tilemask-<run>-p.fgb; Unexpected I/O failure:
    writing feature`` (exit 1 as a bug), naming the hidden file and not the full disk."""
    import shapely

    from tilemask.errors import OutputError
    from tilemask.polygon_files import AreaRule, write_features
    from tilemask.vectors import FeatureBatch

    rule = AreaRule((500000.0, 30.0, 0.0, 4000000.0, 0.0, -30.0), "EPSG:32618")
    for count in (20000, 40000):  # on 4 MB: the file, then the temporary file, does not fit (GDAL 3.10)
        disk = tmpfs("4m", name=f"disk{count}")
        i = np.arange(count)
        boxes = np.array_split(shapely.box(i % 1000, i // 1000, i % 1000 + 0.5, i // 1000 + 0.5), 10)
        batches = [FeatureBatch(list(shapely.to_wkb(b)), np.array(["a"] * len(b), object), np.ones(len(b)))
                   for b in boxes]  # fmt: skip
        with pytest.raises(OutputError) as raised:
            write_features(str(disk / "p.fgb"), ".fgb", iter(batches), rule, 100)
        assert re.fullmatch(rf"{re.escape(str(disk))}/p\.fgb: no space left on device \(4\.0 MiB free there, for "
                            r"about [\d.]+ MiB of features, which FlatGeobuf writes twice; GDAL: "
                            r"Unexpected I/O failure: [\w ]+\)", str(raised.value)), str(raised.value)  # fmt: skip
        assert list(disk.iterdir()) == [], count


def test_a_quick_look_and_scores_written_onto_a_full_disk_name_their_file_once(tmp_path, tmpfs):
    """A fault sweep: a quick look met a full disk as the warning ``no quick look DISK/q.png: DISK/q.png: cannot
    write the quick look: DISK/q.png: no space left on device``, and ``evaluate -o`` as ``DISK/s.json: cannot
    write: DISK/s.json: no space left on device``: the full disk, already named with its file, was wrapped again."""
    from tilemask.errors import OutputError
    from tilemask.quicklook import write_quicklook
    from tilemask.stats.tables import write_json

    with rasterio.open(GEO["RGB.byte.tif"]) as src:
        labels = (src.read(1) // 80).astype(np.uint8)
        profile = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform)  # fmt: skip
    mask = tmp_path / "mask.tif"
    with rasterio.open(mask, "w", **profile) as dst:
        dst.write(labels, 1)
    disk = tmpfs("16k")
    png, scores = disk / "q.png", disk / "s.json"
    with pytest.raises(OutputError, match=rf"^{re.escape(str(png))}: no space left on device$"):
        write_quicklook(str(GEO["RGB.byte.tif"]), str(mask), str(png), size=1024)
    with pytest.raises(OutputError, match=rf"^{re.escape(str(scores))}: no space left on device$"):
        write_json({"scores": ["x" * 100] * 400}, scores)
    assert list(disk.iterdir()) == []


def test_a_chunk_written_onto_the_last_free_bytes_fails_its_record_as_a_full_disk(tmpfs):
    """The resume ledger sits beside the staged output: the chunk that fills the disk leaves no room for its
    record. Seen in 3 of 9 runs of the test above on the shared cluster, as a bare ``OSError`` from the run."""
    from tilemask.engine import Ledger
    from tilemask.errors import OutputError

    disk = tmpfs("64k")
    with contextlib.suppress(OSError), open(disk / "chunk", "wb") as f:
        while True:
            f.write(b"\0" * 4096)
    with pytest.raises(OutputError, match=r"0_1\.json: cannot record the chunk as written: no space left on device$"):
        Ledger(str(disk)).record((0, 1), np.arange(3))
    assert sorted(p.name for p in disk.iterdir()) == ["chunk"]


def test_a_read_only_output_folder_is_found_before_any_work(make_raster, make_model, write_workflow, tmpfs):
    path, _ = make_raster()
    weights, _ = make_model()
    disk = tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = run_cli("run", write_workflow(raster_workflow(path, weights, output={"path": str(disk / "m.zarr")})), "--quiet")
    assert result.returncode == 2 and "not writable" in one_line(result.stderr)


@pytest.mark.timeout(60)
def test_a_run_killed_as_it_checks_its_output_folder_leaves_nothing_there(tmp_path):
    """The landing CI's: a job's driver killed (SIGKILL) between making the hidden file that proves the output folder
    writable and removing it left ``.tilemask-<id>-probe`` beside the outputs for good.  The process here dies at the
    first file it would remove, as a kill at that moment would leave it."""
    script = f"""
import os, pathlib
def die(*args, **kwargs):
    os._exit(9)
os.unlink = os.remove = pathlib.Path.unlink = die
from tilemask.outputs import check_writable
check_writable(pathlib.Path({str(tmp_path / "out")!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_an_output_folder_on_a_file_system_without_unnamed_files_is_checked_with_a_named_one(tmp_path, monkeypatch):
    from tilemask.outputs import check_writable

    opened = os.open

    def without_tmpfile(path, flags, *args):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return opened(path, flags, *args)

    monkeypatch.setattr(os, "open", without_tmpfile)
    made, touch = [], Path.touch
    monkeypatch.setattr(Path, "touch", lambda self, *args, **kwargs: made.append(self.name) or touch(self))
    check_writable(tmp_path / "out")
    assert len(made) == 1 and list((tmp_path / "out").iterdir()) == []


def test_an_output_folder_is_checked_where_os_has_no_unnamed_files(tmp_path, monkeypatch):
    """A review's: ``os.O_TMPFILE`` is Linux's only (macOS and Windows have none): the check raised AttributeError
    there, out of every run, where it is to fall back to a named file, made and removed."""
    from tilemask.errors import OutputConflict
    from tilemask.outputs import check_writable

    monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    check_writable(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    (tmp_path / "file").touch()
    with pytest.raises(OutputConflict, match=r"is not writable: .*file is a file, not a folder$"):
        check_writable(tmp_path / "file" / "out")


@pytest.mark.slow  # a whole embedded run with polygons (12 s)
def test_non_ascii_and_spaces_in_every_path(make_raster, make_model, tmp_path):
    folder = tmp_path / "dé jà vu" / "données d'été"
    folder.mkdir(parents=True)
    scene, _ = make_raster((3, 90, 120), name="scène 1.tif")
    shutil.move(scene, folder / scene.name)
    weights, _ = make_model(name="poids é.pt")
    shutil.move(weights, folder / "poids é.pt")
    workflow = raster_workflow(scene.name, "poids é.pt", output={"path": "sortie ü/{stem} masque.tif"},
                               preprocess={"normalize": {"mean": [40.0] * 3, "std": [25.0] * 3}})  # fmt: skip
    workflow["output"].update(vectors="sortie ü/{stem} polygones.gpkg", chunks=256)
    (folder / "flux de travail.yaml").write_text(json.dumps(workflow, ensure_ascii=False), encoding="utf-8")
    result = run_cli("run", folder / "flux de travail.yaml", "--quiet")
    assert result.returncode == 0, result.stderr
    out = folder / "sortie ü"
    assert outputs_in(out) == [
        "scène 1 masque.png", "scène 1 masque.tif", "scène 1 masque.tif.aux.xml", "scène 1 masque_probabilities.tif",
        "scène 1 polygones.gpkg",
    ]  # fmt: skip


def test_cuda_without_cuda_is_found_before_any_work(make_raster, make_model, write_workflow, tmp_path, client):
    path, _ = make_raster()
    weights, _ = make_model()
    result = run_cli("run", write_workflow(raster_workflow(path, weights)), "--quiet", "--set", "inference.device=cuda",
                     "--scheduler", client.scheduler.address)  # fmt: skip
    assert result.returncode == 2 and "no CUDA device" in one_line(result.stderr)
    assert hidden(tmp_path / "out") == [] and not (tmp_path / "out" / "scene_mask.zarr").exists()


@pytest.mark.timeout(30)
def test_a_gpu_number_the_worker_does_not_have_is_a_workflow_error(monkeypatch):
    """``cuda:1`` on a worker that sees one GPU (a SLURM job of ``--gres=gpu:1`` sees its own as ``cuda:0``) is one
    line that says which it has (exit 2, as ``cuda`` without any); it was let through to the probe's first
    allocation, torch's "invalid device ordinal" (exit 1, not a setting)."""
    from tilemask.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # this CI has no GPU: the worker sees one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(WorkflowError, match=r"^inference\.device: cuda:1 asked for but this worker has 1 CUDA device "
                                            r"\(cuda:0;") as raised:  # fmt: skip
        resolve_device("cuda:1")
    assert raised.value.exit_status == 2


@pytest.mark.slow
def test_labels_of_different_worker_layouts_differ_only_at_ties(make_raster, make_model, write_workflow, tmp_path):
    """1 worker x 2 torch threads and 2 workers x 1 thread sum in different orders; labels may differ only
    where the two best classes are within float32 summation noise (README, "Ties")."""
    path, _ = make_raster((3, 400, 500))
    weights, _ = make_model()
    outputs = []
    for workers, threads in ((1, 2), (2, 1)):
        workflow = raster_workflow(path, weights, output={"path": f"out/w{workers}.zarr"})
        result = run_cli("run", write_workflow(workflow), "--quiet", "--workers", workers, "--threads-per-worker", threads)
        assert result.returncode == 0, result.stderr
        outputs.append(zarr.open_group(str(tmp_path / "out" / f"w{workers}.zarr"), mode="r"))
    (a, b) = outputs
    np.testing.assert_allclose(a["probabilities"][:], b["probabilities"][:], atol=1e-5)
    differ = a["labels"][:] != b["labels"][:]
    top2 = np.sort(a["probabilities"][:], axis=0)[-2:]
    assert np.all(top2[1][differ] - top2[0][differ] < 1e-5)


def test_a_damaged_tile_is_named_where_it_is(tmp_path):
    """libtiff says "row 512, col 0, tile 3" for a tile at column 512: the message places the tile in pixels."""
    import re

    from tilemask.sources.raster import RasterSource

    source = RasterSource.open(str(GEO["corrupt.tif"]))
    failures = 0
    for r in range(0, source.height, 256):
        for c in range(0, source.width, 256):
            try:
                source.read(((r, r + 256), (c, c + 256)))
            except ReadError as exc:
                failures += 1
                found = re.search(r"tile \d+ \(rows (\d+):(\d+), cols (\d+):(\d+)\)", str(exc))
                t0, t1, u0, u1 = map(int, found.groups())
                assert t0 <= r < t1 and u0 <= c < u1, str(exc)
    assert failures, "the real corrupt.tif should fail somewhere"


def test_a_4d_nifti_channel_mismatch_does_not_suggest_bands(make_model, tmp_path):
    import nibabel as nib

    from tilemask.planning import plan_workflow

    from .conftest import UNET_3D

    path = tmp_path / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20, 2), "int16"), np.eye(4)), path)
    weights, _ = make_model(UNET_3D)
    workflow = raster_workflow(path, weights, args=UNET_3D, output={"path": "out/{stem}.nii.gz"})
    workflow["preprocess"] = {}
    with pytest.raises(InputError) as refused:
        plan_workflow(Workflow.from_dict(workflow, base_dir=tmp_path))
    assert refused.value.exit_status == 2
    assert "in_channels is 1 but the input gives 2 channels" in str(refused.value)
    assert "bands" not in str(refused.value)


def test_products_never_overwrite_the_regions_they_read(make_raster, make_model, tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    from tilemask.planning import plan_workflow
    from tilemask.stats import compute_stats

    path, _ = make_raster((3, 100, 120))
    weights, _ = make_model()
    regions = tmp_path / "zones.gpkg"
    gpd.GeoDataFrame({"name": ["a"]}, geometry=[box(500000, 3997000, 501000, 3999000)], crs="EPSG:32618").to_file(regions)
    before = regions.read_bytes()
    for products in ({"stats": {"output": str(regions), "regions": str(regions)}},
                     {"output": {"vectors": str(regions)}, "stats": {"output": "s.csv", "regions": str(regions)}}):  # fmt: skip
        workflow = raster_workflow(path, weights, **products)
        with pytest.raises(tilemask.TilemaskError, match="is the input") as refused:
            plan_workflow(Workflow.from_dict(workflow, base_dir=tmp_path)).check_outputs(overwrite=True)
        assert refused.value.exit_status == 2
    with pytest.raises(InputError, match="is an input"):
        compute_stats(path, regions, regions=regions)
    assert regions.read_bytes() == before


def test_clashing_output_names_and_a_weights_folder_say_what_to_change(make_raster, make_model, tmp_path):
    from tilemask.planning import plan_model, plan_workflow

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, _ = make_raster((3, 40, 40), name="a/x.tif")
    second, _ = make_raster((3, 40, 40), name="b/x.tif")
    weights, _ = make_model()
    for path, advice in (("out/{stem}.zarr", "both are named 'x', which {stem} stands for; rename one"),
                         ("out/mask.zarr", "put {stem} in the output's name")):  # fmt: skip
        workflow = {**raster_workflow(first, weights, output={"path": path}), "input": [str(first), str(second)]}
        with pytest.raises(WorkflowError, match=re.escape(f"would both write {tmp_path / 'out'}")) as refused:
            plan_workflow(Workflow.from_dict(workflow, base_dir=tmp_path))
        assert advice in str(refused.value) and refused.value.exit_status == 2
    # one input, two of its outputs on one file: it was told that x.tif and x.tif are both named 'x'
    one = raster_workflow(first, weights, output={"path": "out/{stem}.tif", "vectors": "out/{stem}.gpkg"})
    with pytest.raises(WorkflowError, match=re.escape(f"output.vectors and stats.output are one file, {tmp_path / 'out' / 'x.gpkg'}")):
        plan_workflow(Workflow.from_dict({**one, "stats": {"output": "out/{stem}.gpkg"}}, base_dir=tmp_path))
    with pytest.raises(WeightsError, match=re.escape(f"model.weights: {tmp_path / 'a'} is a folder, not a weights file")):
        plan_model(Workflow.from_dict(raster_workflow(str(first), str(tmp_path / "a")), base_dir=tmp_path))


@pytest.mark.timeout(60)
def test_one_inputs_probabilities_on_anothers_labels_are_refused_before_any_work(make_raster, make_model, tmp_path):
    """``x.tif`` writes ``out/x_probabilities.tif`` beside its labels, which are ``x_probabilities.tif``'s labels:
    the run began x, then failed as the other input was planned, 'output .../x_probabilities.tif is being written by
    another tilemask run' (this one), leaving x's staged pieces behind."""
    from tilemask.planning import plan_workflow

    first, _ = make_raster((3, 40, 40), name="x.tif")
    second, _ = make_raster((3, 40, 40), name="x_probabilities.tif")
    weights, _ = make_model()
    workflow = raster_workflow(first, weights, output={"path": "out/{stem}.tif", "probabilities": "uint8"})
    with pytest.raises(WorkflowError) as refused:
        plan_workflow(Workflow.from_dict({**workflow, "input": [str(first), str(second)]}, base_dir=tmp_path))
    both = tmp_path / "out" / "x_probabilities.tif"
    assert str(refused.value) == (f"output: {first} and {second} would both write {both}; the output.probabilities "
                                  "of one is the output.path of the other; rename one"), str(refused.value)


def test_a_workflows_region_key_is_checked_before_any_work(make_raster, make_model, tmp_path):
    """A ``stats:`` key the regions lack (or repeat) is refused when the run is planned; found after the run, it
    left a finished mask whose statistics had failed, and the fixed workflow was then refused its own output."""
    import geopandas as gpd
    from shapely.geometry import box

    from tilemask.planning import plan_workflow

    path, _ = make_raster((3, 100, 120))
    weights, _ = make_model()
    regions = tmp_path / "zones.gpkg"
    squares = [box(500000, 3997000, 501000, 3999000), box(501000, 3997000, 502000, 3999000)]
    gpd.GeoDataFrame({"name": ["a", "b"], "kind": ["x", "x"]}, geometry=squares, crs="EPSG:32618").to_file(regions)
    for region_id, why in (("nope", "region id 'nope' is not a field of the regions (fields: name, kind; feature id: fid)"),
                           ("kind", "region id 'kind' has repeated values")):  # fmt: skip
        workflow = raster_workflow(path, weights, stats={"output": "s.csv", "regions": str(regions), "region_id": region_id})
        with pytest.raises(InputError, match=re.escape(why)) as refused:
            plan_workflow(Workflow.from_dict(workflow, base_dir=tmp_path))
        assert refused.value.exit_status == 2
    atlas = raster_workflow(path, weights, stats={"output": "s.csv", "regions": str(path), "region_id": "name"})
    with pytest.raises(InputError, match="stats.region_id applies to vector regions"):
        plan_workflow(Workflow.from_dict(atlas, base_dir=tmp_path))
    fraction = raster_workflow(path, weights, stats={"output": "s.csv", "regions": str(path), "coverage": "fraction"})
    with pytest.raises(InputError, match="stats.coverage fraction applies to vector regions; the atlas"):
        plan_workflow(Workflow.from_dict(fraction, base_dir=tmp_path))
    keyed = raster_workflow(path, weights, stats={"output": "s.csv", "regions": str(regions), "region_id": "name"})
    assert plan_workflow(Workflow.from_dict(keyed, base_dir=tmp_path)).items


@pytest.mark.slow  # 10 s in a loaded default run (2026-12-07, the 17th session)
@pytest.mark.timeout(90)
def test_regions_gdal_cannot_read_are_refused_before_any_work(make_raster, make_model, write_workflow, tmp_path):
    """A regions file that is no vector format (with or without a region_id) is refused when the run is planned, in
    one line naming it without GDAL's advice on driver prefixes: it was read after the whole prediction, whose
    outputs were published before the run failed (exit 1)."""
    from tilemask.planning import plan_workflow

    path, _ = make_raster((3, 100, 120))
    weights, _ = make_model()
    (tmp_path / "zones.yaml").write_text("zones: [a, b]\n")
    (tmp_path / "zones.gpkg").write_text("not a geopackage")
    for regions, region_id in (("zones.yaml", None), ("zones.gpkg", None), ("zones.gpkg", "name")):
        stats = {"output": "out/s.parquet", "regions": regions, **({"region_id": region_id} if region_id else {})}
        workflow = Workflow.from_dict(raster_workflow(path, weights, stats=stats), base_dir=tmp_path)
        with pytest.raises(InputError, match=rf"^{tmp_path / regions}: cannot read the regions: .*not recognized as "
                                             r"being in a supported file format") as refused:  # fmt: skip
            plan_workflow(workflow)
        assert refused.value.exit_status == 2 and "It might help" not in str(refused.value)
    proc = run_cli("run", write_workflow(raster_workflow(path, weights, stats={"output": "out/s.parquet", "regions":
                                                                               "zones.yaml"})), timeout=80)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert error.startswith(f"tilemask: error: {tmp_path / 'zones.yaml'}: cannot read the regions: ")
    assert "It might help" not in error and "--debug" not in error
    assert not list((tmp_path / "out").glob("*.zarr")), "refused before the mask is written"


def test_a_workflows_statistics_that_cannot_measure_its_output_are_refused_before_any_work(
    make_raster, make_volume, make_model, tmp_path
):
    """What the statistics would refuse of the output's grid (vector regions on a volume or a rotated raster, an
    atlas on another grid, geodesic areas of a rotated geographic raster) is refused when the run is planned,
    from the input's grid, which is the output's: found after the run, it left a finished mask that had failed."""
    import geopandas as gpd
    from rasterio.transform import Affine
    from shapely.geometry import box

    from tilemask.planning import plan_workflow

    path, data = make_raster((3, 100, 120))
    weights, _ = make_model()
    volume, _ = make_volume((30, 28, 26))
    weights_3d, _ = make_model(UNET_3D, name="weights3d.pt")
    regions = tmp_path / "zones.gpkg"
    gpd.GeoDataFrame({"name": ["a"]}, geometry=[box(500000, 3997000, 501000, 3999000)], crs="EPSG:32618").to_file(regions)

    def rotated(name: str, crs: str, transform: Affine) -> str:
        with rasterio.open(tmp_path / name, "w", driver="GTiff", height=100, width=120, count=3, dtype="uint8",
                           crs=crs, transform=transform) as ds:  # fmt: skip
            ds.write(data)
        return str(tmp_path / name)

    turned = rotated("turned.tif", "EPSG:32618", Affine(30, 5, 500000, 5, -30, 4000000))
    turned_degrees = rotated("turned4326.tif", "EPSG:4326", Affine(0.001, 0.0002, 10, 0.0002, -0.001, 50))
    def atlas_of(name: str, height: int, width: int) -> Path:
        with rasterio.open(tmp_path / name, "w", driver="GTiff", height=height, width=width, count=1, dtype="uint8",
                           crs="EPSG:32618", transform=Affine(30, 0, 500000, 0, -30, 4000000)) as ds:  # fmt: skip
            ds.write(np.ones((1, height, width), np.uint8))
        return tmp_path / name

    atlas = atlas_of("atlas.tif", 50, 50)
    cases = [
        (raster_workflow(turned, weights, stats={"output": "s.csv", "regions": str(regions)}),
         f"{turned}: vector regions need a north-up raster (no rotation in the geotransform, rows running south"),
        (volume_workflow(volume, weights_3d, {}, {}) | {"stats": {"output": "s.csv", "regions": str(regions)}},
         f"{volume}: vector regions need a 2D raster, this is a volume"),
        (raster_workflow(path, weights, stats={"output": "s.csv", "regions": str(atlas)}),
         f"{atlas}: the atlas is not on the grid of {path} (shapes differ: (100, 120) vs (50, 50))"),
        (raster_workflow(turned_degrees, weights, stats={"output": "s.csv"}),
         f"{turned_degrees}: geodesic areas need a north-up geographic raster (no rotation in the geotransform)"),
    ]  # fmt: skip
    for workflow, why in cases:
        with pytest.raises(InputError, match=re.escape(why)) as refused:
            plan_workflow(Workflow.from_dict(workflow, base_dir=tmp_path))
        assert refused.value.exit_status == 2
    same_grid = raster_workflow(path, weights, stats={"output": "s.csv", "regions": str(atlas_of("same.tif", 100, 120))})
    assert plan_workflow(Workflow.from_dict(same_grid, base_dir=tmp_path)).items  # an atlas on the output's grid
    metric = raster_workflow(turned, weights, stats={"output": "s.csv"})
    assert plan_workflow(Workflow.from_dict(metric, base_dir=tmp_path)).items  # a projected rotated grid has areas
    # resampled for the network, the output is on the scan's grid still: an atlas on that grid is the right one
    scan_atlas = tmp_path / "scan_atlas.nii.gz"
    scan = nib.load(volume)
    nib.save(nib.Nifti1Image(np.ones(scan.shape, np.uint8), scan.affine, scan.header), scan_atlas)
    resampled = volume_workflow(volume, weights_3d, {}, {}) | {"stats": {"output": "s.csv", "regions": str(scan_atlas)}}
    resampled["preprocess"] = {**resampled["preprocess"], "orientation": "RAS", "spacing": [1.5, 1.5, 2.0]}
    assert plan_workflow(Workflow.from_dict(resampled, base_dir=tmp_path)).items


@pytest.mark.parametrize("suffix", [".tif", ".nii.gz"])
def test_labels_replaced_without_probabilities_take_the_old_probabilities_with_them(
    make_raster, make_volume, make_model, tmp_path, client, suffix
):
    """``--overwrite`` with ``probabilities: none`` left the earlier run's probabilities beside the new labels, and
    ``open_result`` and ``tilemask serve`` paired them (labels not their argmax); a file of that name tilemask did
    not write is left alone."""
    from tilemask.formats import for_path

    if suffix == ".tif":
        path, _ = make_raster((3, 60, 70))
        weights, _ = make_model()
        workflow = raster_workflow(path, weights, output={"path": "out/{stem}" + suffix, "probabilities": "uint8",
                                                          "quicklook": False})  # fmt: skip
    else:
        path, _ = make_volume((24, 20, 16))
        weights, _ = make_model(UNET_3D)
        workflow = volume_workflow(path, weights, {"roi_size": [16, 16, 16]}, {"path": "out/{stem}" + suffix})
    (first,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    labels = first.outputs[0]
    probabilities = for_path(labels).probabilities_path(labels)
    assert probabilities in first.outputs and os.path.exists(probabilities)
    workflow["output"]["probabilities"] = "none"
    (second,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, overwrite=True)
    assert second.outputs[0] == labels and not os.path.exists(probabilities)

    shutil.copy(path, probabilities)  # someone's own file under that name (the input: not written by tilemask)
    tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client, overwrite=True)
    assert os.path.exists(probabilities)


@pytest.mark.slow  # three runs (32 s); the default run keeps each format's mark and refusal (test_vectors, test_quicklook, stats)
@pytest.mark.timeout(120)
def test_a_file_tilemask_did_not_write_at_a_products_path_is_never_replaced(
    make_raster, make_model, write_workflow, tmp_path, client
):
    """``tilemask run --overwrite`` replaced any file at the path of a derived product: a reviewer's own
    ``districts.gpkg``, given by mistake as ``output.vectors``, was lost. Polygons, tables and quick looks now carry
    tilemask's mark (a GeoPackage's metadata item, a Parquet schema's key, a PNG's Software chunk): a file at their
    path without it is refused even with ``--overwrite``, as a label output without its mark is, and left as it
    was; the products of an earlier run are replaced."""
    from PIL import Image
    from shapely.geometry import box

    from tilemask.formats import product_written_by_tilemask

    path, _ = make_raster((3, 90, 120))
    weights, _ = make_model()
    out = tmp_path / "out"
    out.mkdir()
    workflow = raster_workflow(path, weights, output={"vectors": "out/districts.gpkg"},
                               stats={"output": "out/{stem}_stats.parquet"})  # fmt: skip
    vectors, table, quicklook = out / "districts.gpkg", out / "scene_stats.parquet", out / "scene_mask.png"
    districts = gpd.GeoDataFrame({"name": ["north"]}, geometry=[box(500000, 3997000, 501000, 3999000)], crs=32618)
    districts.to_file(vectors)
    before = vectors.read_bytes()
    result = run_cli("run", write_workflow(workflow), "--quiet", "--overwrite")
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr) == (
        f"tilemask: error: output {vectors} exists and was not written by tilemask; refused to replace it")
    assert vectors.read_bytes() == before
    vectors.rename(tmp_path / "districts.gpkg")

    someone_elses = {
        table: lambda p: pd.DataFrame({"name": ["north"], "score": [0.5]}).to_parquet(p),
        quicklook: lambda p: Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(p),
    }
    wf = Workflow.from_dict(workflow, base_dir=tmp_path)
    for foreign, write in someone_elses.items():
        write(foreign)
        before = foreign.read_bytes()
        with pytest.raises(tilemask.TilemaskError, match=f"^output {re.escape(str(foreign))} exists and was not "
                           "written by tilemask; refused to replace it$") as refused:  # fmt: skip
            tilemask.run(wf, client, overwrite=True)
        assert refused.value.exit_status == 2
        assert foreign.read_bytes() == before
        foreign.unlink()

    tilemask.run(wf, client)
    products = (vectors, table, quicklook)
    assert [product_written_by_tilemask(p) for p in products] == [True] * 3
    inodes = [p.stat().st_ino for p in products]
    tilemask.run(wf, client, overwrite=True)
    assert all(p.stat().st_ino != inode for p, inode in zip(products, inodes)), "each product written anew"
    assert [product_written_by_tilemask(p) for p in products] == [True] * 3
    assert len(gpd.read_file(vectors)) > 0 and "pixels" in pd.read_parquet(table).columns
    assert hidden(out) == []


@pytest.mark.timeout(30)
def test_an_output_name_too_long_for_its_hidden_siblings_is_named_so(tmp_path):
    """A 245-byte name (the file system takes 255) was refused as "output folder ... is not writable: File name too
    long": tilemask's hidden names beside it are longer (an exploratory review)."""
    from tilemask.errors import OutputConflict
    from tilemask.outputs import HIDDEN_NAME_BYTES, OutputLock, check_outputs

    longest = tmp_path / ("x" * (255 - HIDDEN_NAME_BYTES - 4) + ".tif")
    too_long = tmp_path / ("x" * (245 - 9) + "_mask.tif")
    too_long.touch()  # the name itself is one the file system takes
    too_long.unlink()
    why = (rf"^output {re.escape(str(too_long))}: its name is 245 bytes, and tilemask stages it under hidden names "
           rf"{HIDDEN_NAME_BYTES} bytes longer \(\.tilemask-<run>-<name>\.labels\.zarr\), where this file system "
           rf"takes 255: shorten it to {255 - HIDDEN_NAME_BYTES} bytes at most$")  # fmt: skip
    for refuse in (lambda: check_outputs([(str(too_long), True)], [], False), OutputLock([str(too_long)]).acquire):
        with pytest.raises(OutputConflict, match=why):
            refuse()
    check_outputs([(str(longest), True)], [], False)
    lock = OutputLock([str(longest)]).acquire()  # the longest name that fits: its lock is taken
    assert [p.name for p in tmp_path.iterdir()] == [f".tilemask-lock-{longest.name}"]
    lock.release()
