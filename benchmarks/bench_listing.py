"""How long ``tilemask serve`` takes to list a folder of many outputs the first time, and again.

    python benchmarks/bench_listing.py [--files 1000] [--dir /tmp]

A 512 x 512 label COG with probabilities is written by tilemask's own COG writer
(``CogSink``, as ``bench_cog.py``) and copied ``--files`` times (labels and
probabilities: twice as many files) into ``--dir``. The served folder's catalog
(``tilemask.serve.catalog.Catalog``: what ``/``, ``/collections``, the STAC
catalog and ``/map`` list) classifies every file on the first request and keeps
the answers by file stamp. The reference, in the same run: what any listing must
learn, each file opened once with rasterio (its tags, nodata, CRS and bounds in
CRS84), one after the other, without GDAL listing the folder at each open.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import rasterio
from bench_cog import run_sink

from tilemask.serve.catalog import Catalog, lonlat_bounds


def folder_of_copies(top: Path, n: int) -> Path:
    one = top / "one"
    one.mkdir(parents=True, exist_ok=True)
    if not (one / "sink_mask.tif").exists():
        run_sink(one, 512, 512, workers=1)
    folder = top / f"copies_{n}"
    if not folder.exists():
        folder.mkdir()
        for i in range(n):
            shutil.copyfile(one / "sink_mask.tif", folder / f"s{i:05d}_mask.tif")
            shutil.copyfile(one / "sink_mask_probabilities.tif", folder / f"s{i:05d}_mask_probabilities.tif")
    return folder


def reference(folder: Path) -> float:
    start = time.perf_counter()
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="TRUE"):  # as the catalog opens them: no folder listing
        for path in sorted(folder.iterdir()):
            with rasterio.open(path) as ds:
                ds.tags(), ds.nodata
                lonlat_bounds(ds.crs.to_wkt(), ds.bounds)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="label outputs (each with its probabilities)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the copies are kept between runs")
    args = parser.parse_args()
    folder = folder_of_copies(Path(args.dir) / "tilemask_bench_listing", args.files)
    catalog = Catalog(folder)
    start = time.perf_counter()
    entries = catalog.entries()
    first = time.perf_counter() - start
    start = time.perf_counter()
    catalog.entries()
    again = time.perf_counter() - start
    floor = reference(folder)
    print(f"{len(entries)} entries from {2 * args.files} files")
    print(f"{'':28} {'s':>8} {'/ reference':>12}")
    print(f"{'first listing':28} {first:8.2f} {first / floor:11.2f}x")
    print(f"{'listing again (cached)':28} {again:8.3f} {again / floor:11.3f}x")
    print(f"{'reference: rasterio, 1 open':28} {floor:8.2f} {1:11.2f}x")


if __name__ == "__main__":
    main()
