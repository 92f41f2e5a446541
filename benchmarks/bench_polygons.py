"""Polygons: tilemask's chunk-parallel ``write_polygons`` against ``rasterio.features.shapes`` on the whole image.

    python benchmarks/bench_polygons.py [--size 10000] [--chunks 2048] [--workers 2] [--fine 0.08] [--stages] [--dir /tmp]

Makes a ``size x size`` uint8 label raster of 4 classes (0 = background): a smooth
coarse noise field, upsampled, plus a little fine noise so that region edges are
ragged like a model's, cut at quantiles (about 4,800 regions at 10000^2), written
as a tiled (512) deflate GeoTIFF in EPSG:32633 with 10 m pixels, as tilemask's
COG labels are read.  Then, in one run:

* ``tilemask`` -- ``write_polygons(..., chunks=--chunks)`` to a GeoPackage on a
  LocalCluster of ``--workers`` processes (1 thread each), twice: the first run
  includes the workers' imports;
* ``reference`` -- in a fresh process: read the whole raster,
  ``rasterio.features.shapes(labels, mask=labels != 0, connectivity=4,
  transform=...)``, a GeoDataFrame with the same ``class`` and ``area_m2``
  columns, written to a GeoPackage by geopandas (pyogrio);
* a check that both files hold the same polygons (``shapely.normalize``d WKB
  and class), untimed;
* with ``--stages``: tilemask's steps run serially in this process without Dask
  (read, polygonize_chunk, border_groups, finish_chunk, write), each timed.

Peak memory is the largest sum of RSS of this process and its children (Dask
workers, the reference process), sampled every 0.1 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from peakmem import PeakMemory

CLASSES = ("background", "water", "forest", "urban")
TRANSFORM = (10.0, 0.0, 300_000.0, 0.0, -10.0, 5_200_000.0)  # affine order


def make_raster(path: Path, size: int, fine: float, seed: int = 0, coarse: int = 16, block: int = 1024) -> None:
    """Smooth classes with ragged edges, written by strips of rows (never a second float copy of the image)."""
    import rasterio
    from rasterio.transform import Affine
    from rasterio.windows import Window
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n = size // coarse + 2
    low = ndimage.gaussian_filter(rng.normal(size=(n, n)).astype(np.float32), 3)
    low /= low.std()
    thresholds = np.quantile(low, [0.35, 0.6, 0.85])
    x = np.arange(size) / coarse
    j, wx = x.astype(np.int64), (x % 1).astype(np.float32)
    rows = low[:, j] * (1 - wx) + low[:, j + 1] * wx  # bilinear: along x here, along y per strip
    profile = {"driver": "GTiff", "height": size, "width": size, "count": 1, "dtype": "uint8", "crs": "EPSG:32633",
               "transform": Affine(*TRANSFORM), "tiled": True, "blockxsize": 512, "blockysize": 512,
               "compress": "deflate"}  # fmt: skip
    with rasterio.open(path, "w", **profile) as ds:
        for row in range(0, size, block):
            h = min(block, size - row)
            y = np.arange(row, row + h) / coarse
            i, wy = y.astype(np.int64), (y % 1).astype(np.float32)[:, None]
            field = rows[i] * (1 - wy) + rows[i + 1] * wy
            field += fine * ndimage.gaussian_filter(rng.normal(size=(h + 8, size)).astype(np.float32), 1.5)[4 : 4 + h]
            ds.write(np.digitize(field, thresholds).astype(np.uint8), 1, window=Window(0, row, size, h))


REFERENCE = """
import sys, geopandas as gpd, numpy as np, rasterio, rasterio.features, shapely
src, out, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
with rasterio.open(src) as ds:
    labels, transform, crs = ds.read(1), ds.transform, ds.crs
geoms, classes = [], []
for g, v in rasterio.features.shapes(labels, mask=labels != 0, connectivity=4, transform=transform):
    geoms.append(shapely.geometry.shape(g))
    classes.append(names[int(v)])
