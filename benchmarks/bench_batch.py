"""Batches: a zip archive of small real scenes, and the scheduler's load with 100,000 inputs listed.

    python benchmarks/bench_batch.py        # 1,000 scenes; 100,000 listed inputs for 60 s; 16384^2 interrupted
    python benchmarks/bench_batch.py --scenes 200 --listed 0 --resume 0

* **archive**: ``--scenes`` crops of 512 x 512 x 3 from the demo's Landsat scene
  (``workflows/demo/RGB.byte.tif``, shifted and flipped so no two are alike),
  tiled deflate GeoTIFFs stored in one zip; the demo's model (MONAI UNet 8-16-32,
  roi 128, overlap 0.25, gaussian, batch 8), labels as GeoTIFF.  Three runs,
  each a fresh process timed from its start to its exit: ``tilemask run`` with
  ``input: {archive: scenes.zip, members: "*.tif"}`` (default settings: a window
  of items in flight); the same with one item at a time (the sequential run of
  before issue 11, ``DASK_TILEMASK__ITEMS_IN_FLIGHT=1``); and a plain MONAI loop
  in one process reading the same members through ``/vsizip/`` and writing a
  tiled GeoTIFF each.
* **resume**: a ``--resume``^2 raster (``benchmarks/bench_engine.py``'s, its
  UNet 16-32-64-128) interrupted with SIGTERM (tilemask takes it as Ctrl-C) once half its output chunks are
  written, then run again: the windows the resumed run predicted.
* **listed**: ``--listed`` inputs (symbolic links to one 256 x 256 scene) in an
  ``input: {list: ...}`` file, run on an external ``dask scheduler`` with one
  worker for ``--seconds``, then cancelled with ``tilemask cancel``: the time to
  the first finished input (lazy planning: nothing is opened up front), inputs
  per second, the scheduler's tasks (sampled) and its CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from scratch import scratch_folder

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "workflows" / "demo"
BIN = Path(sys.executable).parent

MONAI_LOOP = """
import sys, zipfile, numpy as np, rasterio, torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
net = UNet(**{args}); net.load_state_dict(torch.load("{weights}", weights_only=True)); net.eval()
mean = torch.tensor({mean}).view(3, 1, 1); std = torch.tensor({std}).view(3, 1, 1)
names = sorted(n for n in zipfile.ZipFile("{archive}").namelist() if n.endswith(".tif"))
for name in names:
    with rasterio.open("/vsizip/{archive}/" + name) as ds:
        profile, image = ds.profile, (torch.from_numpy(ds.read().astype(np.float32)) - mean) / std
    with torch.inference_mode():
        p = sliding_window_inference(image[None], (128, 128), 8, net, overlap=0.25, mode="gaussian").softmax(1)
    profile.update(driver="GTiff", count=1, dtype="uint8", compress="deflate", tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open("{out}/" + name.replace(".tif", "_mask.tif"), "w", **profile) as dst:
        dst.write(p[0].argmax(0).numpy().astype(np.uint8), 1)
"""


def demo_workflow() -> dict:
    import yaml

    workflow = yaml.safe_load((REPO / "workflows" / "demo_landsat.yaml").read_text())
    workflow["model"]["weights"] = str(DEMO / "landsat_water_land_cloud.pt")
    workflow["inference"]["device"] = "cpu"
    return workflow


def make_archive(path: Path, n: int) -> None:
    import rasterio
    from rasterio.io import MemoryFile
    from rasterio.windows import Window

    with rasterio.open(DEMO / "RGB.byte.tif") as src:
        whole, profile = src.read(), src.profile
        transform = src.transform
    height, width = whole.shape[1:]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            row, col = (i * 53) % (height - 512), (i * 37) % (width - 512)
            crop = whole[:, row : row + 512, col : col + 512]
            crop = crop[:, ::-1] if i % 2 else crop
            crop = crop[:, :, ::-1] if (i // 2) % 2 else crop
            meta = {**profile, "driver": "GTiff", "width": 512, "height": 512, "tiled": True, "blockxsize": 256,
                    "blockysize": 256, "compress": "deflate",
                    "transform": rasterio.windows.transform(Window(col, row, 512, 512), transform)}  # fmt: skip
            with MemoryFile() as memory:
                with memory.open(**meta) as dst:
                    dst.write(np.ascontiguousarray(crop))
                zf.writestr(f"scenes/scene{i:04d}.tif", memory.read())


def timed(command: list[str], cwd: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return wall


def archive_benchmark(work: Path, n: int) -> None:
    archive = work / "scenes.zip"
    if not archive.exists():
        make_archive(archive, n)
    workflow = demo_workflow()
    workflow["input"] = {"archive": str(archive), "members": "*.tif"}
    workflow["output"] = {"path": "out/{stem}_mask.tif", "chunks": 512, "quicklook": False}
    (work / "archive.json").write_text(json.dumps(workflow))
    tilemask = [str(BIN / "tilemask"), "run", "--quiet", str(work / "archive.json")]
    walls = {}
    for name, env in [("tilemask (default)", {}), ("tilemask, one item at a time", {"DASK_TILEMASK__ITEMS_IN_FLIGHT": "1"})]:
        shutil.rmtree(work / "out", ignore_errors=True)
        walls[name] = timed(tilemask, work, env)
    out = work / "loop"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    (out / "scenes").mkdir()
    normalize = workflow["preprocess"]["normalize"]
    script = MONAI_LOOP.format(args=workflow["model"]["args"], weights=workflow["model"]["weights"], archive=archive,
                               out=out, mean=normalize["mean"], std=normalize["std"])  # fmt: skip
    walls["plain MONAI loop"] = timed([sys.executable, "-c", script], work)
    loop = walls["plain MONAI loop"]
    print(f"\n{n} scenes of 512 x 512 x 3 in one zip (demo model, roi 128), each a fresh process:")
    print(f"  {'run':<32} {'seconds':>8} {'scenes/s':>9} {'speed vs loop':>14}  (the loop's seconds / the run's)")
    for name, wall in walls.items():
        print(f"  {name:<32} {wall:8.1f} {n / wall:9.2f} {loop / wall:13.2f}x")


def scheduler_benchmark(work: Path, listed: int, seconds: float) -> None:
    import psutil
    import rasterio
    from distributed import Client

    folder = work / "listed"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    with rasterio.open(DEMO / "RGB.byte.tif") as src:
        profile, data = src.profile, src.read(window=((0, 256), (0, 256)))
    profile.update(width=256, height=256, driver="GTiff")
    with rasterio.open(folder / "one.tif", "w", **profile) as dst:
        dst.write(data)
    lines = []
    for i in range(listed):
        link = folder / f"s{i:06d}.tif"
        os.symlink("one.tif", link)
        lines.append(str(link))
    (work / "listed.txt").write_text("\n".join(lines) + "\n")
    workflow = demo_workflow()
    workflow["input"] = {"list": str(work / "listed.txt")}
    workflow["output"] = {"path": "listed-out/{stem}_mask.tif", "chunks": 256, "quicklook": False}
    (work / "listed.json").write_text(json.dumps(workflow))
    shutil.rmtree(work / "listed-out", ignore_errors=True)

    scheduler_file = work / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    scheduler = subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", scheduler_file], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            if scheduler.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("dask scheduler wrote no scheduler file within 60 s"
                                 f"{'' if scheduler.poll() is None else f' (it exited, status {scheduler.poll()})'}")
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen([BIN / "dask", "worker", address, "--nthreads", "2", "--no-dashboard"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        with Client(address) as client:
            client.wait_for_workers(1, timeout=60)
            start = time.perf_counter()
            run = subprocess.Popen([BIN / "tilemask", "run", "--quiet", "--scheduler", address, str(work / "listed.json")],
                                   cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
            jobs = work / "listed-out" / ".tilemask" / "jobs"
            first = None
            cpu = psutil.Process(scheduler.pid)
            cpu.cpu_percent()
            tasks, cpu_samples = [], []
            while time.perf_counter() - start < seconds and run.poll() is None:  # all done: the rate so far
                time.sleep(0.5)
                tasks.append(client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)))
                cpu_samples.append(cpu.cpu_percent())
                manifests = list(jobs.glob("*/manifest.jsonl")) if jobs.exists() else []
                if first is None and manifests and '"ok"' in manifests[0].read_text():
                    first = time.perf_counter() - start
            elapsed = time.perf_counter() - start
            done = sum(1 for line in manifests[0].read_text().splitlines() if '"ok"' in line) if manifests else 0
            job = manifests[0].parent.name if manifests else None
            finished = run.poll() is not None
            if job and not finished:
                subprocess.run([BIN / "tilemask", "cancel", str(manifests[0].parent)], capture_output=True, timeout=120)
            run.wait(timeout=120)
        print(f"\n{listed:,} inputs listed (lazy planning), one 2-thread worker, "
              f"{'finished' if finished else 'stopped'} after {elapsed:.0f} s:")
        print(f"  first input finished after {first if first is not None else float('nan'):.2f} s; "
              f"{done} inputs done, {done / elapsed:.1f} inputs/s")  # fmt: skip
        print(f"  scheduler: tasks held {np.median(tasks):.0f} median, {max(tasks)} max; "
              f"CPU {np.mean(cpu_samples):.1f}% mean, {max(cpu_samples):.1f}% max of one core")  # fmt: skip
        print(f"  memory of the scheduler process: {psutil.Process(scheduler.pid).memory_info().rss / 2**20:.0f} MiB")
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


def resume_benchmark(work: Path, size: int) -> None:
    """A ``size``^2 run interrupted (SIGTERM, as Ctrl-C) once half its chunks are written, then run again."""
    import torch
    from bench_engine import ARGS, BATCH, CHUNKS, MEAN, OVERLAP, ROI, STD, make_raster, network

    raster = work / f"raster{size}.tif"
    if not raster.exists():
        make_raster(raster, size)
    torch.save(network().state_dict(), work / "unet.pt")
    workflow = {
        "version": 1, "input": str(raster),
        "model": {"network": "UNet", "args": ARGS, "weights": str(work / "unet.pt")},
        "preprocess": {"normalize": {"mean": [MEAN] * 3, "std": [STD] * 3}},
        "inference": {"roi_size": [ROI, ROI], "overlap": OVERLAP, "batch_size": BATCH, "device": "cpu"},
        "output": {"path": "resume/{stem}_mask.tif", "chunks": CHUNKS, "quicklook": False},
    }  # fmt: skip
    (work / "resume.json").write_text(json.dumps(workflow))
    shutil.rmtree(work / "resume", ignore_errors=True)
    chunks = (-(-size // CHUNKS)) ** 2
    command = [str(BIN / "tilemask"), "run", "--quiet", str(work / "resume.json")]
    start = time.perf_counter()
    first = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ledger = work / "resume"
    while len(list(ledger.glob(".tilemask-*.done/*_*.json"))) < chunks // 2:
        if first.poll() is not None:
            sys.exit(f"the run ended before half its chunks were written: {first.stderr.read()[-2000:]}")
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGTERM)  # as Ctrl-C (a background shell ignores SIGINT in its children)
    first.communicate(timeout=300)
    interrupted = time.perf_counter() - start
    written = len(list(ledger.glob(".tilemask-*.done/*_*.json")))
    start = time.perf_counter()
    resumed = subprocess.run(command, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if resumed.returncode:
        sys.exit(f"the resumed run failed: {resumed.stderr[-2000:]}")
    windows = int(resumed.stdout.split(" windows in ")[0].rsplit(" ", 1)[1])
    from tilemask.geometry import WindowPlan

    total = WindowPlan.build((size, size), [ROI, ROI], OVERLAP, CHUNKS).n_windows
    print(f"\n{size}^2 (UNet 16-32-64-128, roi {ROI}, chunks {CHUNKS}): interrupted after {interrupted:.0f} s with "
          f"{written} of {chunks} chunks written; the resumed run predicted {windows} of {total} windows "
          f"({windows / total:.0%}) in {wall:.0f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--listed", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--resume", type=int, default=16384, help="size of the raster interrupted and resumed (0: skip)")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    work = Path(args.dir) if args.dir else scratch_folder("tilemask-batch-")
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores; work folder {work}")
    if args.scenes:
        archive_benchmark(work, args.scenes)
    if args.listed:
        scheduler_benchmark(work, args.listed, args.seconds)
    if args.resume:
        resume_benchmark(work, args.resume)


if __name__ == "__main__":
    main()
