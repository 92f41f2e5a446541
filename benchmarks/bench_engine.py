"""tilemask against MONAI's sliding_window_inference and against the model alone, in one run.

    python benchmarks/bench_engine.py                      # 16384^2 side by side + 32768^2 tilemask and the bare model
    python benchmarks/bench_engine.py --sizes 4096 --giga 0  # a quick look
    python benchmarks/bench_engine.py --giga 0 --precision bfloat16  # every side under torch.autocast
    python benchmarks/bench_engine.py --device cuda                  # every side on the GPU

For each size a 3-band uint8 GeoTIFF (tiled, deflate, smooth synthetic content)
is written by windows, then:

* **tilemask**: ``tilemask.run`` on an embedded cluster (the CLI defaults under ``--quiet``),
  labels to Zarr, ``output.chunks`` 2048, in a process of its own (``tilemask_column.py``) whose client
  does not import torch, as a user's ``tilemask run``; timed from that process's start to its end (the
  other columns' imports of torch and MONAI and the network's building are not timed);
* **MONAI**: the whole image read with rasterio, normalized, one
  ``sliding_window_inference`` call (same roi, overlap, gaussian mode, batch),
  argmax, labels written with rasterio: what a user does today;
* **model only**: the same number of windows, in the same batches, through the
  same network with every core, no reading, blending or writing: the floor in
  torch eager;
* **backend only**: the same through the runner ``inference.backend: auto`` picks
  on a worker (:mod:`tilemask.backends`), each batch started behind the one running
  where the runner takes that, as a worker's: the floor tilemask itself can reach.
  It runs just before tilemask's column and again just after it, and the floor is the
  mean of the two (:func:`run_bracketed`).  MONAI runs first, while this process is still
  as a user's script starts (glibc untuned, no backend runner built); the eager model last.

Peak memory is the largest sum of RSS over a column's process and all its children
(tilemask's embedded scheduler and workers), sampled every 0.1 s; the other columns run in this process,
which holds torch, MONAI and the network.  tilemask's CPU seconds (its processes', sampled likewise) and the
backend's (this process's, over its timed batches) give the least time tilemask could take on these cores
with the work it did: the breakdown's first line.  Network: MONAI UNet
with channels 16-32-64-128, strides 2-2-2, 2 residual units, roi 256,
overlap 0.25, batch 8, random weights (speed does not depend on them).
With ``--precision bfloat16`` or ``float16`` tilemask runs with ``inference.precision``
set, and MONAI's call and the bare model run under ``torch.autocast`` in it.  With ``--device cuda`` every
side runs the network on the GPU (MONAI's call with the image and its sums there too) and the bare model's
time ends with a ``torch.cuda.synchronize``; peak memory stays the host's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import rasterio
import torch
from peakmem import PeakMemory
from rasterio.transform import from_origin
from rasterio.windows import Window
from scratch import scratch_folder
from tilemask_column import RESULT

ARGS = dict(spatial_dims=2, in_channels=3, out_channels=2, channels=[16, 32, 64, 128], strides=[2, 2, 2], num_res_units=2)
ROI, OVERLAP, BATCH, CHUNKS = 256, 0.25, 8, 2048
MEAN, STD = 100.0, 50.0


def make_raster(path: Path, size: int) -> None:
    """Smooth 3-band uint8 content written strip by strip (never whole in memory): the noise drawn in order
    from one generator, the rest of each strip composed on a thread pool and compressed by GDAL's threads."""
    profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8", tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate", crs="EPSG:32618",
                   transform=from_origin(500000, 4000000, 10, 10), BIGTIFF="IF_SAFER",
                   NUM_THREADS="ALL_CPUS")  # fmt: skip
    rng, step = np.random.default_rng(0), 2048

    def compose(r: int, noise: list[np.ndarray]) -> np.ndarray:
        rows = np.arange(r, r + len(noise[0]))[:, None]
        base = 100 + 60 * np.sin(rows / 700.0) * np.cos(np.arange(size)[None, :] / 900.0)
        return np.stack([(base + 15 * band + n).clip(0, 255).astype(np.uint8) for band, n in enumerate(noise)])

    with rasterio.open(path, "w", **profile) as ds, ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        def write_first() -> None:
            r, strip = strips.popleft()
            data = strip.result()
            ds.write(data, window=Window(0, r, size, data.shape[1]))

        strips = deque()  # (first row, the strip being composed), up to 3 ahead of the writes
        for r in range(0, size, step):
            noise = [rng.integers(0, 20, (min(step, size - r), size)) for _ in range(3)]
            strips.append((r, pool.submit(compose, r, noise)))
            if len(strips) > 2:
                write_first()
        while strips:
            write_first()