frame = gpd.GeoDataFrame({"class": classes}, geometry=geoms, crs=crs)
frame["area_m2"] = frame.geometry.area
frame.to_file(out, driver="GPKG", engine="pyogrio")
print(len(frame))
"""


def timed(fn):
    with PeakMemory() as mem:
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
    return seconds, mem.peak / 2**30, value


def same_polygons(a: Path, b: Path) -> bool:
    import pyogrio
    import shapely

    def key(path):
        table = pyogrio.read_arrow(str(path))[1]
        geoms = shapely.from_wkb(np.asarray(table["geom"] if "geom" in table.column_names else table["geometry"]))
        return Counter(zip(shapely.to_wkb(shapely.normalize(geoms)), table["class"].to_pylist()))

    return key(a) == key(b)


def stages(raster: Path, out: Path, chunks: int) -> list[tuple[str, float]]:
    """tilemask's steps serially in this process, without Dask: where the time goes."""
    import rasterio
    from rasterio.windows import Window

    from tilemask import polygon_files, vectors

    times: dict[str, float] = {}

    def clock(name, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return value

    with rasterio.open(raster) as ds:
        rule = polygon_files.AreaRule(tuple(ds.transform.to_gdal()), ds.crs.to_wkt())
        size = ds.shape
        grid = (-(-size[0] // chunks), -(-size[1] // chunks))
        pieces = {}
        for i in range(grid[0]):
            for j in range(grid[1]):
                r0, c0 = i * chunks, j * chunks
                window = Window(c0, r0, min(chunks, size[1] - c0), min(chunks, size[0] - r0))
                block = clock("read blocks", ds.read, 1, window=window)
                pieces[(i, j)] = clock(
                    "1. polygonize_chunk", vectors.polygonize_chunk, block, (i, j), (r0, c0), ds.nodata
                )
    borders = {k: vectors.chunk_border(p) for k, p in pieces.items()}
    groups = clock("2. border_groups", vectors.border_groups, borders, grid)
    grouped, owned = {k: [] for k in pieces}, {k: [] for k in pieces}
    for group in groups:
        owned[(int(group[0][0]), int(group[0][1]))].append(group)
        for i, j, r in group:
            grouped[(int(i), int(j))].append(int(r))
    selections = {k: vectors.select_pieces(pieces[k], np.array(v)) for k, v in grouped.items()}
    batches = [
        clock("3-4. finish_chunk (merge, world, area)", vectors.finish_chunk, pieces[k], np.array(grouped[k], np.int64),
              owned[k], {(int(i), int(j)): selections[(int(i), int(j))] for g in owned[k] for i, j, _ in g}, rule, CLASSES)
        for k in pieces
    ]  # fmt: skip
    clock("5. write GeoPackage", polygon_files.write_features, str(out), ".gpkg", iter(batches), rule, size[0])
    return list(times.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--chunks", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fine", type=float, default=0.08, help="fine noise on the class edges (more: more regions)")
    parser.add_argument("--runs", type=int, default=2, help="tilemask runs on one cluster (the first has the imports)")
    parser.add_argument("--stages", action="store_true", help="also time tilemask's steps serially without Dask")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from tilemask.vectors import write_polygons

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        raster = tmp / "labels.tif"
        start = time.perf_counter()
        make_raster(raster, args.size, args.fine)
        print(f"data: {args.size}x{args.size} labels in {time.perf_counter() - start:.0f} s", flush=True)

        rows = []
        s, m, count = timed(lambda: subprocess.run([sys.executable, "-c", REFERENCE, str(raster), str(tmp / "ref.gpkg"), ",".join(CLASSES)],
                                                   check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
        rows.append(("reference: rasterio shapes + geopandas GPKG (1 process)", s, m))
        print(f"reference: {count} polygons", flush=True)
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        with cluster, Client(cluster) as client:
            for run in range(args.runs):
                out = str(tmp / f"tilemask{run}.gpkg")
                s, m, _ = timed(
                    lambda out=out: write_polygons(
                        str(raster), out, client=client, class_names=CLASSES, chunks=args.chunks
                    )
                )
                label = "first run" if run == 0 else "again"
                rows.append((f"tilemask write_polygons ({args.workers} workers, chunks {args.chunks}, {label})", s, m))
        print("identical polygons:", same_polygons(tmp / "tilemask0.gpkg", tmp / "ref.gpkg"), flush=True)

        reference = rows[0][1]
        print(f"\n{'':62s} {'seconds':>8s} {'x ref':>6s} {'peak GiB':>9s}")
        for name, s, m in rows:
            print(f"{name:62s} {s:8.1f} {s / reference:6.2f} {m:9.2f}")
        if args.stages:
            print(f"\ntilemask steps, serial, no Dask (chunks {args.chunks}):")
            steps = stages(raster, tmp / "stages.gpkg", args.chunks)
            for name, s in steps:
                print(f"  {name:44s} {s:7.2f} s")
            print(f"  {'total':44s} {sum(s for _, s in steps):7.2f} s")


if __name__ == "__main__":
    main()
