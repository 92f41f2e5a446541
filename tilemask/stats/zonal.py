"""Zonal statistics over vector regions (any format pyogrio reads).

Regions are reprojected to the raster's CRS and processed in batches, one task
per batch on the cluster.  A task reads only the raster windows its regions
touch, straight from the file (GeoTIFF/COG through rasterio, Zarr through zarr):

* ``coverage="center"``: rasterstats' rule.  The window is rasterstats'
  ``bounds_window`` of the region's bounds (``floor`` of the north-west corner,
  ``ceil`` of the south-east corner in pixel space); the region is burned with
  ``rasterio.features.rasterize`` (GDAL, ``all_touched=False``: a pixel counts
  when its centre is inside) on that window, and the in-raster, non-nodata
  pixels are counted per class.  Windows over ``MAX_WINDOW_PIXELS`` are burned in
  row strips (same rule, the strip's transform shifted by whole rows).
* ``coverage="fraction"``: exactextract's rule.  exactextract itself computes
  the coverage fraction of every cell (``values``, ``coverage`` and ``cell_id``
  operations) through a :class:`LabelRasterSource` that serves it windows of the
  label file, and each class gets ``sum(coverage)``.  This equals exactextract's
  ``count * frac`` on the whole raster.

Sizes are ``sum(weight * pixel area of the row)`` (geodesic per row for
geographic rasters).  Pixels outside the raster and nodata pixels count for
nothing: a region partly outside gets the statistics of its inside part.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass

import dask
import numpy as np
import pandas as pd
import shapely
from affine import Affine

from ..errors import InputError
from ..sources import cached_handle, file_stamp
from ..sources.labels import LabelImage
from .crosstab import compute
from .measure import Grid
from .totals import grid_of, zone_table

logger = logging.getLogger(__name__)

MAX_WINDOW_PIXELS = 1 << 25
"""Largest window burned at once for the centre rule (32 Mpixels, 32 MB as uint8)."""

REGIONS_PER_TASK = 256


@dataclass(frozen=True)
class WindowReader:
    """Reads ``[rows, cols]`` windows of a 2D label file on a worker (GeoTIFF/COG or Zarr)."""

    path: str

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        if self.path.lower().rstrip("/").endswith(".zarr"):
            import zarr

            def opener():
                node = zarr.open(self.path, mode="r")
                return node["labels"] if isinstance(node, zarr.Group) else node

            array = cached_handle(("stats-zarr", self.path, file_stamp(self.path)), opener)
            return np.asarray(array[rows, cols])
        import rasterio
        from rasterio.windows import Window

        ds = cached_handle(("stats-raster", self.path, file_stamp(self.path)), lambda: rasterio.open(self.path))
        return ds.read(1, window=Window.from_slices(rows, cols, height=ds.height, width=ds.width))


def read_regions(path: str | os.PathLike, region_id: str | None):
    """The regions of a vector file as a GeoDataFrame, and the name of their key column."""
    import geopandas as gpd

    try:
        regions = gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # pyogrio raises its own DataSourceError, DataLayerError, ...
        raise InputError(f"{path}: cannot read the regions: {exc}") from None
    if region_id is not None and region_id not in regions.columns:
        fields = ", ".join(c for c in regions.columns if c != regions.geometry.name) or "none"
        raise InputError(f"{path}: --region-id {region_id!r} is not a field of the regions (fields: {fields})")
    if region_id is not None and regions[region_id].duplicated().any():
        raise InputError(f"{path}: --region-id {region_id!r} has repeated values; region keys must be unique")
    return regions, region_id or "region"


def vector_zonal(
    image: LabelImage,
    regions,
    key: str = "region",
    coverage: str = "center",
    names=None,
    client=None,
    keep_geometry: bool = True,
):
    """One row per region: ``key`` then ``<class>_pixels``, ``<class>_fraction``, ``<class>_area_m2``.

    ``regions`` is a GeoDataFrame; ``key`` names its id column, or ``"region"``
    for the feature index.  The result is a GeoDataFrame with the regions'
    original geometry and CRS when ``keep_geometry``.
    """
    grid = grid_of(image)
    if grid.is_volume:
        raise InputError(f"{image.path}: vector regions need a 2D raster, this is a volume")
    if not grid.north_up:
        raise InputError(f"{image.path}: vector regions need a north-up raster (no rotation in the geotransform)")
    if coverage not in ("center", "fraction"):
        raise InputError(f"coverage must be 'center' or 'fraction', got {coverage!r}")
    projected = _to_raster_crs(regions, grid, image.path)
    wkbs = [None if g is None or g.is_empty else shapely.to_wkb(g) for g in projected.geometry]
    reader = WindowReader(image.path)
    nodata = None if image.nodata is None else int(image.nodata)
    size = _batch_size(len(wkbs), client)
    batches = [range(i, min(i + size, len(wkbs))) for i in range(0, len(wkbs), size)]
    task = _centre_batch if coverage == "center" else _fraction_batch
    tasks = [dask.delayed(task)(reader, grid, nodata, list(b), [wkbs[i] for i in b]) for b in batches]
    parts = compute(tasks, client)
    frame = pd.concat(parts, ignore_index=True) if parts else None
    if frame is None or frame.empty:
        frame = pd.DataFrame({"zone": pd.Series([], dtype=np.int64), "cls": pd.Series([], dtype=np.int64),
                              "count": pd.Series([], dtype=float), "size": pd.Series([], dtype=float)})
    if coverage == "center":
        frame["count"] = frame["count"].astype(np.int64)
    table = zone_table(frame, "_zone", names if names is not None else image.class_names, grid.units, zones=list(range(len(wkbs))))
    keys = regions[key].to_numpy() if key in regions.columns else np.arange(len(regions))
    table.insert(0, key, keys)
    table = table.drop(columns="_zone")
    if keep_geometry:
        import geopandas as gpd

        return gpd.GeoDataFrame(table, geometry=regions.geometry.to_numpy(), crs=regions.crs)
    return table


def _batch_size(n: int, client) -> int:
    workers = len(client.scheduler_info(n_workers=-1)["workers"]) if client is not None else (os.cpu_count() or 1)
    return max(1, min(REGIONS_PER_TASK, math.ceil(n / (4 * max(workers, 1)))))


def _to_raster_crs(regions, grid: Grid, path: str):
    if grid.crs is None or regions.crs is None:
        if grid.crs is not None or regions.crs is not None:
            logger.warning("%s: CRS missing on the raster or the regions; coordinates taken as they are", path)
        return regions
    if regions.crs.equals(grid.crs):
        return regions
    return regions.to_crs(grid.crs)


def _rasterstats_window(bounds, transform) -> tuple[int, int, int, int]:
    """rasterstats' ``bounds_window``: ``(row_start, row_stop, col_start, col_stop)``."""
    x0, dx, _, y0, _, dy = transform
    w, s, e, n = bounds
    return (
        int(math.floor((n - y0) / dy)),
        int(math.ceil((s - y0) / dy)),
        int(math.floor((w - x0) / dx)),
        int(math.ceil((e - x0) / dx)),
    )


