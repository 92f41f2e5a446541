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
* ``coverage="fraction"``: exactextract's rule, computed by exactextract: a
  class's pixels are its ``count * frac`` (the sum of the coverage fractions of
  the class's cells), areas those pixels times the pixel area.  On a geographic
  raster, where the pixel area changes from row to row, exactextract hands back
  every covered cell (``values``, ``coverage``, ``cell_id``) and each cell is
  weighted by its row's area.  A GDAL raster (GeoTIFF, COG, VRT, ...)
  is handed to exactextract as its path, so exactextract opens and reads it with
  its own raster source, exactly as ``exact_extract(path, ...)`` does; only a
  Zarr label array is served through tilemask's :class:`LabelRasterSource`.
  Polygons are measured.  Points cover no area: they get 0 pixels (with a
  warning), exactextract's answer for a point, without being handed to it
  (exactextract fails on a multipoint whose extent spans cells).  Lines and
  geometry collections are refused with an :class:`~tilemask.errors.InputError`
  before any pixel is read: exactextract weights a line's cells by its length,
  not by a covered area, and cannot read collections.

Why every ``exact_extract`` call holds ``_EXACTEXTRACT_LOCK``
-------------------------------------------------------------

exactextract 0.3's Python binding calls back into Python from C++ for every
raster source (its own GDAL/rasterio sources are Python classes too) while the
calling thread holds the GIL.  The first feature that touches no cell makes
``Operation::empty_stats()`` initialise a function-local C++ static, and that
initialiser reads an empty window through the Python source, i.e. it runs Python
*while holding the C++ static-initialisation guard*.  Python drops the GIL in
that callback (any I/O such as ``os.stat`` or a GDAL read, or simply the
interpreter's switch interval), so a second thread can take the GIL, enter
exactextract and block on the guard without releasing the GIL: the first thread
then waits for the GIL forever.  A Dask worker runs two tasks at once, and
regions outside the raster, or points, reach ``empty_stats()`` in both: the
command hung in about half the runs with polygons and nearly every run with
points, and the stuck worker (the GIL held for good) outlived its client.
Handing exactextract a path does not avoid it: the source it then builds
(``GDALRasterSource`` or ``RasterioRasterSource``) is Python as well.

So exactextract runs under one process-wide lock (``threading.Lock``: a thread
waiting for it waits with the GIL released), so only one thread of a process is
ever inside exactextract's C++; and the first call under the lock initialises
that static on a tiny in-memory raster, so the guard is never taken again, even
by code outside tilemask.  Nothing inside a callback waits on a thread that may
wait on the lock: exactextract's own source reads with GDAL, and the Zarr array
is opened before exactextract is called, so a callback only slices it (zarr's
I/O thread never calls exactextract).  The lock costs little parallelism:
exactextract keeps the GIL while it computes (another Python thread runs at
about a tenth of its speed meanwhile), the other thread of a worker still reads
and burns centre-rule windows, and the other workers are separate processes.

Sizes are ``sum(weight * pixel area of the row)`` (geodesic per row for
geographic rasters).  Pixels outside the raster and nodata pixels count for
nothing: a region partly outside gets the statistics of its inside part, one wholly outside a row with no
pixel (as exactextract gives it) and a place in one warning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import dask
import numpy as np
import pandas as pd
import shapely
from affine import Affine

from ..errors import InputError, given
from ..ogr import no_pam
from ..sources import cached_handle, file_stamp, read_region
from ..sources.labels import LabelImage, read_label_window
from ..sources.raster import gdal_env
from .config import (
    check_key,
    fid_column,
    geoparquet_fields,
    is_geoparquet,
    regions_file,
    regions_layer,
    regions_unreadable,
)
from .crosstab import compute
from .measure import Grid
from .totals import grid_of, zone_table

logger = logging.getLogger(__name__)

MAX_WINDOW_PIXELS = 1 << 25
"""Largest window burned at once for the centre rule (32 Mpixels, 32 MB as uint8)."""

REGIONS_PER_TASK = 256

_EXACTEXTRACT_LOCK = threading.Lock()
"""Held by every ``exact_extract`` call of this process (see the module docstring)."""

_exactextract_ready = False

ZARR_CHUNK_CACHE_BYTES = 64 << 20
"""Bytes (64 MiB) of the decoded chunks of a Zarr label array each worker thread keeps while it measures a batch of
regions (:func:`_batch`), the least recently used dropped past it: a batch's regions in one chunk decode it once
(see :func:`_by_place`)."""

_zarr_chunks = threading.local()

_POLYGONAL = frozenset({"Polygon", "MultiPolygon"})
_PUNCTUAL = frozenset({"Point", "MultiPoint"})


@dataclass(frozen=True)
class WindowReader:
    """Reads ``[rows, cols]`` windows of a 2D label file on a worker (GeoTIFF/COG or Zarr)."""

    path: str

    @functools.cached_property
    def is_zarr(self) -> bool:
        from ..formats import for_path, zarr_array_inside_store

        return for_path(self.path).zarr_store or zarr_array_inside_store(self.path)

    def zarr_array(self):
        """The Zarr label array, opened once per worker thread (the ``labels`` array of a group)."""
        import zarr

        def opener():
            from ..formats import for_path
            from ..sources.zarr import open_zarr

            node = open_zarr(self.path)
            return node[for_path(self.path).labels_key(node)] if isinstance(node, zarr.Group) else node

        return cached_handle(("stats-zarr", self.path), opener, file_stamp(self.path))

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        if self.is_zarr:
            return read_zarr_window(self.path, self.zarr_array(), rows, cols)
        return read_label_window(self.path, rows, cols)

    def check_readable(self, grid: Grid, wkbs: list) -> None:
        """Read the windows under ``wkbs`` strip by strip: a :class:`ReadError` naming the file and the window
        where exactextract, which reads a GDAL raster by its path, failed with rasterio's bare "Read failed"."""
        x0, y0, x1, y1 = shapely.total_bounds(shapely.from_wkb(wkbs))
        cols, rows = np.array([~Affine.from_gdal(*grid.geometry.transform) @ (x, y) for x in (x0, x1) for y in (y0, y1)]).T
        r0, r1 = max(0, math.floor(rows.min())), min(grid.shape[0], math.ceil(rows.max()))
        c0, c1 = max(0, math.floor(cols.min())), min(grid.shape[1], math.ceil(cols.max()))
        for top in range(r0, r1, 512):
            self.read(slice(top, min(top + 512, r1)), slice(c0, c1))


def read_zarr_window(path: str, array, rows: slice, cols: slice) -> np.ndarray:
    """:func:`zarr_window` of the Zarr labels at ``path``; a chunk that does not decode (damaged, cut short) as a
    :class:`ReadError` naming the file and the window, as the labels' other reads do: it was the codec's bare
    ``RuntimeError: Zstd decompression error: invalid input data``, naming no file."""
    return read_region(path, ((rows.start, rows.stop), (cols.start, cols.stop)), lambda: zarr_window(array, rows, cols))


def zarr_window(array, rows: slice, cols: slice) -> np.ndarray:
    """``array[rows, cols]`` (a 2D Zarr array; ``rows`` and ``cols`` within it); within a batch of regions
    (:func:`_batch`, which reads one array) assembled from its chunks, each decoded once by the thread and kept
    (:data:`ZARR_CHUNK_CACHE_BYTES`). Outside a batch, and where chunks are too big to keep several, read as it is."""
    height, width = array.chunks[-2:]
    cache: OrderedDict | None = getattr(_zarr_chunks, "cache", None)
    if cache is None or height * width * array.dtype.itemsize * 4 > ZARR_CHUNK_CACHE_BYTES:
        return np.asarray(array[rows, cols])
    out = np.empty((max(0, rows.stop - rows.start), max(0, cols.stop - cols.start)), array.dtype)
    if not out.size:
        return out
    for i in range(rows.start // height, -(-rows.stop // height)):
        for j in range(cols.start // width, -(-cols.stop // width)):
            key = (i, j)
            block = cache.get(key)
            if block is None:
                block = np.asarray(array[i * height : (i + 1) * height, j * width : (j + 1) * width])
                cache[key] = block
                _zarr_chunks.size += block.nbytes
                while _zarr_chunks.size > ZARR_CHUNK_CACHE_BYTES and len(cache) > 1:
                    _zarr_chunks.size -= cache.popitem(last=False)[1].nbytes
            else:
                cache.move_to_end(key)
            r0, r1 = max(rows.start, i * height), min(rows.stop, (i + 1) * height)
            c0, c1 = max(cols.start, j * width), min(cols.stop, (j + 1) * width)
            out[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start] = block[
                r0 - i * height : r1 - i * height, c0 - j * width : c1 - j * width
            ]
    return out


def read_regions(path: str | os.PathLike, region_id: str | None):
    """The regions of a vector file as a GeoDataFrame, and the name of their key column."""
    import geopandas as gpd

    local = regions_file(str(path))
    fid = None
    try:
        if is_geoparquet(path):
            geoparquet_fields(local)  # a plain Parquet table is refused as having no geometry
            regions = gpd.read_parquet(local)
        else:
            layer = regions_layer(path, local)
            fid = fid_column(local, layer)
            with no_pam():
                regions = gpd.read_file(local, layer=layer, engine="pyogrio", fid_as_index=True)
            if region_id is not None and region_id == fid and region_id not in regions.columns:
                regions.insert(0, region_id, regions.index.to_numpy())  # a GeoPackage's fid as the key
            regions = regions.reset_index(drop=True)
    except InputError:
        raise
    except Exception as exc:  # pyogrio raises its own DataSourceError, DataLayerError, ...
        raise regions_unreadable(path, exc, local) from None
    if region_id is not None:
        fields = [c for c in regions.columns if c != regions.geometry.name]
        check_key(path, region_id, fields, regions.get(region_id), fid)
    coordinates, owners = shapely.get_coordinates(regions.geometry.to_numpy(), return_index=True)
    broken = owners[~np.isfinite(coordinates).all(axis=1)]
    if len(broken):  # exactextract failed on it ("Failed to parse geometry", exit 1); the center rule counted 0
        first = regions[region_id].iloc[broken[0]] if region_id is not None else regions.index[broken[0]]
        raise InputError(f"{path}: {len(np.unique(broken))} region(s) have a vertex that is not a number (NaN or "
                         f"infinite; first: {_plain(first)!r}): fix or drop them")  # fmt: skip
    geometries = regions.geometry.to_numpy()
    invalid = np.flatnonzero(~shapely.is_valid(geometries) & ~shapely.is_missing(geometries))
    if len(invalid):  # a self-overlapping multipolygon: exactextract adds its parts' overlaps up, burning does not
        first = regions[region_id].iloc[invalid[0]] if region_id is not None else regions.index[invalid[0]]
        logger.warning("%s: %d of %d regions are not valid geometries (first: %r, %s): the fraction rule counts "
                       "where they overlap themselves twice, as exactextract does, the center rule once; "
                       "shapely.make_valid them for one answer", path, len(invalid), len(regions), _plain(first),
                       shapely.is_valid_reason(geometries[invalid[0]]))  # fmt: skip
    if regions.empty:  # an empty table, as exactextract gives; said, not silent
        logger.warning("%s holds no features: the table has no rows", path)
    return regions, region_id or "region"


def check_vector_grid(grid: Grid, path) -> None:
    """Refuse a grid vector regions cannot be burned on: a volume, a rotated raster, one whose rows run south to
    north or columns east to west (rasterstats' windows and exactextract's extents assume a north-up grid)."""
    if grid.is_volume:
        raise InputError(f"{path}: vector regions need a 2D raster, this is a volume")
    _, dx, _, _, _, dy = grid.geometry.transform
    if not grid.north_up or dx <= 0 or dy >= 0:
        raise InputError(f"{path}: vector regions need a north-up raster (no rotation in the geotransform, rows "
                         "running south, columns east); gdalwarp it first")  # fmt: skip


def prepare_vector_zonal(image: LabelImage, regions, key: str = "region", coverage: str = "center", names=None,
                         keep_geometry: bool = True):  # fmt: skip
    """One row per region: ``key`` then ``<class>_pixels``, ``<class>_fraction``, ``<class>_area_m2``.

    ``regions`` is a GeoDataFrame; ``key`` names its id column, or ``"region"``
    for the feature index.  The result is a GeoDataFrame with the regions'
    original geometry and CRS when ``keep_geometry``.  The checks and the regions on
    the raster's grid come now, reading no pixel; the table comes from the returned
    ``run(client)``, so that ``tilemask stats`` refuses what it cannot measure before
    it starts a cluster.
    """
    grid = grid_of(image)
    check_vector_grid(grid, image.path)
    if coverage not in ("center", "fraction"):
        raise InputError(f"coverage must be 'center' or 'fraction', got {coverage!r}")
    keys = regions[key].to_numpy() if key in regions.columns else np.arange(len(regions))
    projected = _to_raster_crs(regions, grid, image.path, keys)
    empty = [k for k, g in zip(keys, regions.geometry) if g is None or g.is_empty]
    if empty:
        logger.warning("%d of %d regions have no geometry (first: %r): they count no pixel", len(empty), len(keys),
                       _plain(empty[0]))  # fmt: skip
    cut_away = [g is not None and not g.is_empty and (c is None or c.is_empty)  # nothing near the raster
                for g, c in zip(regions.geometry, projected.geometry)]  # fmt: skip
    off = [k for k, outside, gone in zip(keys, _off_raster(projected.geometry, grid), cut_away) if outside or gone]
    if off:
        logger.warning("%d of %d regions do not overlap the raster %s (first: %r): they count no pixel", len(off),
                       len(keys), image.path, _plain(off[0]))  # fmt: skip
    measured = _fraction_geometries(projected.geometry, keys) if coverage == "fraction" else None
    wkbs = [
        None if g is None or g.is_empty or (measured is not None and not measured[i]) else shapely.to_wkb(g)
        for i, g in enumerate(projected.geometry)
    ]

    def run(client=None):
        reader = WindowReader(image.path)
        nodata = None if image.nodata is None else int(image.nodata)
        size = _batch_size(len(wkbs), client)
        order = _by_place(projected.geometry, grid)  # a batch's regions near each other: they share chunks
        batches = [order[i : i + size] for i in range(0, len(wkbs), size)]
        task = _centre_batch if coverage == "center" else _fraction_batch
        tasks = [dask.delayed(_batch)(task, reader, grid, nodata, b, [wkbs[i] for i in b]) for b in batches]
        parts = compute(tasks, client)
        frame = pd.concat(parts, ignore_index=True) if parts else None
        if frame is None or frame.empty:
            frame = pd.DataFrame({"zone": pd.Series([], dtype=np.int64), "cls": pd.Series([], dtype=np.int64),
                                  "count": pd.Series([], dtype=float), "size": pd.Series([], dtype=float)})
        if coverage == "center":
            frame["count"] = frame["count"].astype(np.int64)
        classes = names if names is not None else image.class_names
        table = zone_table(frame, "_zone", classes, grid, zones=list(range(len(wkbs))))
        table.insert(0, key, keys)
        table = table.drop(columns="_zone")
        if keep_geometry:
            import geopandas as gpd

            return gpd.GeoDataFrame(table, geometry=regions.geometry.to_numpy(), crs=regions.crs)
        return table

    return run


def _by_place(geometries, grid: Grid) -> list[int]:
    """The regions' indices in the Z order (Morton order) of the pixels under their bounds' centres, regions without
    geometry last: a batch of neighbours reads the chunks of one part of the raster, not of all of it (20,000
    districts on a 16384^2 Zarr of 2048^2 chunks, centre rule: 124 s in file order with no chunk kept, 157 s in file
    order keeping them, 34 s in this order)."""
    x0, dx, _, y0, _, dy = grid.geometry.transform
    xmin, ymin, xmax, ymax = shapely.bounds(np.asarray(geometries, dtype=object)).T
    with np.errstate(invalid="ignore"):
        col = ((xmin + xmax) / 2 - x0) / dx
        row = ((ymin + ymax) / 2 - y0) / dy
    missing = np.isnan(col) | np.isnan(row)
    col, row = (np.clip(np.nan_to_num(v), 0, 2**32 - 1).astype(np.uint64) for v in (col, row))
    return np.lexsort((_spread_bits(col) | _spread_bits(row) << np.uint64(1), missing)).tolist()


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """The 32 bits of each of ``v`` (uint64) moved to the even bits 0, 2, 4, ..., 62."""
    for shift, mask in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                        (2, 0x3333333333333333), (1, 0x5555555555555555)):  # fmt: skip
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def _batch(task, *args) -> pd.DataFrame:
    """``task(*args)`` keeping the Zarr chunks it decodes (:func:`zarr_window`), dropped after it: a worker holds
    none between batches, and a Zarr written again since is read afresh."""
    _zarr_chunks.cache, _zarr_chunks.size = OrderedDict(), 0
    try:
        return task(*args)
    finally:
        _zarr_chunks.__dict__.clear()


def _plain(key):
    """A region's key as a warning shows it: 40, not np.int64(40)."""
    return key.item() if isinstance(key, np.generic) else key


def _batch_size(n: int, client) -> int:
    workers = len(client.scheduler_info(n_workers=-1)["workers"]) if client is not None else (os.cpu_count() or 1)
    return max(1, min(REGIONS_PER_TASK, math.ceil(n / (4 * max(workers, 1)))))


def _fraction_geometries(geometries, keys) -> list[bool]:
    """Which regions exactextract measures (polygons); points are left out, lines and collections refused.

    A point covers no area: exactextract gives a single point no cell (0 pixels)
    and raises "Unsupported geometry type" for a multipoint whose extent spans
    cells, so points get 0 pixels without being handed to it.  exactextract
    weights a line's cells by the line's length, not by a covered area, and cannot
    read geometry collections: those are an :class:`InputError`, raised before
    any pixel is read.
    """
    types = [None if g is None or g.is_empty else g.geom_type for g in geometries]
    bad = [(k, t) for k, t in zip(keys, types) if t is not None and t not in _POLYGONAL | _PUNCTUAL]
    if bad:
        kinds = ", ".join(sorted({t for _, t in bad}))
        raise InputError(
            f"{given('coverage', 'fraction')} measures the area of polygons, but {len(bad)} of {len(types)} regions "
            f"are {kinds} (first: {bad[0][0]!r}); use {given('coverage', 'center')}, or buffer them into polygons"
        )
    points = sum(t in _PUNCTUAL for t in types)
    if points:
        logger.warning(
            "%d of %d regions are points, which cover no area: %s gives them 0 pixels (%s counts the pixel under "
            "each point)", points, len(types), given("coverage", "fraction"), given("coverage", "center"),
        )
    return [t in _POLYGONAL for t in types]


def _off_raster(geometries, grid: Grid) -> np.ndarray:
    """Which regions, on the raster's grid (reprojected), lie wholly off the raster by their bounds (touching its
    edge at most): their windows hold no pixel under either rule.  Regions with no geometry are not among them."""
    x0, dx, _, y0, _, dy = grid.geometry.transform  # north-up (check_vector_grid): dx > 0, dy < 0
    height, width = grid.shape
    xmin, ymin, xmax, ymax = shapely.bounds(np.asarray(geometries, dtype=object)).T  # no geometry: NaN, not off
    # a point (or a line along the edge) on the west or north edge lies in the first column or row (rasterstats)
    west = (xmax < x0) | ((xmax == x0) & (xmin < xmax))
    north = (ymin > y0) | ((ymin == y0) & (ymax > ymin))
    return west | (xmin >= x0 + width * dx) | (ymax <= y0 + height * dy) | north


def _to_raster_crs(regions, grid: Grid, path: str, keys: np.ndarray):
    if grid.crs is None or regions.crs is None:
        if grid.crs is not None or regions.crs is not None:
            logger.warning("%s: CRS missing on the raster or the regions; coordinates taken as they are", path)
        return regions
    if regions.crs.equals(grid.crs):
        return regions
    projected = regions.to_crs(grid.crs)
    infinite = _not_finite(projected.geometry)
    if not infinite.any():
        return projected
    # A place the raster's CRS cannot hold (a pole in Web Mercator or a Lambert conic: a world layer's
    # Antarctica) projects to infinity, and every region was then measured for nothing (OverflowError, or
    # exactextract's "Failed to parse geometry"): such regions are cut to the raster's surroundings first.
    import geopandas as gpd
    from pyproj import Transformer

    height, width = grid.shape
    x0, dx, _, y0, _, dy = grid.geometry.transform
    try:
        west, south, east, north = Transformer.from_crs(grid.crs, regions.crs, always_xy=True).transform_bounds(
            x0, y0 + height * dy, x0 + width * dx, y0, densify_pts=21)  # fmt: skip
    except Exception:  # noqa: BLE001 - pyproj's errors: no envelope, the regions are refused below
        west = south = east = north = math.nan
    if all(map(math.isfinite, (west, south, east, north))) and west < east:
        margin_x, margin_y = 0.01 * (east - west), 0.01 * (north - south)
        cut = shapely.clip_by_rect(regions.geometry.to_numpy()[infinite], west - margin_x, south - margin_y,
                                   east + margin_x, north + margin_y)  # fmt: skip
        # the cut's new edges, straight in the regions' CRS, are curves in the raster's (a parallel on a conic):
        # reprojected as two corners, an edge ran through the raster (46 of 310,500 pixels left out of the world)
        cut = shapely.segmentize(cut, max_segment_length=min(east - west, north - south) / 100)
        cut = gpd.GeoSeries(cut, crs=regions.crs).to_crs(grid.crs).to_numpy()
        geometries = projected.geometry.to_numpy().copy()
        geometries[infinite] = cut
        projected = projected.set_geometry(gpd.GeoSeries(geometries, index=projected.index, crs=grid.crs))
        infinite = _not_finite(projected.geometry)
    if infinite.any():
        raise InputError(f"{path}: {infinite.sum()} of {len(regions)} regions do not map onto the raster's CRS "
                         f"(first: {_plain(keys[np.flatnonzero(infinite)[0]])!r}: a vertex goes to "
                         "infinity); check the regions' CRS, or cut them to the raster's area")  # fmt: skip
    return projected


def _not_finite(geometries) -> np.ndarray:
    """Per geometry: whether any of its vertices is infinite or NaN."""
    coordinates, owners = shapely.get_coordinates(geometries.to_numpy(), return_index=True)
    flags = np.zeros(len(geometries), bool)
    flags[owners[~np.isfinite(coordinates).all(axis=1)]] = True
    return flags


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


def _cells_of_points(points, transform: Affine):
    """rasterstats' ``boxify_points``: each point as the cell it falls in (the floor of its pixel coordinates), less
    1% of a pixel on every side.  A point on a cell's edge or corner then counts the cell east and south of it, as in
    rasterstats; rasterized as it is, its bounds gave an empty window."""
    inset = -0.01 * abs(min(transform.a, transform.e))
    cells = []
    for point in getattr(points, "geoms", [points]):
        col, row = (math.floor(a) for a in ~transform @ (point.x, point.y))
        (x_a, y_a), (x_b, y_b) = transform @ (col, row), transform @ (col + 1, row + 1)
        cells.append(shapely.box(x_a, y_a, x_b, y_b).buffer(inset))
    return shapely.MultiPolygon(cells)


def _centre_batch(reader: WindowReader, grid: Grid, nodata, zones: list[int], wkbs: list) -> pd.DataFrame:
    from rasterio.features import rasterize

    height, width = grid.shape
    x0, dx, _, y0, _, dy = grid.geometry.transform
    affine = Affine.from_gdal(*grid.geometry.transform)
    sizes = grid.row_sizes
    rows_out: list[tuple] = []
    for zone, wkb in zip(zones, wkbs):
        if wkb is None:
            continue
        geom = shapely.from_wkb(wkb)
        if geom.geom_type in _PUNCTUAL:
            geom = _cells_of_points(geom, affine)
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


def _extracted(reader: WindowReader, grid: Grid, wkbs: list, raster, features, ops: list[str]) -> pd.DataFrame:
    """exactextract's ``ops`` of the ``features`` (in a table with their ``zone``); a read failure as tilemask's
    :class:`ReadError` naming the file and window, not rasterio's bare "Read failed" (which, unpicklable, reached
    the client as ``Exception: RasterioIOError('Read failed. ...')``)."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        # A label COG on S3 or a web server: the endpoint the AWS variables name. Given a path, exactextract opens it
        # with GDAL's own bindings when they are installed, outside rasterio's environment: it gets the dataset.
        with gdal_env(reader.path), contextlib.ExitStack() as opened:
            if isinstance(raster, str):
                raster = opened.enter_context(rasterio.open(raster))
            return locked_exact_extract(raster, features, ops, include_cols=["zone"], output="pandas")
    except RasterioError as exc:  # exactextract's GDAL source failed: "Read failed. See previous exception"
        failure = exc
    reader.check_readable(grid, wkbs)  # outside the handler: a chain of exceptions does not travel to the client
    raise failure


class LabelRasterSource:
    """An exactextract ``RasterSource`` over a Zarr label array, read window by window.

    The array is opened here, before exactextract runs, so a callback from
    exactextract's C++ only slices it, keeping the chunks in its thread's cache (no file-handle cache, no
    ``os.stat``, no lock).
    Only use it through :func:`locked_exact_extract`.
    """

    def __new__(cls, reader: WindowReader, grid: Grid, nodata):
        from exactextract.raster import RasterSource

        array = reader.zarr_array()

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
                return read_zarr_window(reader.path, array, slice(y_off, y_off + ny), slice(x_off, x_off + nx))

        return _Source()


def locked_exact_extract(raster, features, ops, **kwargs):
    """``exactextract.exact_extract`` under the process-wide lock, its static state initialised first.

    Every call of exactextract in tilemask goes through here (see the module docstring).
    """
    from exactextract import exact_extract

    global _exactextract_ready
    with _EXACTEXTRACT_LOCK:
        if not _exactextract_ready:
            try:
                _warm_up_exactextract()
            except Exception as exc:  # the lock alone keeps tilemask's own calls safe
                logger.debug("exactextract warm-up failed: %s", exc)
            _exactextract_ready = True
        return exact_extract(raster, features, ops, **kwargs)


def _warm_up_exactextract() -> None:
    """Initialise ``Operation::empty_stats()``'s C++ static: one feature off a 1-pixel in-memory raster."""
    from exactextract import exact_extract
    from exactextract.raster import NumPyRasterSource

    source = NumPyRasterSource(np.zeros((1, 1), np.int32), 0.0, 0.0, 1.0, 1.0)
    ring = [[10.0, 10.0], [11.0, 10.0], [11.0, 11.0], [10.0, 11.0], [10.0, 10.0]]
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
    exact_extract(source, [feature], ["values", "coverage", "cell_id"], output="geojson")


def _fraction_batch(reader: WindowReader, grid: Grid, nodata, zones: list[int], wkbs: list) -> pd.DataFrame:
    from exactextract.feature import JSONFeatureSource

    keep = [(z, w) for z, w in zip(zones, wkbs) if w is not None]
    if not keep:
        return pd.DataFrame(columns=["zone", "cls", "count", "size"])
    # GeoJSON-like features, as exactextract's GeoDataFrame source makes them, with a CRS that may be None
    features = JSONFeatureSource(
        [
            {"type": "Feature", "properties": {"zone": z}, "geometry": shapely.from_wkb(w).__geo_interface__}
            for z, w in keep
        ],
        srs_wkt=grid.geometry.crs_wkt,
    )
    # a GDAL raster goes to exactextract as its path: exactextract's own source, as exact_extract(path) reads it
    raster = LabelRasterSource(reader, grid, nodata) if reader.is_zarr else reader.path
    sizes = grid.row_sizes
    rows_out = []
    if np.isnan(sizes).all() or (sizes == sizes[0]).all():  # one pixel size: exactextract sums per class itself
        ops = ["count", "unique", "frac"]  # a class's pixels: count * frac = the sum of its cells' coverage
        result = _extracted(reader, grid, [w for _, w in keep], raster, features, ops)
        for zone, count, classes, fractions in zip(result["zone"], result["count"], result["unique"], result["frac"]):
            for cls, fraction in zip(np.asarray(classes, dtype=np.int64), np.asarray(fractions, dtype=float)):
                pixels = float(count) * fraction
                rows_out.append((int(zone), int(cls), pixels, pixels * float(sizes[0])))
        return pd.DataFrame(rows_out, columns=["zone", "cls", "count", "size"])
    # geographic rasters: every covered cell, weighted by its row's area
    result = _extracted(reader, grid, [w for _, w in keep], raster, features, ["values", "coverage", "cell_id"])
    width = grid.shape[1]
    for zone, values, coverage, cell_id in zip(result["zone"], result["values"], result["coverage"], result["cell_id"]):
        values = np.asarray(values, dtype=np.int64)
        coverage = np.asarray(coverage, dtype=float)
        rows = np.asarray(cell_id, dtype=np.int64) // width
        for cls in np.unique(values):
            hit = values == cls
            rows_out.append((int(zone), int(cls), float(coverage[hit].sum()), float(np.sum(coverage[hit] * sizes[rows[hit]]))))
    return pd.DataFrame(rows_out, columns=["zone", "cls", "count", "size"])
