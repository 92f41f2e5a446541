"""Several inputs in one run: a window of items in flight, earlier items first, and one failure stops them all."""

from __future__ import annotations

import shutil
import threading
import time

import dask
import numpy as np
import pytest
import rasterio
import zarr

import tilemask
from tilemask import Workflow
from tilemask.batch import run_items
from tilemask.errors import ReadError

from .conftest import GEO, UNET_2D, raster_workflow
from .test_trust import hidden, only_staged_by_its_job, outputs_in


def test_items_start_in_order_and_at_most_a_window_runs_at_once():
    lock, running, peak, first = threading.Lock(), [0], [0], []
    together = threading.Barrier(3, timeout=30)  # the first three wait for one another: a window of 3 runs them

    def one(item: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            first.append(item)
        if item < 3:
            together.wait()
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return item * 10

    results = run_items(list(range(9)), one, window=3, progress=False)
    assert results == [i * 10 for i in range(9)]  # in the items' order, whatever order they finished in
    assert peak[0] == 3
    assert sorted(first[:3]) == [0, 1, 2]  # the fourth starts only when one of the first three is done


def test_a_failed_item_starts_no_further_item_and_its_error_is_raised():
    started = []

    def one(item: int) -> int:
        started.append(item)
        if item == 1:
            raise ValueError("item 1 is broken")
        time.sleep(0.2)
        return item

    with pytest.raises(ValueError, match="item 1 is broken"):
        run_items(list(range(8)), one, window=2, progress=False)
    assert max(started) <= 2  # item 0 (in flight) may finish and start item 2; nothing after


@pytest.fixture
def scenes(tmp_path):
    """Five good scenes and the real corrupt.tif between them, all with corrupt.tif's band count."""
    folder = tmp_path / "scenes"
    folder.mkdir()
    with rasterio.open(GEO["shade.tif"]) as src:
        profile, data = src.profile, src.read(1)
    with rasterio.open(GEO["corrupt.tif"]) as ds:
        count = ds.count
    profile.update(count=count, nodata=None)
    for i in range(5):
        with rasterio.open(folder / f"scene{i}.tif", "w", **profile) as dst:
            dst.write(np.stack([np.roll(data, 37 * i, axis=1)] * count))
    return folder, count


def test_a_failed_inputs_windows_leave_the_runs_bar():
    """With several inputs on one bar, a failed input's windows stayed in the total: a run ended at 167/249."""
    import contextvars

    from tilemask.progress import ItemsBar, window_progress

    bar = {"total": 0, "done": 0}
    shared = ItemsBar(lambda n: bar.update(done=bar["done"] + n), lambda: None, lambda n: bar.update(total=bar["total"] + n))

    def run() -> None:
        shared.attach()
        with window_progress(10, "a") as advance:
            advance(10)
        with pytest.raises(ReadError), window_progress(8, "b") as advance:
            advance(3)
            raise ReadError("corrupt")

    contextvars.copy_context().run(run)
    assert bar == {"total": 13, "done": 13}


@pytest.mark.slow  # ten items end to end; the corrupt input below keeps items in flight in the default run
def test_items_in_flight_give_the_outputs_of_one_item_at_a_time(scenes, make_model, tmp_path, client):
    folder, count = scenes
    args = dict(UNET_2D, in_channels=count)
    weights, _ = make_model(args)
    labels = {}
    for window in (1, 4):
        raw = raster_workflow(f"{folder}/*.tif", weights, args=args, output={"path": f"out{window}/{{stem}}.zarr", "chunks": 256})
        with dask.config.set({"tilemask.items-in-flight": window}):
            results = tilemask.run(Workflow.from_dict(raw, base_dir=tmp_path), client)
        assert [r.input for r in results] == sorted(str(p) for p in folder.glob("*.tif"))
        labels[window] = [zarr.open_group(r.outputs[0], mode="r")["labels"][:] for r in results]
    for one, four in zip(labels[1], labels[4]):
        np.testing.assert_array_equal(one, four)


def test_a_corrupt_input_among_several_in_flight_fails_the_run_and_leaves_nothing_half_done(
    scenes, make_model, tmp_path, client
):
    folder, count = scenes
    shutil.copy(GEO["corrupt.tif"], folder / "scene2_corrupt.tif")  # in the middle of the six
    args = dict(UNET_2D, in_channels=count)
    weights, _ = make_model(args)
    raw = raster_workflow(f"{folder}/*.tif", weights, args=args, output={"path": "out/{stem}.zarr", "chunks": 256})
    with dask.config.set({"tilemask.items-in-flight": 4}), pytest.raises(ReadError, match="scene2_corrupt.tif") as failed:
        tilemask.run(Workflow.from_dict(raw, base_dir=tmp_path), client)
    assert failed.value.exit_status == 1
    out = tmp_path / "out"
    (job,) = [p.name for p in (out / ".tilemask" / "jobs").iterdir()]
    staged = hidden(out)  # the items abandoned in flight keep their chunks for the job's next run; the failed one not
    assert all(name.startswith(f".tilemask-{job}-") for name in staged), staged
    assert not any("scene2_corrupt" in name for name in staged), staged
    written = [name for name in outputs_in(out) if name not in staged]
    assert "scene2_corrupt.zarr" not in written
    for name in written:  # an item that finished before the failure is whole; no other output exists
        assert zarr.open_group(out / name, mode="r").attrs["tilemask"]["complete"] is True


@pytest.mark.slow
def test_ctrl_c_with_several_inputs_in_flight_exits_130_and_leaves_nothing(make_raster, make_model, write_workflow, tmp_path):
    import os
    import signal

    from .test_trust import one_line, start, wait_for

    (tmp_path / "scenes").mkdir()
    for i in range(4):
        make_raster((3, 1500, 1500), name=f"scenes/scene{i}.tif", seed=i)
    weights, _ = make_model()
    workflow = raster_workflow(f"{tmp_path}/scenes/*.tif", weights, output={"path": "out/{stem}.tif", "chunks": 512})
    proc = start(["run", write_workflow(workflow), "--quiet"], tmp_path, env={"DASK_TILEMASK__ITEMS_IN_FLIGHT": "3"})
    out = tmp_path / "out"
    wait_for(lambda: len([n for n in hidden(out) if n.endswith(".parts")]) >= 2, what="two inputs in flight", proc=proc)
    os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C does
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert one_line(stderr) == "tilemask: interrupted"
    assert only_staged_by_its_job(out), "an interrupted run leaves nothing but its job's staged chunks"


def test_stopping_says_what_it_waits_for_only_when_it_waits(caplog):
    """Ctrl-C while an item finishes its products waited a minute or more in silence; a stop with nothing past
    the point of no return is at once and says nothing more than "interrupted"."""
    from tilemask.batch import say_what_stopping_waits_for
    from tilemask.cluster import not_abandoned

    with caplog.at_level("WARNING", logger="tilemask.batch"):
        say_what_stopping_waits_for()
        assert caplog.text == ""
        with not_abandoned(), not_abandoned():  # two items publishing or deriving their products
            say_what_stopping_waits_for()
        say_what_stopping_waits_for()
    assert caplog.text.count("stopping once 2 item(s) whose labels are in place") == 1, caplog.text


def test_process_age_is_the_time_since_the_process_started():
    """The start-up figure of bench_small: psutil's create_time rounds the boot time down to a whole second,
    which made every process look up to 1 s older (0.65 s on the VM of 2026-12-01)."""
    import subprocess
    import sys

    script = "import time; time.sleep(0.3); from tilemask.engine import process_age; print(process_age())"
    started = time.perf_counter()
    age = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60).stdout)
    wall = time.perf_counter() - started
    assert 0.3 <= age <= wall + 0.02  # clock ticks of 10 ms
