"""COG assembly: tilemask's CogSink against ``rio cogeo create`` of a raster of the same size.

    python benchmarks/bench_cog.py [--size 32768] [--chunks 2048] [--workers 2] [--dir /tmp]

What is timed, on a synthetic labels raster of ``size x size`` (uint8, 3 classes
and nodata) with 2-class uint8 probabilities:

* ``sink: write pieces`` — workers of a LocalCluster (``--workers`` processes)
  make each chunk and ``CogSink.write`` it (piece GeoTIFFs);
* ``sink: commit`` — ``CogSink.commit``: VRT + GDAL COG driver, labels (MODE
  overviews) and probabilities (AVERAGE overviews);
* ``floor: rio cogeo create`` — the same labels, and the same probabilities, as
  one tiled GeoTIFF each (written beforehand, untimed) turned into COGs by
  ``rio cogeo create`` with the same compression and resampling.  That is the
  physical floor of the assembly step: one process reading the raster once and
  writing a COG.

Peak memory is the largest sum of RSS over this process and all its children
(Dask workers, ``rio``), sampled every 0.1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from distributed import Client, LocalCluster
from peakmem import PeakMemory
from rasterio.transform import Affine

from tilemask.geometry import RasterGeometry
from tilemask.sinks import OutputLayout
from tilemask.sinks.cog import CogSink

CLASSES = ("background", "water", "forest")
NODATA = 255


def synthetic_chunk(region):
    """Labels and 2-class uint8 probabilities of one region: smooth fields plus noise, some nodata."""
    (r0, r1), (c0, c1) = region
    y, x = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    rng = np.random.default_rng(r0 * 100003 + c0)
    field = np.sin(x / 311.0) * np.cos(y / 517.0) + 0.3 * np.sin((x + y) / 97.0)
    field += rng.normal(0, 0.05, field.shape).astype(np.float32)
    p1 = np.rint(np.clip(0.5 + field, 0, 1) * 255).astype(np.uint8)
    probabilities = np.stack([255 - p1, p1])
    labels = np.where(field > 0.6, 2, np.where(field > 0.0, 1, 0)).astype(np.uint8)
    labels[(x - 9000) ** 2 + (y - 7000) ** 2 < 2500**2] = NODATA  # a round nodata hole
    return labels, probabilities


def write_synthetic(sink, region):
    labels, probabilities = synthetic_chunk(region)
    sink.write(region, labels, probabilities)


def regions(size, chunk):
    return [((r, min(r + chunk, size)), (c, min(c + chunk, size))) for r in range(0, size, chunk) for c in range(0, size, chunk)]


def layout(size, chunk):
    geometry = RasterGeometry(rasterio.crs.CRS.from_epsg(32633).to_wkt(), tuple(Affine(10, 0, 300000, 0, -10, 5200000).to_gdal()))
    return OutputLayout((size, size), (chunk, chunk), CLASSES, "uint8", 2, "uint8", geometry, "synthetic", NODATA)


def run_sink(folder: Path, size: int, chunk: int, workers: int) -> dict:
    sink = CogSink(str(folder / "sink_mask.tif"), layout(size, chunk))
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client, PeakMemory() as memory:
            start = time.perf_counter()
            sink.create()
            todo = regions(size, chunk)
            client.gather(client.map(write_synthetic, [sink] * len(todo), todo, pure=False))
            written = time.perf_counter()
            peak_writing, memory.peak = memory.peak, 0
            sink.commit()
            done = time.perf_counter()
            peak_committing = memory.peak
    return {"write": written - start, "commit": done - written, "peak_write": peak_writing, "peak": peak_committing,
            "bytes": sum(os.path.getsize(p) for p in folder.glob("sink_mask*.tif"))}  # fmt: skip


def write_plain_geotiff(path: Path, size: int, chunk: int, which: str) -> None:
    count = 1 if which == "labels" else 2
    lay = layout(size, chunk)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=count, dtype="uint8", tiled=True,
                       blockxsize=512, blockysize=512, compress="zstd", zstd_level=1, bigtiff="if_safer",
                       crs=rasterio.crs.CRS.from_wkt(lay.geometry.crs_wkt), transform=Affine.from_gdal(*lay.geometry.transform),
                       nodata=NODATA if which == "labels" else None) as dst:  # fmt: skip
        for region in regions(size, chunk):
            labels, probabilities = synthetic_chunk(region)
            window = rasterio.windows.Window.from_slices(*[slice(*r) for r in region])
            dst.write(labels[None] if which == "labels" else probabilities, window=window)


def run_floor(folder: Path, size: int, chunk: int) -> dict:
    sources = {which: folder / f"plain_{which}.tif" for which in ("labels", "probabilities")}
    for which, path in sources.items():
        write_plain_geotiff(path, size, chunk, which)
    rio = str(Path(sys.executable).with_name("rio"))
    seconds, peak = 0.0, 0
    for which, path in sources.items():
        cmd = [rio, "cogeo", "create", str(path), str(folder / f"floor_{which}.tif"), "--cog-profile", "zstd",
               "--overview-resampling", "mode" if which == "labels" else "average", "--blocksize", "512",
               "--threads", "ALL_CPUS", "--quiet"]  # fmt: skip
        with PeakMemory() as memory:
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            seconds += time.perf_counter() - start
        peak = max(peak, memory.peak)
    return {"commit": seconds, "peak": peak, "bytes": sum(os.path.getsize(p) for p in folder.glob("floor_*.tif"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32768)
    parser.add_argument("--chunks", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_cog_", dir=args.dir))
    try:
        sink = run_sink(folder, args.size, args.chunks, args.workers)
        floor = run_floor(folder, args.size, args.chunks)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    gib = 1024**3
    print(f"\nCOG assembly, {args.size}x{args.size} uint8 labels + 2-class uint8 probabilities, "
          f"chunks {args.chunks}, {args.workers} workers, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'step':42} {'wall s':>8} {'peak RSS GiB':>13} {'output GiB':>11}")
    print(f"{'sink: workers write pieces':42} {sink['write']:8.1f} {sink['peak_write'] / gib:13.2f} {'':>11}")
    print(f"{'sink: commit (VRT -> GDAL COG driver)':42} {sink['commit']:8.1f} {sink['peak'] / gib:13.2f} {sink['bytes'] / gib:11.2f}")
    print(f"{'floor: rio cogeo create (GTiff -> COG)':42} {floor['commit']:8.1f} {floor['peak'] / gib:13.2f} {floor['bytes'] / gib:11.2f}")
    print(f"commit / floor: {sink['commit'] / floor['commit']:.2f}")


if __name__ == "__main__":
    main()