def network(seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(**ARGS).eval()


def autocast(precision: str, device: torch.device):
    """``torch.autocast`` on ``device`` in ``precision``; off for float32."""
    return torch.autocast(device.type, dtype=getattr(torch, precision), enabled=precision != "float32")


def run_tilemask(raster: Path, weights: Path, out: Path, probabilities: str = "none", precision: str = "float32",
                 device: torch.device = torch.device("cpu"), backend: str = "auto") -> dict:  # fmt: skip
    """tilemask's column: ``tilemask_column.py`` in a process of its own (its client without torch, as a user's
    ``tilemask run``), timed from its start to its end, its peak memory that of it and its children."""
    params = dict(raster=str(raster), weights=str(weights), out=str(out), args=ARGS, mean=MEAN, std=STD, roi=ROI,
                  overlap=OVERLAP, batch=BATCH, chunks=CHUNKS, probabilities=probabilities, precision=precision,
                  device=str(device), backend=backend)  # fmt: skip
    column = [sys.executable, str(Path(__file__).with_name("tilemask_column.py")), json.dumps(params)]
    read_through(raster)
    start = time.perf_counter()
    with subprocess.Popen(column, stdout=subprocess.PIPE, text=True) as process, PeakMemory(process.pid) as mem:
        printed, _ = process.communicate()
    end = time.perf_counter()
    if process.returncode:
        raise SystemExit(f"the tilemask column failed (exit status {process.returncode})")
    (line,) = [line for line in printed.splitlines() if line.startswith(RESULT)]
    result = json.loads(line[len(RESULT):])
    if result["client_imported_torch"]:
        raise SystemExit("the tilemask column's client imported torch")
    return {**result, "wall": end - start, "peak": mem.peak, "own": mem.own_at_peak, "cpu": mem.cpu_seconds}


def print_peak(t: dict) -> None:
    print(f"tilemask's peak: {gib(t['own'])} the column's process (the client, without torch), "
          f"{gib(t['peak'] - t['own'])} the cluster's processes")


def print_stages(t: dict, b: dict) -> None:
    """Where tilemask's time went, per worker stage (tilemask.timing) and in CPU seconds, against the backend
    alone (``b``)."""
    from tilemask import timing

    floor, cores = b["wall"], os.cpu_count() or 1
    if b["device"].type == "cpu":  # on a GPU the floor's CPU seconds include its waits for the device
        busy, least = t["cpu"] / (t["wall"] * cores), t["cpu"] / cores
        print(f"CPU: tilemask's processes used {t['cpu']:.1f} CPU s in {t['wall']:.1f} s ({busy:.0%} of the "
              f"{cores} cores), {t['cpu'] - b['cpu']:+.1f} CPU s against the backend alone ({b['cpu']:.1f}); with "
              f"that work tilemask cannot take less than {least:.1f} s on {cores} cores, {least / floor:.2f}x the "
              f"backend alone")  # fmt: skip
    stages = t["stages"]
    order = ("read", "preprocess", "model", "accumulate", "blend", "write")
    print("worker stages, seconds summed over threads: " + ", ".join(f"{k} {stages.get(k, 0.0):.1f}" for k in order))
    cpu = t["stages_cpu"]
    zarr = cpu.get(timing.ZARR_THREADS, 0.0)
    print("worker stages, CPU seconds of the threads that ran them (no waits for a core): "
          + ", ".join(f"{k} {cpu.get(k, 0.0):.1f}" for k in order if k != "model")
          + f", and zarr's own threads {zarr:.1f} (here: encoding and storing the Zarr chunks); "
          f"{sum(cpu.get(k, 0.0) for k in order) + zarr:.1f} in all")  # fmt: skip
    run, model = t["inference"], stages.get("model", 0.0)
    print(f"forward passes in the run {model:.1f} s vs {floor:.1f} s alone ({model / floor:.2f}x); the "
          f"compute thread's own work (cutting windows, adding up answers) {stages.get('accumulate', 0.0):.1f} s, "
          f"beside them where batches are queued; start-up and shutdown {t['wall'] - run:.1f} s")  # fmt: skip
    print(f"start-up and shutdown: the column's process start, imports and exit {t['wall'] - t['inside']:.1f} s, cluster "
          f"start {t['cluster_up']:.1f} s, tilemask.run around the item's run {t['run'] - run:.1f} s (planning, the "
          f"network's probe), cluster close {t['cluster_close']:.1f} s")  # fmt: skip
    probe = ("import", "device", "network", "first window")
    print("the probe on the worker: " + ", ".join(f"{k} {stages.get(f'probe: {k}', 0.0):.1f} s" for k in probe))


def run_cogeo_create(sources: list[str], workdir: Path) -> dict:
    """``rio cogeo create`` of rasters of the same size as tilemask's COGs: the floor of the assembly step.  Its
    peak memory is that of the ``rio`` processes (the largest of the runs), as tilemask's column is its own: this
    process, which holds torch, MONAI and the network (0.47 GiB), is not theirs."""
    rio = str(Path(sys.executable).parent / "rio")
    peak, start = 0, time.perf_counter()
    for i, src in enumerate(sources):
        resampling = "mode" if i == 0 else "average"
        command = [rio, "cogeo", "create", src, str(workdir / f"floor_{i}.tif"), "--cog-profile", "zstd",
                   "--overview-resampling", resampling, "--blocksize", "512", "--quiet"]  # fmt: skip
        with subprocess.Popen(command) as process, PeakMemory(process.pid) as mem:
            process.wait()
        if process.returncode:
            raise SystemExit(f"rio cogeo create failed (exit status {process.returncode})")
        peak = max(peak, mem.peak)
    return {"wall": time.perf_counter() - start, "peak": peak}


def read_through(path: Path) -> None:
    """Read ``path`` once, so that the column timed next finds it in the page cache.  This project's VM pages
    out cold page cache (DAMON's ``pageout``): a scene read minutes before came from disk again, and a tilemask
    run right after MONAI's spent 15.7 s reading against 6.1-7.1 s (2026-12-04).  Both columns get the same."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def run_monai(raster: Path, net: torch.nn.Module, out: Path, precision: str, device: torch.device) -> dict:
    from monai.inferers import sliding_window_inference

    read_through(raster)
    with PeakMemory() as mem:
        start = time.perf_counter()
        with rasterio.open(raster) as ds:
            profile = ds.profile
            image = torch.from_numpy(ds.read().astype(np.float32)).to(device)
        image -= MEAN
        image /= STD
        with torch.inference_mode(), autocast(precision, device):
            logits = sliding_window_inference(image[None], (ROI, ROI), BATCH, net, overlap=OVERLAP, mode="gaussian",
                                              sw_device=device, device=device)  # fmt: skip
        del image
        labels = logits[0].argmax(0).cpu().numpy().astype(np.uint8)
        del logits
        profile.update(count=1, dtype="uint8", compress="deflate")
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(labels, 1)
        wall = time.perf_counter() - start
    del labels
    gc.collect()
    return {"wall": wall, "peak": mem.peak}


def run_model_only(net, n_windows: int, precision: str, device: torch.device) -> dict:
    """``n_windows`` windows through ``net`` (a module or a backend's runner) in batches of BATCH, nothing else,
    on a thread of its own with glibc set as on a worker: otherwise glibc maps, page-faults and unmaps the
    activations again and again, and the same forward passes measured anywhere from 55 to 92 ms a batch."""
    from tilemask.backends import Halves
    from tilemask.cluster import reuse_large_allocations
    from tilemask.inference import QUEUED_BATCHES

    reuse_large_allocations()  # MONAI's run came first, timed as a user's script runs
    batch = torch.randn(BATCH, 3, ROI, ROI, device=device)
    timed: list[tuple[float, float]] = []  # wall and CPU seconds

    def forward_passes() -> None:
        with torch.inference_mode(), autocast(precision, device):
            net(batch)  # warm-up
            synchronize(device)
            start, cpu = time.perf_counter(), time.process_time()
            if isinstance(net, Halves):  # batches queued behind the one running, as on a worker
                queued = deque()
                for _ in range(math.ceil(n_windows / BATCH)):
                    queued.append(net.submit(batch))
                    if len(queued) > QUEUED_BATCHES:
                        queued.popleft().result()
                while queued:
                    queued.popleft().result()
            else:
                for _ in range(math.ceil(n_windows / BATCH)):
                    net(batch)
            synchronize(device)
            timed.append((time.perf_counter() - start, time.process_time() - cpu))

    thread = threading.Thread(target=forward_passes)
    thread.start()
    thread.join()
    ((wall, cpu),) = timed
    return {"wall": wall, "cpu": cpu}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_backend_only(weights: Path, n_windows: int, precision: str, device: torch.device,
                     backend: str = "auto") -> dict:  # fmt: skip
    """The model-only floor through the runner of ``backend`` on a worker (tilemask.backends), same batches."""
    from tilemask.backends import cached_runner
    from tilemask.settings import InferenceSettings, ModelSpec

    spec = ModelSpec.create("UNet", ARGS, str(weights))
    settings = InferenceSettings(roi=(ROI, ROI), batch_size=BATCH, backend=backend, precision=precision)
    backend, run = cached_runner(spec, settings, 3, device)
    return {**run_model_only(run, n_windows, "float32", device), "backend": backend}  # the runner autocasts


def run_bracketed(raster: Path, weights: Path, out: Path, size: int, args: argparse.Namespace,
                  device: torch.device) -> tuple[dict, dict]:  # fmt: skip
    """tilemask's column between two runs of the backend-only floor, the floor their mean: the VM's speed drifts
    (by 15% within 20 minutes here), and a floor measured minutes away from tilemask's run moved its ratio by more
    than the 1.10x goal allows.  The floor runs as many windows as MONAI's scan of the image; tilemask must
    predict as many.  The first floor builds the backend's runner, so on an empty ``TILEMASK_CACHE_DIR`` it,
    not tilemask's column, converts the network and settles ``auto``: the column starts as a user's second
    run does."""
    windows = monai_windows(size)
    before = run_backend_only(weights, windows, args.precision, device, args.backend)
    t = run_tilemask(raster, weights, out, "none", args.precision, device, args.backend)
    if t["windows"] != windows:
        raise SystemExit(f"tilemask predicted {t['windows']} windows, MONAI's scan has {windows}")
    after = run_backend_only(weights, windows, args.precision, device, args.backend)
    mean = {k: (before[k] + after[k]) / 2 for k in ("wall", "cpu")}
    return t, {**mean, "before": before["wall"], "after": after["wall"], "backend": before["backend"],
               "device": device}  # fmt: skip


def monai_windows(size: int) -> int:
    """The windows of MONAI's ``sliding_window_inference`` over a ``size``^2 image (``size`` >= ROI), at ROI and
    OVERLAP: its scan interval is ``int(roi * (1 - overlap))``."""
    from monai.data.utils import dense_patch_slices

    interval = int(ROI * (1 - OVERLAP))
    return len(dense_patch_slices((size, size), (ROI, ROI), (interval, interval)))


def describe_bracket(b: dict) -> str:
    return f"the mean of {b['before']:.1f} s just before tilemask and {b['after']:.1f} s just after"


def ratios_to_bracket(t: dict, b: dict) -> str:
    return (f"{t['wall'] / b['wall']:.2f} ({t['wall'] / b['before']:.2f} against the run before, "
            f"{t['wall'] / b['after']:.2f} against the run after)")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[16384], help="side-by-side sizes")
    parser.add_argument("--giga", type=int, default=32768, help="big size, tilemask and the bare model (0 to skip)")
    parser.add_argument("--cog", action="store_true", help="also the big size with COG output and probabilities")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where every side runs the network")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="tilemask's inference.precision; MONAI and the bare model under torch.autocast in it")
    parser.add_argument("--backend", default="auto", help="tilemask's inference.backend, and the backend-only column's")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():  # before any scene is written
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here (torch {torch.__version__})")
    torch.set_num_threads(os.cpu_count() or 1)
    workdir = Path(args.workdir) if args.workdir else scratch_folder("tilemask-bench-")
    workdir.mkdir(parents=True, exist_ok=True)
    net = network()
    weights = workdir / "unet.pt"
    torch.save(net.state_dict(), weights)
    net = net.to(device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    from tilemask.backend_cache import cpu_model

    print(f"machine: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, "
          f"{gib(psutil.virtual_memory().total)}{gpu}; torch {torch.__version__}")  # fmt: skip
    for size in args.sizes:
        raster = workdir / f"scene_{size}.tif"
        if not raster.exists():
            make_raster(raster, size)
        m = run_monai(raster, net, workdir / f"monai_{size}.tif", args.precision, device)
        t, b = run_bracketed(raster, weights, workdir / f"tilemask_{size}.zarr", size, args, device)
        p = run_model_only(net, t["windows"], args.precision, device)
        print(f"\n{size} x {size} x 3 ({t['windows']} windows of {ROI}^2, {t['tasks']} tasks), {args.precision} "
              f"on {device}")  # fmt: skip
        print(f"{'':14}{'wall s':>10}{'peak memory':>14}{'vs model only':>16}")
        print(f"{'tilemask':14}{t['wall']:>10.1f}{gib(t['peak']):>14}{t['wall'] / p['wall']:>15.2f}x")
        print(f"{'MONAI':14}{m['wall']:>10.1f}{gib(m['peak']):>14}{m['wall'] / p['wall']:>15.2f}x")
        print(f"{'model only':14}{p['wall']:>10.1f}{'':>14}{1.0:>15.2f}x  (torch eager, batches of {BATCH})")
        print(f"{'backend only':14}{b['wall']:>10.1f}{'':>14}{b['wall'] / p['wall']:>15.2f}x  ({b['backend']}, what "
              f"{args.backend} ran; {describe_bracket(b)})")  # fmt: skip
        print(f"tilemask / MONAI: time {t['wall'] / m['wall']:.2f}, peak memory {t['peak'] / m['peak']:.3f}; "
              f"tilemask / backend only: time {ratios_to_bracket(t, b)}")
        print_peak(t)
        print_stages(t, b)
    if args.giga:
        raster = workdir / f"scene_{args.giga}.tif"
        if not raster.exists():
            make_raster(raster, args.giga)
        t, b = run_bracketed(raster, weights, workdir / f"tilemask_{args.giga}.zarr", args.giga, args, device)
        gigapixels = args.giga**2 / 1e9
        print(f"\n{args.giga} x {args.giga} x 3 ({gigapixels:.2f} gigapixels, {t['windows']} windows): tilemask "
              f"and the bare model, {args.precision} on {device}")  # fmt: skip
        print(f"wall {t['wall']:.1f} s, peak memory of all processes {gib(t['peak'])}, "
              f"{t['tasks']} tasks = {t['tasks'] / gigapixels:.0f} tasks per gigapixel")  # fmt: skip
        print(f"backend only ({b['backend']}, what {args.backend} ran; {describe_bracket(b)}): {b['wall']:.1f} s; "
              f"tilemask / backend only: time {ratios_to_bracket(t, b)}")  # fmt: skip
        print_peak(t)
        print_stages(t, b)
        monai_bytes = args.giga**2 * 4 * (3 + ARGS["out_channels"] + 1)
        print(f"MONAI would hold input + output + count map in float32: {gib(monai_bytes)} (not run)")
        if args.cog:
            c = run_tilemask(raster, weights, workdir / f"tilemask_{args.giga}.tif", "uint8", args.precision, device)
            f = run_cogeo_create(c["outputs"][:2], workdir)
            print(f"\nsame raster, COG labels + uint8 probabilities COG: wall {c['wall']:.1f} s, "
                  f"peak memory {gib(c['peak'])}, COG assembly {c['commit']:.1f} s "
                  f"({100 * c['commit'] / c['wall']:.0f}% of the run)")  # fmt: skip
            print(f"floor: rio cogeo create of the two COGs: {f['wall']:.1f} s, peak memory {gib(f['peak'])}")


if __name__ == "__main__":
    main()
