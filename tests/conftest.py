"""Fixtures that make their data: rasters, volumes, models and workflows of any shape."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import torch
import yaml
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
# The real rasters tests read (rasterio's test data, BSD): tests/data/, and the demo scene in workflows/demo/.
GEO = {
    "shade.tif": REPO / "tests" / "data" / "shade.tif",
    "corrupt.tif": REPO / "tests" / "data" / "corrupt.tif",
    "RGB.byte.tif": REPO / "workflows" / "demo" / "RGB.byte.tif",
}

UNET_2D = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=[8, 16, 32], strides=[2, 2], num_res_units=1)
UNET_3D = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8, 16], strides=[2, 2], num_res_units=1)


@pytest.fixture(scope="session", autouse=True)
def session_tilemask_home(tmp_path_factory):
    """The jobs of session and module fixtures' runs (the served folder's demo runs) are listed here, not in the
    user's ``~/.local/share/tilemask``: the per-test folder below is set only once those fixtures have run. The
    backends' verdicts and ``auto``'s tally go to a folder of the session's, not the user's ``~/.cache/tilemask``:
    what a test's run measures does not hang on the runs before it on this machine.

    ``auto`` measures nothing unless a test asks (``TILEMASK_AUTO_MEASURE_AFTER`` set to 0, or unset for the
    default): the tally of a network's unmeasured seconds is kept per network, and the runs of the tests that share
    one crossed 15 s at whichever test the order put there, so that its later runs took another backend (1e-7 away)
    and a test comparing two runs bit for bit failed (CI of 64b6ab7)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TILEMASK_HOME", str(tmp_path_factory.mktemp("tilemask-home")))
        patch.setenv("TILEMASK_CACHE_DIR", str(tmp_path_factory.mktemp("tilemask-cache")))
        patch.setenv("TILEMASK_AUTO_MEASURE_AFTER", "inf")
        yield


@pytest.fixture(autouse=True)
def root_logging_level():
    """An in-process CLI run sets the root logger's level (``-q``: errors only), which outlived its test: a later
    test's warning, in a run whose files came in another order (``-n 2``), was never logged. Each test starts at
    the level the session started with."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture(autouse=True)
def tilemask_home(tmp_path, monkeypatch):
    """Each test lists its jobs in its own folder, not in the user's ``~/.local/share/tilemask``."""
    home = tmp_path.parent / f"{tmp_path.name}-home"  # beside tmp_path: tests list tmp_path's files
    monkeypatch.setenv("TILEMASK_HOME", str(home))
    return home


@pytest.fixture
def make_raster(tmp_path):
    """Write a GeoTIFF of random smooth-ish values; returns (path, array)."""

    def make(shape=(3, 300, 437), dtype="uint8", crs="EPSG:32618", name="scene.tif", seed=0, **profile):
        rng = np.random.default_rng(seed)
        count, height, width = shape
        info = np.iinfo(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else None
        top = info.max if info else 1.0
        data = (rng.random(shape) * top).astype(dtype)
        path = tmp_path / name
        with rasterio.open(
            path, "w", driver="GTiff", height=height, width=width, count=count, dtype=dtype, crs=crs,
            transform=from_origin(500000, 4000000, 30, 30), **profile,
        ) as ds:
            ds.write(data)
        return path, data

    return make


def band_vrt(path: Path, bands: list[tuple[str, str, int]], width: int, height: int) -> Path:
    """A VRT of ``(file, GDAL type, source band)`` bands (files relative to it), on the files' grid."""
    with rasterio.open(path.parent / bands[0][0]) as ds:
        srs, transform = ds.crs.to_wkt().replace('"', "&quot;"), ", ".join(map(str, ds.transform.to_gdal()))
    xml = "".join(
        f'<VRTRasterBand dataType="{kind}" band="{i}"><SimpleSource><SourceFilename relativeToVRT="1">{name}'
        f"</SourceFilename><SourceBand>{source}</SourceBand></SimpleSource></VRTRasterBand>"
        for i, (name, kind, source) in enumerate(bands, start=1)
    )
    path.write_text(f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{srs}</SRS>'
                    f"<GeoTransform>{transform}</GeoTransform>{xml}</VRTDataset>")  # fmt: skip
    return path


@pytest.fixture
def make_volume(tmp_path):
    """Write a NIfTI volume with an anisotropic, rotated affine; returns (path, array)."""

    def make(shape=(37, 29, 23), name="scan.nii.gz", seed=0, dtype="int16"):
        rng = np.random.default_rng(seed)
        data = (rng.random(shape) * 1000).astype(dtype)
        affine = np.array([[0.0, -1.2, 0.0, 40.0], [0.9, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 10.0], [0, 0, 0, 1]])
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm", "sec")
        path = tmp_path / name
        nib.save(img, path)
        return path, data

    return make


@pytest.fixture
def make_model(tmp_path):
    """A seeded MONAI UNet saved as a state_dict; returns (weights path, network in eval mode)."""

    def make(args=None, name="weights.pt", seed=0):
        from monai.networks.nets import UNet

        torch.manual_seed(seed)
        net = UNet(**(args or UNET_2D)).eval()
        path = tmp_path / name
        torch.save(net.state_dict(), path)
        return path, net

    return make


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted in tmp_path (needs root; skipped elsewhere)."""
    mounted = []

    def mount(size: str, name="disk") -> Path:
        target = tmp_path / name
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def write_workflow(tmp_path):
    """Write a workflow YAML from a dict; returns its path."""

    def write(workflow: dict, name="workflow.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(workflow, sort_keys=False))
        return path

    return write


def raster_workflow(input_path, weights, args=None, **sections) -> dict:
    args = args or UNET_2D
    workflow = {
        "version": 1,
        "input": str(input_path),
        "model": {"network": "UNet", "args": args, "weights": str(weights)},
        "preprocess": {"normalize": {"mean": [127.0] * args["in_channels"], "std": [60.0] * args["in_channels"]}},
        "inference": {"roi_size": [64] * args["spatial_dims"], "overlap": 0.25, "batch_size": 4, "device": "cpu"},
        "output": {"path": "out/{stem}_mask.zarr", "probabilities": "float32", "chunks": 96},
    }
    for key, value in sections.items():
        workflow[key] = {**workflow.get(key, {}), **value} if isinstance(value, dict) else value
    return workflow


def run_small_volume(input_path, weights, tmp_path, client, suffix: str = ".nii.gz") -> str:
    """UNET_3D over a small volume (roi 16^3, chunks 16) into ``out/{stem}_labels<suffix>``; the labels' path."""
    import tilemask
    from tilemask.workflow import Workflow

    workflow = {
        "version": 1,
        "input": str(input_path),
        "model": {"network": "UNet", "args": UNET_3D, "weights": str(weights)},
        "preprocess": {"normalize": {"mean": [500.0], "std": [300.0]}},
        "inference": {"roi_size": [16, 16, 16], "batch_size": 2, "device": "cpu"},
        "output": {"path": "out/{stem}_labels" + suffix, "chunks": 16},
    }
    (result,) = tilemask.run(Workflow.from_dict(workflow, base_dir=tmp_path), client)
    return result.outputs[0]


def probe_twice(script: str, tmp_path, timeout: float) -> list[str]:
    """The last line ``script`` prints in each of two fresh processes, one after the other, that share a
    ``TILEMASK_CACHE_DIR`` under ``tmp_path``; process ``n`` is given ``tmp_path / f"out{n}.pt"`` to save to."""
    env = {**os.environ, "TILEMASK_CACHE_DIR": str(tmp_path / "cache")}
    lines = []
    for n in range(2):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"out{n}.pt")], env=env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines.append(done.stdout.strip().splitlines()[-1])
    return lines


