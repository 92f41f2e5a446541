"""The quick look of a large input without overviews, against rasterio's own reduced read of it.

    python benchmarks/bench_quicklook.py [--tiles 5] [--dir /tmp]

The demo's Landsat scene (791 x 718, 3 bands) repeated ``--tiles`` times each way
is written as a tiled GeoTIFF (512 px blocks, deflate) without overviews, with a
label COG on its grid written by tilemask's COG writer (which has overviews).
``tilemask.quicklook.write_quicklook`` makes the PNG (longest side 1024); the
reference, in the same run, is the reduced read alone of the same three bands
with rasterio's defaults (GDAL's block cache at 5% of the memory), no labels, no
PNG: what any quick look has to do.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from scratch import scratch_folder

from tilemask.geometry import RasterGeometry
from tilemask.quicklook import THUMBNAIL, thumbnail_shape, write_quicklook
from tilemask.sinks import OutputLayout
from tilemask.sinks.cog import CogSink

DEMO = Path(__file__).resolve().parents[1] / "workflows" / "demo" / "RGB.byte.tif"


def write_inputs(folder: Path, tiles: int) -> tuple[Path, Path]:
    scene, labels_path = folder / f"scene_x{tiles}.tif", folder / f"scene_x{tiles}_mask.tif"
    with rasterio.open(DEMO) as src:
        data, profile = np.tile(src.read(), (1, tiles, tiles)), src.profile
    profile.update(width=data.shape[2], height=data.shape[1], tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", transform=Affine(*src.transform[:6]))  # fmt: skip
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(data)
    labels = np.where(data[0] == 0, 255, (data[0] > 100).astype(np.uint8)).astype(np.uint8)
    layout = OutputLayout(labels.shape, (1024, 1024), ("background", "bright"), "uint8", 0, "none",
                          RasterGeometry(profile["crs"].to_wkt(), tuple(profile["transform"].to_gdal())),
                          str(scene), 255)  # fmt: skip
    sink = CogSink(str(labels_path), layout)
    sink.create()
    for r in range(0, labels.shape[0], 1024):
        for c in range(0, labels.shape[1], 1024):
            region = ((r, min(r + 1024, labels.shape[0])), (c, min(c + 1024, labels.shape[1])))
            sink.write(region, labels[r : r + 1024, c : c + 1024], None)
    sink.commit()
    return scene, labels_path


def flush_block_cache() -> None:
    """Empty GDAL's block cache: shrunk to nothing, it drops every block (rasterio sets it in bytes)."""
    with rasterio.Env(GDAL_CACHEMAX=0):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=5, help="the demo scene repeated this many times each way")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    folder = scratch_folder("bench_quicklook_", args.dir)
    scene, labels = write_inputs(folder, args.tiles)
    flush_block_cache()
    start = time.perf_counter()
    write_quicklook(str(scene), str(labels), str(folder / "look.png"))
    tilemask_s = time.perf_counter() - start
    flush_block_cache()  # neither side reads blocks the other decoded
    start = time.perf_counter()
    with rasterio.open(scene) as src:
        shape = thumbnail_shape((src.height, src.width), THUMBNAIL)
        src.read([1, 2, 3], out_shape=(3, *shape), masked=True, resampling=Resampling.nearest)
        size = f"{src.width} x {src.height}"
    reference_s = time.perf_counter() - start
    print(f"quick look of a {size} x 3 GeoTIFF without overviews (512 px blocks, deflate), PNG {shape[1]} x {shape[0]}")
    print(f"{'':44} {'s':>7} {'/ reference':>12}")
    print(f"{'tilemask write_quicklook (labels, PNG too)':44} {tilemask_s:7.2f} {tilemask_s / reference_s:11.2f}x")
    print(f"{'reference: rasterio reduced read, defaults':44} {reference_s:7.2f} {1:11.2f}x")


if __name__ == "__main__":
    main()
