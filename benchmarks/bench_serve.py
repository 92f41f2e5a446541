"""``tilemask serve`` under load: tile latency per zoom, and OGC API Features bbox queries over 1M polygons.

    python benchmarks/bench_serve.py [--size 32768] [--clients 4] [--requests 200] [--polygons 1000000] [--dir /tmp]

* A ``size x size`` label COG (1 gigapixel by default) is written by tilemask's
  own COG writer (``CogSink``, as ``bench_cog.py``: 3 classes, nodata, MODE
  overviews), and a GeoPackage of ``--polygons`` squares over the same extent.
  Both are kept in ``--dir`` and reused by later runs.
* ``tilemask serve`` runs in its own process; ``--clients`` threads of this
  process request, in a bounded loop, ``--requests`` random 256 x 256 PNG tiles
  per zoom level (from the zoom where the raster fits one tile to the first zoom
  finer than its pixels), then as many random ``bbox`` queries of about 1 km
  (``limit=100``) on ``/collections/<id>/items``.
* The reference, in the same run: rio-tiler's ``Reader.tile`` + PNG in this
  process, and pyogrio's ``read_dataframe(bbox=..., max_features=100)``, one call
  at a time with nothing else running. ``ratio`` is served p50 / reference p50.
"""

from __future__ import annotations

import argparse
import http.client
import math
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import geopandas as gpd
import httpx
import morecantile
import numpy as np
import pyogrio
import rasterio
import shapely
from bench_cog import run_sink
from pyproj import Transformer
from rio_tiler.io import Reader

TMS = morecantile.tms.get("WebMercatorQuad")