def volume_workflow(input_path, weights, inference: dict, output: dict) -> dict:
    """UNET_3D on a volume (normalised with mean 500 and std 300, roi 24^3), labels and float32 probabilities
    as ``.nii.gz``; ``inference`` and ``output`` keys added."""
    return {
        "version": 1,
        "input": str(input_path),
        "model": {"network": "UNet", "args": UNET_3D, "weights": str(weights)},
        "preprocess": {"normalize": {"mean": [500.0], "std": [300.0]}},
        "inference": {"roi_size": [24, 24, 24], "device": "cpu", **inference},
        "output": {"path": "out/{stem}_labels.nii.gz", "probabilities": "float32", **output},
    }


@pytest.fixture(scope="session")
def client():
    """An embedded cluster shared by the tests that only need *a* cluster. Not the default client: a test's own
    ``.compute()`` keeps dask's local scheduler instead of shipping every chunk to these two processes."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as c:
            yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scheduler_address(scheduler_file: Path, process: subprocess.Popen, timeout: float = 60.0) -> str:
    """The address a ``dask scheduler --scheduler-file`` wrote, once the file is whole (it exists, empty, while
    the scheduler writes it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dask scheduler wrote no {scheduler_file}") from None
            time.sleep(0.1)


def start_scheduler(logdir: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A real ``dask scheduler`` on 127.0.0.1 and a port of its own choosing (``--port 0``), logging to
    logdir/scheduler.log; returns the process and its address."""
    scheduler_file = logdir / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],  # its HTTP server runs anyway
        stdout=open(logdir / "scheduler.log", "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    return process, scheduler_address(scheduler_file, process)


@pytest.fixture(scope="session")
def dask_processes(tmp_path_factory):
    """A real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1; yields the address."""
    bindir = Path(sys.executable).parent
    logdir = tmp_path_factory.mktemp("dask-logs")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    scheduler, address = start_scheduler(logdir, env)
    procs = [scheduler]
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [str(bindir / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard",
                 "--host", "127.0.0.1", "--name", f"w{i}"],
                stdout=open(logdir / f"worker{i}.log", "w"), stderr=subprocess.STDOUT, env=env,
            )
        )
    from distributed import Client

    deadline = time.time() + 60
    with Client(address, timeout="60s") as c:
        while len(c.scheduler_info()["workers"]) < 2:
            if time.time() > deadline:
                raise RuntimeError(f"dask workers did not start; logs in {logdir}")
            time.sleep(0.2)
    yield address
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def run_cli(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """``tilemask ARGS`` as a user runs it."""
    exe = Path(sys.executable).parent / "tilemask"
    return subprocess.run(
        [str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