def _centre_batch(reader: WindowReader, grid: Grid, nodata, zones: list[int], wkbs: list) -> pd.DataFrame:
    from rasterio.features import rasterize

    height, width = grid.shape
    x0, dx, _, y0, _, dy = grid.geometry.transform
    sizes = grid.row_sizes
    rows_out: list[tuple] = []
    for zone, wkb in zip(zones, wkbs):
        if wkb is None:
            continue
        geom = shapely.from_wkb(wkb)
        r0, r1, c0, c1 = _rasterstats_window(geom.bounds, grid.geometry.transform)
        window_transform = Affine(dx, 0.0, x0 + c0 * dx, 0.0, dy, y0 + r0 * dy)
        rows_in = (max(r0, 0), min(r1, height))
        cols_in = (max(c0, 0), min(c1, width))
        if rows_in[0] >= rows_in[1] or cols_in[0] >= cols_in[1]:
            continue
        n_rows = rows_in[1] - rows_in[0]
        counts: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(n_rows, np.int64))
        whole = (r1 - r0) * (c1 - c0) <= MAX_WINDOW_PIXELS  # rasterstats' exact call
        strip = n_rows if whole else max(1, MAX_WINDOW_PIXELS // max(c1 - c0, 1))
        for top in range(rows_in[0], rows_in[1], strip):
            bottom = min(top + strip, rows_in[1])
            if whole:
                burned = rasterize([(geom, 1)], out_shape=(r1 - r0, c1 - c0), transform=window_transform, fill=0, dtype="uint8")
                burned = burned[top - r0 : bottom - r0]
            else:
                strip_transform = window_transform @ Affine.translation(0, top - r0)
                burned = rasterize([(geom, 1)], out_shape=(bottom - top, c1 - c0), transform=strip_transform, fill=0, dtype="uint8")
            burned = burned[:, cols_in[0] - c0 : cols_in[1] - c0].astype(bool)
            if not burned.any():
                continue
            values = reader.read(slice(top, bottom), slice(*cols_in))
            inside = burned if nodata is None else burned & (values != nodata)
            local_rows = np.nonzero(inside)[0] + (top - rows_in[0])
            inside_values = values[inside]
            for cls in np.unique(inside_values):
                counts[int(cls)] += np.bincount(local_rows[inside_values == cls], minlength=n_rows)
        row_sizes = sizes[rows_in[0] : rows_in[1]]
        for cls, per_row in sorted(counts.items()):
            rows_out.append((zone, cls, int(per_row.sum()), float(np.sum(per_row * row_sizes))))
    return pd.DataFrame(rows_out, columns=["zone", "cls", "count", "size"])


class LabelRasterSource:
    """An exactextract ``RasterSource`` over a label file, read window by window."""

    def __new__(cls, reader: WindowReader, grid: Grid, nodata):
        from exactextract.raster import RasterSource

        class _Source(RasterSource):
            def __init__(self):
                super().__init__()
                x0, dx, _, y0, _, dy = grid.geometry.transform
                height, width = grid.shape
                self._res = (abs(dx), abs(dy))
                self._extent = (x0, y0 + height * dy, x0 + width * dx, y0)

            def res(self):
                return self._res

            def extent(self):
                return self._extent

            def srs_wkt(self):
                return grid.geometry.crs_wkt

            def nodata_value(self):
                return nodata

            def read_window(self, x_off, y_off, nx, ny):
                return reader.read(slice(y_off, y_off + ny), slice(x_off, x_off + nx))

        return _Source()


def _fraction_batch(reader: WindowReader, grid: Grid, nodata, zones: list[int], wkbs: list) -> pd.DataFrame:
    import geopandas as gpd
    from exactextract import exact_extract

    keep = [(z, w) for z, w in zip(zones, wkbs) if w is not None]
    if not keep:
        return pd.DataFrame(columns=["zone", "cls", "count", "size"])
    frame = gpd.GeoDataFrame(
        {"zone": [z for z, _ in keep]}, geometry=shapely.from_wkb([w for _, w in keep]), crs=grid.geometry.crs_wkt
    )
    source = LabelRasterSource(reader, grid, nodata)
    result = exact_extract(source, frame, ["values", "coverage", "cell_id"], include_cols=["zone"], output="pandas")
    width = grid.shape[1]
    sizes = grid.row_sizes
    rows_out = []
    for zone, values, coverage, cell_id in zip(result["zone"], result["values"], result["coverage"], result["cell_id"]):
        values = np.asarray(values, dtype=np.int64)
        coverage = np.asarray(coverage, dtype=float)
        rows = np.asarray(cell_id, dtype=np.int64) // width
        for cls in np.unique(values):
            hit = values == cls
            rows_out.append((int(zone), int(cls), float(coverage[hit].sum()), float(np.sum(coverage[hit] * sizes[rows[hit]]))))
    return pd.DataFrame(rows_out, columns=["zone", "cls", "count", "size"])
