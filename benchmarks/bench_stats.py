"""Zonal statistics and instance labelling: tilemask vs exactextract / scipy / cc3d.

    python benchmarks/bench_stats.py [--size 32768] [--polygons 3000] [--volume 256] [--workers 2]

Makes a ``size x size`` uint8 tiled deflate GeoTIFF of smooth blobs (written by
windows, never whole in memory) and ``--polygons`` random buffered polygons, then
times ``tilemask.stats.compute_stats(coverage="fraction")`` on a LocalCluster
(twice: the first run includes the workers' imports) against ``exactextract`` (count + frac + unique) on the same file, and
``--coverage center``.  Instances: a ``volume^3`` blob volume, tilemask's
chunked labelling vs ``scipy.ndimage.label`` (and ``cc3d`` when installed).
Peak memory is the peak of the summed RSS of this process and all its children
(sampled every 100 ms with psutil: benchmarks/peakmem.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from peakmem import PeakMemory


def timed(fn):
    with PeakMemory() as mem:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, mem.peak / 2**30


def make_raster(path: Path, size: int, block: int = 512) -> None:
    import rasterio
    from rasterio.transform import Affine
    from rasterio.windows import Window
    from scipy import ndimage

    profile = dict(driver="GTiff", height=size, width=size, count=1, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(10, 0, 300_000, 0, -10, 5_000_000), tiled=True, blockxsize=block,
                   blockysize=block, compress="deflate")
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as ds:
        for row in range(0, size, 2048):
            for col in range(0, size, 2048):
                h, w = min(2048, size - row), min(2048, size - col)
                field = ndimage.gaussian_filter(rng.random((h, w), dtype=np.float32), 24)
                labels = np.digitize(field, [0.499, 0.501]).astype(np.uint8)
                ds.write(labels, 1, window=Window(col, row, w, h))


def make_regions(path: Path, raster: Path, n: int):
    import geopandas as gpd
    import rasterio
    import shapely

    with rasterio.open(raster) as ds:
        left, bottom, right, top = ds.bounds
    rng = np.random.default_rng(1)
    xs, ys = rng.uniform(left, right, n), rng.uniform(bottom, top, n)
    radii = rng.uniform(200, 3000, n)
    frame = gpd.GeoDataFrame({"id": np.arange(n)}, geometry=[shapely.Point(x, y).buffer(r) for x, y, r in zip(xs, ys, radii)], crs="EPSG:32633")
    frame.to_file(path)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32768)
    parser.add_argument("--polygons", type=int, default=3000)
    parser.add_argument("--volume", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=2048)
    args = parser.parse_args()

    from distributed import Client, LocalCluster
    try:
        from exactextract import exact_extract
    except ImportError as error:  # the reference, and what tilemask's fraction rule calls on its workers
        raise SystemExit(f"exactextract cannot be imported ({error}): the reference and the fraction rule need it")
    from scipy import ndimage

    from tilemask.sources.labels import open_labels
    from tilemask.stats import compute_stats
    from tilemask.stats.components import label

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raster, regions_path = tmp / "labels.tif", tmp / "regions.gpkg"
        start = time.perf_counter()
        make_raster(raster, args.size)
        regions = make_regions(regions_path, raster, args.polygons)
        print(f"data: {args.size}x{args.size} raster, {args.polygons} polygons in {time.perf_counter() - start:.0f} s")
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
            for coverage, run in (("fraction", "first run"), ("fraction", "again"), ("center", "")):
                s, m = timed(lambda: compute_stats(raster, tmp / f"{coverage}.parquet", regions=regions_path, coverage=coverage, chunks=args.chunks, client=client))
                rows.append((f"zonal {coverage}: tilemask ({args.workers} workers{', ' + run if run else ''})", s, m))
            s, m = timed(lambda: compute_stats(raster, tmp / "totals.csv", chunks=args.chunks, client=client))
            rows.append((f"class totals: tilemask ({args.workers} workers)", s, m))
        s, m = timed(lambda: exact_extract(str(raster), regions, ["count", "frac", "unique"], output="pandas"))
        rows.append(("zonal fraction: exactextract (1 process)", s, m))

        n = args.volume
        volume = ndimage.gaussian_filter(np.random.default_rng(2).random((n, n, n), dtype=np.float32), 3) > 0.5
        import nibabel as nib

        nib.save(nib.Nifti1Image(volume.astype(np.uint8), np.eye(4)), tmp / "vol.nii")
        del volume
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
            image = open_labels(str(tmp / "vol.nii"), chunks=128)
            s, m = timed(lambda: print("  tilemask components:", label(image.array == 1, ndimage.generate_binary_structure(3, 1), client).count))
            rows.append((f"instances {n}^3: tilemask ({args.workers} workers, 128^3 chunks)", s, m))
        data = np.asarray(nib.load(tmp / "vol.nii").dataobj).astype(bool)
        s, m = timed(lambda: print("  scipy components:", ndimage.label(data)[1]))
        rows.append((f"instances {n}^3: scipy.ndimage.label", s, m))
        try:
            import cc3d

            s, m = timed(lambda: print("  cc3d components:", cc3d.connected_components(data, connectivity=6, return_N=True)[1]))
            rows.append((f"instances {n}^3: cc3d", s, m))
        except ImportError:
            print("  cc3d not installed: its instances row is left out (pip install connected-components-3d)")

    print(f"\n{'case':<58} {'seconds':>9} {'peak GiB':>9}")
    for name, seconds, peak in rows:
        print(f"{name:<58} {seconds:>9.2f} {peak:>9.2f}")
    reference = next(r for r in rows if r[0].startswith("zonal fraction: exactextract"))
    print()
    for mine in rows[:2]:  # the first run includes the workers' first imports and GDAL's first open
        print(f"zonal fraction, tilemask ({mine[0].split(', ')[-1]} / exactextract: {mine[1] / reference[1]:.2f}x the time, "
              f"{mine[2] / reference[2]:.2f}x the peak memory")


if __name__ == "__main__":
    main()