def label_cog(folder: Path, size: int) -> Path:
    path = folder / "sink_mask.tif"
    if not path.exists():
        start = time.perf_counter()
        run_sink(folder, size, 2048, workers=2)
        print(f"wrote {path.name} ({size} x {size}) in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def polygons(folder: Path, raster: Path, n: int) -> Path:
    path = folder / f"squares_{n}.gpkg"
    if path.exists():
        return path
    with rasterio.open(raster) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs
    side = int(math.ceil(math.sqrt(n)))
    edge = min(right - left, top - bottom) / side
    i, j = np.divmod(np.arange(n), side)
    x0, y0 = left + j * edge, top - (i + 1) * edge
    frame = gpd.GeoDataFrame(
        {"class": np.array(["water", "forest"])[np.arange(n) % 2], "area_m2": np.full(n, (0.8 * edge) ** 2)},
        geometry=shapely.box(x0, y0, x0 + 0.8 * edge, y0 + 0.8 * edge),
        crs=crs,
    )
    start = time.perf_counter()
    pyogrio.write_dataframe(frame, path, layer="squares", driver="GPKG")
    print(f"wrote {path.name} ({n} polygons) in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def load(urls: list[str], clients: int) -> tuple[list[float], float, int]:
    """GET every URL from ``clients`` threads, each on its own keep-alive connection (stdlib ``http.client``:
    a lean load generator, so the client takes little of the 2 cores from the server); latencies, wall time,
    and how many answers were neither 200 nor 404 (a tile outside the raster)."""
    parts = urlsplit(urls[0])
    connections = [http.client.HTTPConnection(parts.hostname, parts.port, timeout=60) for _ in range(clients)]
    bad = 0

    def fetch(k: int, url: str) -> float:
        nonlocal bad
        target = urlsplit(url)
        conn = connections[k]
        start = time.perf_counter()
        conn.request("GET", f"{target.path}?{target.query}")
        response = conn.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        if response.status not in (200, 404):
            bad += 1
        return elapsed

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        # thread k takes requests k, k + clients, ...: one connection per thread, never shared
        latencies = list(pool.map(lambda k: [fetch(k, u) for u in urls[k::clients]], range(clients)))
    wall = time.perf_counter() - start
    for conn in connections:
        conn.close()
    return [t for per_client in latencies for t in per_client], wall, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32768)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--polygons", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    folder = args.dir / f"tilemask-bench-serve-{args.size}"
    folder.mkdir(parents=True, exist_ok=True)
    raster = label_cog(folder, args.size)
    gpkg = polygons(folder, raster, args.polygons)

    with rasterio.open(raster) as ds:
        lonlat = Transformer.from_crs(ds.crs, "OGC:CRS84", always_xy=True).transform_bounds(*ds.bounds)
        pixel = ds.res[0]
    zmin = max(z for z in range(20) if len(list(TMS.tiles(*lonlat, [z]))) <= 4)
    lat = math.radians((lonlat[1] + lonlat[3]) / 2)
    zmax = next(z for z in range(25) if 2 * math.pi * 6378137 * math.cos(lat) / (256 * 2**z) < pixel)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "tilemask"), "serve", str(folder), "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = re.search(r"at (http://\S+/) ", server.stdout.readline()).group(1)
    rng = random.Random(0)
    try:
        httpx.get(f"{base}?f=json", timeout=120).raise_for_status()  # the catalog is read once
        print(f"\n{args.size}^2 label COG, {args.clients} concurrent clients, {args.requests} tiles per zoom")
        print(f"{'zoom':>4} {'tiles':>7} {'p50 ms':>8} {'p99 ms':>8} {'tiles/s':>8} | {'rio-tiler p50':>13} "
              f"{'p99':>7} | {'ratio':>5}")  # fmt: skip
        overall = []
        for z in range(zmin, zmax + 1):
            tiles = list(TMS.tiles(*lonlat, [z]))
            picks = [rng.choice(tiles) for _ in range(args.requests)]
            urls = [f"{base}tiles/{t.z}/{t.x}/{t.y}.png?output={raster.name}" for t in picks]
            latencies, wall, bad = load(urls, args.clients)
            overall += latencies
            bare = []
            with Reader(str(raster)) as r:
                for t in picks[: max(20, args.requests // 4)]:
                    start = time.perf_counter()
                    try:
                        r.tile(t.x, t.y, t.z, indexes=1, resampling_method="nearest",
                               reproject_method="nearest").render(img_format="PNG")  # fmt: skip
                    except Exception:
                        pass
                    bare.append(time.perf_counter() - start)
            p50, p99 = percentiles(latencies)
            b50, b99 = percentiles(bare)
            flag = f"  ({bad} errors)" if bad else ""
            print(f"{z:>4} {len(tiles):>7} {p50:>8.1f} {p99:>8.1f} {len(urls) / wall:>8.1f} | {b50:>13.1f} "
                  f"{b99:>7.1f} | {p50 / b50:>5.2f}{flag}", flush=True)  # fmt: skip
        p50, p99 = percentiles(overall)
        print(f" all {'':>7} {p50:>8.1f} {p99:>8.1f}   (goal: p99 < 100 ms)")

        info = pyogrio.read_info(gpkg)
        to_layer = Transformer.from_crs("OGC:CRS84", info["crs"], always_xy=True)
        boxes = []
        for _ in range(args.requests):
            lon = rng.uniform(lonlat[0], lonlat[2] - 0.015)
            lat_ = rng.uniform(lonlat[1], lonlat[3] - 0.01)
            boxes.append((lon, lat_, lon + 0.013, lat_ + 0.009))  # about 1 km
        urls = [f"{base}collections/{gpkg.stem}/items?limit=100&bbox={','.join(f'{v:.6f}' for v in b)}" for b in boxes]
        latencies, wall, bad = load(urls, args.clients)
        bare = []
        for b in boxes[: max(20, args.requests // 4)]:
            start = time.perf_counter()
            pyogrio.read_dataframe(gpkg, bbox=to_layer.transform_bounds(*b), max_features=100)
            bare.append(time.perf_counter() - start)
        p50, p99 = percentiles(latencies)
        b50, b99 = percentiles(bare)
        matched = httpx.get(urls[0], timeout=60).json()["numberMatched"]
        print(f"\nOGC API Features, {info['features']:,} polygons, bbox of ~1 km ({matched} matched), limit 100, "
              f"{args.clients} clients")  # fmt: skip
        print(
            f"  served p50 {p50:.1f} ms, p99 {p99:.1f} ms, {len(urls) / wall:.1f} queries/s"
            f"{f' ({bad} errors)' if bad else ''} | pyogrio p50 {b50:.1f} ms, p99 {b99:.1f} ms | ratio {p50 / b50:.2f}"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
