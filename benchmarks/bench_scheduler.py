"""Scheduler scale: the real graph of a 100-gigapixel job, with tasks that do nothing, on a real scheduler.

    python benchmarks/bench_scheduler.py [--gigapixels 100] [--chunks 2048]

A metadata-only BigTIFF of ``sqrt(gigapixels) x sqrt(gigapixels)`` gigapixels (no
tile written) is planned as ``tilemask run`` plans it (UNet roi 256, overlap 0.25,
``output.chunks``), and :func:`tilemask.engine.build_graph` builds its graph.
Every task keeps its arguments (blocks, regions, the shared key, its
dependencies) but calls a function that returns at once, so what is measured is
Dask's own cost: the graph is submitted to a ``dask scheduler`` process with two
``dask worker`` processes on 127.0.0.1, and the script reports the tasks, the
time to build the graph, the time until the scheduler holds it, the time until
every task has run, and the scheduler's resident memory before and at its peak.
"""

from __future__ import annotations

import argparse
import importlib
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import rasterio
from rasterio.transform import from_origin
from scratch import scratch_folder

BIN = Path(sys.executable).parent
ARGS = dict(spatial_dims=2, in_channels=3, out_channels=2, channels=[16, 32, 64, 128], strides=[2, 2, 2], num_res_units=2)


def nothing(*args) -> None:
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workflow(folder: Path, side: int, chunks: int):
    """The workflow of a ``side``^2 raster (a sparse GeoTIFF: no pixel written) and a saved network."""
    import torch
    from monai.networks.nets import UNet

    from tilemask import Workflow

    scene = folder / "huge.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:3857",
                       transform=from_origin(0, 0, 1, 1), tiled=True, blockxsize=512, blockysize=512,
                       sparse_ok=True, BIGTIFF="YES"):  # fmt: skip
        pass
    weights = folder / "unet.pt"
    torch.save(UNet(**ARGS).state_dict(), weights)
    workflow = Workflow.from_dict({
        "version": 1, "input": str(scene),
        "model": {"network": "UNet", "args": ARGS, "weights": str(weights)},
        "inference": {"roi_size": [256, 256], "overlap": 0.25, "device": "cpu"},
        "output": {"path": str(folder / "out.zarr"), "chunks": chunks},
    }, base_dir=folder)  # fmt: skip
    return workflow


def plan_graph(workflow) -> tuple[dict, list]:
    """What a run plans and builds on the client (the imports, the input and the weights made before)."""
    from tilemask.engine import build_graph
    from tilemask.planning import plan_workflow

    (job,) = plan_workflow(workflow).jobs(out_channels=2)
    graph, _, deps = build_graph(job)
    return {k: (nothing, *v[1:]) if isinstance(v, tuple) else v for k, v in graph.items()}, list(deps)


class PeakRSS(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.stop.wait(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigapixels", type=float, default=100)
    parser.add_argument("--chunks", type=int, default=2048)
    args = parser.parse_args()
    side = int(math.sqrt(args.gigapixels * 1e9))
    folder = scratch_folder("tilemask-bench-scheduler-")
    workflow = make_workflow(folder, side, args.chunks)
    for module in ("tilemask.engine", "tilemask.planning"):  # before the clock starts, as a run's client has them
        importlib.import_module(module)

    start = time.perf_counter()
    graph, keys = plan_graph(workflow)
    built = time.perf_counter() - start
    print(f"{side} x {side} x 3 ({side * side / 1e9:.1f} gigapixels), chunks {args.chunks}: {len(graph)} tasks, "
          f"{len(keys)} held by the client; planned and built in {built:.1f} s")  # fmt: skip

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    workers = [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "2", "--no-dashboard",
                                 "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(2)]  # fmt: skip
    try:
        from distributed import Client, wait

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
            idle = psutil.Process(scheduler.pid).memory_info().rss
            sampler = PeakRSS(scheduler.pid)
            sampler.start()
            start = time.perf_counter()
            futures = client.get(graph, keys, sync=False)
            while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) < len(graph):
                time.sleep(0.05)
            submitted = time.perf_counter() - start
            wait(futures)
            done = time.perf_counter() - start
            sampler.stop.set()
            sampler.join()
    finally:
        for p in [*workers, scheduler]:
            p.terminate()
        for p in [*workers, scheduler]:
            p.wait(timeout=30)
    print(f"submission (until the scheduler holds every task): {submitted:.1f} s")
    print(f"every task run (nothing inside): {done:.1f} s, {len(graph) / done:.0f} tasks/s")
    print(f"scheduler RSS: {idle / 2**20:.0f} MiB idle, {sampler.peak / 2**20:.0f} MiB at peak "
          f"({(sampler.peak - idle) / len(graph) / 1024:.1f} KiB per task)")  # fmt: skip


if __name__ == "__main__":
    main()
