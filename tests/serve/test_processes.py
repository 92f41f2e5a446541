"""``tilemask serve``'s processes: those uvicorn's supervisor starts, watches and restarts, and what they hold open."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import rasterio
from affine import Affine

# Each server process (a child of the supervisor, spawned) takes 6 s to import rio-tiler, as the app's modules took
# on a busy 2-core machine (3.4 s alone there, with four importing at once much more); the supervisor itself not.
SLOW_IMPORT = """
import importlib.abc, multiprocessing, sys, time

class SlowRioTiler(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "rio_tiler" and multiprocessing.parent_process() is not None:
            sys.meta_path.remove(self)
            time.sleep(6)
        return None

sys.meta_path.insert(0, SlowRioTiler())
"""


def _server_processes(supervisor: int) -> set[int]:
    """The pids of the server processes (spawned by multiprocessing) under the supervisor."""
    found = set()
    for child in psutil.Process(supervisor).children():
        with contextlib.suppress(psutil.Error):
            if "multiprocessing.spawn" in " ".join(child.cmdline()):
                found.add(child.pid)
    return found


@pytest.mark.slow  # 21 s: two server processes made to import for 6 s, watched for 12 s
@pytest.mark.timeout(120)
def test_server_processes_slow_to_import_are_not_killed_as_hung(tmp_path):
    """uvicorn's supervisor pings each server process every half second and kills (SIGKILL) and restarts one that
    does not answer within 5 s. A process answers once it has configured its logging, and tilemask's logging filter
    was found by importing ``tilemask.serve``, which imported the whole app (rio-tiler, dask, scipy, FastAPI) first:
    ``--workers 4`` on a busy 2-core machine, idle, had a process killed and restarted every 5 s (7 processes in
    25 s), and one whose import took over 5 s never served. The app is now imported after the process answers."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_IMPORT)
    (folder := tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(slow), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [str(Path(sys.executable).parent / "tilemask"), "serve", str(folder), "--port", "0", "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)  # fmt: skip
    seen: set[int] = set()
    watching = threading.Event()

    def watch() -> None:  # every server process the supervisor starts, a restart included
        while not watching.wait(0.1):
            seen.update(_server_processes(process.pid))

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        url = re.search(r"at (http://\S+/) ", process.stdout.readline()).group(1)
        watcher.start()
        assert httpx.get(f"{url}?f=json", timeout=40).status_code == 200  # served, not held by killed processes
        time.sleep(6)  # past the supervisor's 5 s: a process that did not answer would be killed by now
        watching.set()
        watcher.join()
        assert len(seen) == 2, f"{len(seen) - 2} server process(es) killed and restarted"
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 130
        assert process.stdout.read().strip().splitlines() == ["tilemask: interrupted"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the server and its workers, whatever happened
        process.stdout.close()


@contextlib.contextmanager
def serving(folder: Path):
    """``tilemask serve FOLDER`` with one server process (the command's own) on a free port: the process and its
    URL, the process group killed after."""
    command = [str(Path(sys.executable).parent / "tilemask"), "serve", str(folder), "--port", "0", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        yield process, re.search(r"at (http://\S+/) ", process.stdout.readline()).group(1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.stdout.close()


def _labels_cog(path: Path, size: int = 1024) -> None:
    """A label GeoTIFF as tilemask tags one (its classes), tiled, over 10 km of Italy."""
    labels = (np.arange(size)[:, None] // 64 + np.arange(size)[None, :] // 64) % 3
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 1, "dtype": "uint8", "nodata": 255,
               "crs": "EPSG:32633", "transform": Affine(10, 0, 300000, 0, -10, 5100000),
               "tiled": True, "blockxsize": 256, "blockysize": 256}  # fmt: skip
    with rasterio.open(path, "w", **profile) as out:
        out.write(labels.astype(np.uint8), 1)
        out.update_tags(TILEMASK_CLASSES=json.dumps(["background", "a", "b"]))


def _held_deleted(pid: int, name: str) -> int:
    """How many of the process's file descriptors hold ``name`` after it was deleted."""
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            held += target.endswith(f"{name} (deleted)")
    return held


@pytest.mark.slow  # 22 s in a loaded default run (2026-12-07)
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")
@pytest.mark.timeout(90)
def test_a_removed_output_is_not_held_open_by_the_server(tmp_path):
    """Each of the server's threads keeps the GeoTIFFs it read open (GDAL's block cache then serves the next
    tiles), and closed one only when asked for a tile of the same path again: an output removed while served
    stayed open in every thread that had read it, its disk space not freed while requests for other outputs
    kept the threads busy (a 16384^2 COG, 40 descriptors held after three rounds of tiles of another output).
    A thread now closes what it holds of a file removed or replaced before it reads the next tile."""
    import morecantile
    from pyproj import Transformer

    _labels_cog(tmp_path / "gone_mask.tif")
    _labels_cog(tmp_path / "kept_mask.tif")
    with rasterio.open(tmp_path / "kept_mask.tif") as ds:
        lonlat = Transformer.from_crs(ds.crs, "OGC:CRS84", always_xy=True).transform_bounds(*ds.bounds)
    tiles = [f"tiles/{t.z}/{t.x}/{t.y}.png" for t in morecantile.tms.get("WebMercatorQuad").tiles(*lonlat, [13])]
    with serving(tmp_path) as (process, url):
        server = process.pid  # one worker: the command's own process serves
        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=40)) as client:

            def tiles_of(output: str) -> set[int]:
                with ThreadPoolExecutor(40) as pool:  # many of the server's threads at once
                    return set(pool.map(lambda t: client.get(t, params={"output": output}).status_code, tiles * 4))

            assert tiles_of("gone_mask.tif") == {200}
            (tmp_path / "gone_mask.tif").unlink()
            assert _held_deleted(server, "gone_mask.tif") > 0  # the datasets the threads kept
            assert client.get(tiles[0], params={"output": "gone_mask.tif"}).status_code == 404
            for _ in range(10):  # other outputs' tiles: the same threads, busy (a thread the pool leaves idle in a
                assert tiles_of("kept_mask.tif") == {200}  # round holds its datasets until it serves again)
                if _held_deleted(server, "gone_mask.tif") == 0:
                    break
            assert _held_deleted(server, "gone_mask.tif") == 0


def _peak_rss_growth(pid: int, ask) -> int:
    """How far the process's resident memory rose above where it was while ``ask()`` ran (sampled every 20 ms)."""
    process = psutil.Process(pid)
    before = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        ask()
    finally:
        done.set()
        sampler.join()
    return peak - before


@pytest.mark.slow  # 20 s in a loaded default run (2026-12-07)
@pytest.mark.timeout(120)
def test_a_volume_asked_by_many_viewers_at_once_is_strided_once(tmp_path):
    """/view gives NiiVue a strided copy of a volume too large for a texture, made on the first request and kept;
    requests that came together each made their own, every one holding the whole volume: 8 viewers of this
    300 MB scan at once took 806 MB more, where one took 117 MB. The others now wait for the first's copy."""
    import nibabel as nib

    shape = (512, 512, 300)
    scan = (np.indices(shape, sparse=True)[2] * np.ones(shape[:2] + (1,))).astype(np.float32)  # 300 MB in memory
    for name in ("first.nii", "second.nii"):  # uncompressed: reading is the cost, not gunzipping
        nib.save(nib.Nifti1Image(scan, np.diag([0.7, 0.7, 1.0, 1.0])), tmp_path / name)
    del scan
    with serving(tmp_path) as (process, url):
        with httpx.Client(base_url=url, timeout=100) as client:
            assert client.get("?f=json").status_code == 200

            def viewers(name: str, n: int) -> None:
                with ThreadPoolExecutor(n) as pool:
                    answers = list(pool.map(lambda _: client.get(f"volumes/{name}"), range(n)))
                assert {a.status_code for a in answers} == {200}
                assert len({gzip.decompress(a.content) for a in answers}) == 1

            one = _peak_rss_growth(process.pid, lambda: viewers("first.nii", 1))
            eight = _peak_rss_growth(process.pid, lambda: viewers("second.nii", 8))
        assert eight < 2 * one, f"8 viewers at once: {eight >> 20} MB more; one: {one >> 20} MB"


@pytest.mark.slow  # a 4096^2 run of the demo's network (about 20 s here)
@pytest.mark.timeout(300)
def test_zoomed_out_tiles_of_a_plain_zarr_read_the_store_once(tmp_path, client):
    """A plain Zarr has no pyramid: each zoomed-out tile read the whole array at full resolution, each tile
    again, at once: the 20 tiles of /map's first view of an 8192^2 Zarr took the server to 4.6 GB and 12 s. Its
    every (2**k)-th pixel (as an OME-Zarr's levels) is now read once and kept: 333 MB and 1.1 s."""
    import morecantile

    import tilemask
    from tilemask.workflow import Workflow

    from .conftest import DEMO

    with rasterio.open(DEMO.parent / "demo" / "RGB.byte.tif") as src:
        bands, profile = src.read(), src.profile
    size = 4096
    big = np.tile(bands, (1, -(-size // bands.shape[1]), -(-size // bands.shape[2])))[:, :size, :size]
    profile.update(width=size, height=size, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
    with rasterio.open(tmp_path / "big.tif", "w", **profile) as out:
        out.write(big)
    (folder := tmp_path / "out").mkdir()
    sets = [f"input={tmp_path / 'big.tif'}", f"output.path={folder}/{{stem}}_mask.zarr", "output.vectors=null",
            "output.quicklook=false", "output.chunks=512"]  # fmt: skip
    tilemask.run(Workflow.from_yaml(DEMO, sets), client)
    with serving(folder) as (process, url):
        with httpx.Client(base_url=url, timeout=120) as http:
            (output,) = http.get("?f=json").json()["outputs"]
            view = list(morecantile.tms.get("WebMercatorQuad").tiles(*output["bounds"], [4]))
            view = (view * 20)[:20]  # four viewers of the zoomed-out map: 20 tiles at once

            def zoomed_out() -> None:
                with ThreadPoolExecutor(len(view)) as pool:
                    answers = list(pool.map(lambda t: http.get(f"tiles/{t.z}/{t.x}/{t.y}.png",
                                                               params={"output": output["path"]}), view))  # fmt: skip
                assert {a.status_code for a in answers} <= {200, 404} and 200 in {a.status_code for a in answers}

            grown = _peak_rss_growth(process.pid, zoomed_out)
        assert grown < 4 * size * size, f"20 tiles at zoom 4: {grown >> 20} MB more"  # the labels: 16 MB


@pytest.mark.timeout(60)
def test_a_volume_copy_that_failed_is_made_again_by_one_request_at_a_time(tmp_path, monkeypatch):
    """The first request for a volume makes its browser copy while the others wait. Where it failed, its lock was
    dropped while a waiting request made the copy again, and a request arriving then made another beside it (two
    whole volumes in memory at once): the lock stays while any request holds or waits for it."""
    import threading

    from tilemask.serve import volumes

    first_in, fail, second_in = threading.Event(), threading.Event(), threading.Event()
    making, most = [0], [0]
    lock = threading.Lock()

    def strided(path):
        with lock:
            making[0] += 1
            most[0] = max(most[0], making[0])
            first = not first_in.is_set()
            first_in.set()
        try:
            if first:
                fail.wait(10)
                raise OSError("the first copy failed")
            second_in.set()
            time.sleep(1.0)
            return b"copy"
        finally:
            with lock:
                making[0] -= 1

    monkeypatch.setattr(volumes, "_strided", strided)
    asked = tmp_path / "scan.nii.gz"

    def ask() -> None:
        with contextlib.suppress(OSError):
            volumes.browser_copy(asked, (1, 2))

    first = threading.Thread(target=ask)
    first.start()
    assert first_in.wait(10)
    second = threading.Thread(target=ask)
    second.start()
    time.sleep(0.2)  # the second waits for the first's copy
    fail.set()
    assert second_in.wait(10)
    third = threading.Thread(target=ask)  # arrives while the second makes the copy again
    third.start()
    for thread in (first, second, third):
        thread.join(10)
    assert most[0] == 1, f"{most[0]} copies of one volume made at once"
