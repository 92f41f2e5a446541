"""XYZ tiles and point values of label outputs, through rio-tiler.

COG outputs are opened by rio-tiler's ``Reader`` on a dataset that tilemask opens
itself with the GTiff driver only (so a client can never make GDAL open a VRT or
any other driver); Zarr outputs go through ``XarrayReader`` on
:func:`tilemask.open_result`'s DataArray, or, for a tile of an OME-Zarr, on the
level of its pyramid that is as fine as the tile and no finer (as rio-tiler
picks a COG's overview); a plain Zarr has no pyramid, so a zoomed-out tile reads
its every (2**k)-th pixel instead, read from the whole store once and kept while
small (:func:`_plain_level`). Labels are read with nearest
resampling (from the COG's overviews at low zooms) and drawn in their class
colours, with nodata and the outside of the image transparent; probabilities
are drawn as a viridis ramp, one band (class) at a time, transparent where the
labels are nodata (that collar holds the writer's fill, not a prediction).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import rasterio
from fastapi import HTTPException
from rasterio.crs import CRS
from rio_tiler.colormap import cmap
from rio_tiler.errors import PointOutsideBounds, TileOutsideBounds
from rio_tiler.io import Reader, XarrayReader

from ..classes import CYCLE, class_name, cycled, probability_class
from ..formats import for_path
from .catalog import Entry
from .locks import KeyedLocks
from .paths import inside, reading

PLAIN_LEVELS = 8  # a plain Zarr's levels: every pixel, every 2nd, ... every 128th (a 32768^2 output in 256^2)
NEAREST = {"resampling_method": "nearest", "reproject_method": "nearest"}
OUTSIDE = (TileOutsideBounds, PointOutsideBounds)


@contextlib.contextmanager
def reader(root: Path, entry: Entry, variable: str = "labels", tile: tuple[int, int, int] | None = None):
    """A rio-tiler reader of ``entry``'s labels or probabilities; for a ``tile`` (x, y, zoom), of an OME-Zarr's level
    that suits it."""
    path = root / entry.path
    fmt = for_path(entry.path)
    if fmt.zarr_store:
        st = (path / "zarr.json").stat()
        stamp = (st.st_mtime_ns, st.st_ino)
        zoom = tile[2] if tile else None
        level = _level_for(str(path), variable, zoom, *stamp) if zoom is not None else 0
        seam = _seam(str(path), *stamp)  # a grid past 180 degrees: rioxarray cannot cut a tile across the meridian
        if seam is not None and tile is not None and _across(seam, tile):  # where its CRS cuts the Earth (a 422)
            raise TileOutsideBounds(f"tile {tile} reaches {seam:g} degrees, where the grid's CRS cuts the Earth")
        with XarrayReader(_zarr_array(str(path), variable, level, *stamp)) as r:
            yield r
        return
    name = entry.path
    if variable == "probabilities":  # a file of its own: a read that fails names it, not the labels
        path, name = root / entry.probabilities, entry.probabilities
    if not inside(root, path):  # a symlink swapped in since the catalog looked
        raise HTTPException(404, f"not found: {entry.path}")
    with reading(name), Reader(str(path), dataset=_open_gtiff(path)) as r:  # the dataset stays open: this thread's
        yield r


@functools.lru_cache(maxsize=16)
def _zarr_array(path: str, variable: str, level: int, mtime_ns: int, inode: int):
    """A Zarr output as :func:`tilemask.open_result` gives it (lazy), or that array's ``level`` of an OME-Zarr's
    pyramid, each 2**level times coarser on the same grid; opened once while the store is unchanged rather than
    for every tile; probabilities with their class axis named ``band``, as rio-tiler expects; a geographic grid
    past 180 degrees in its :func:`_wrapped_crs` (rio-tiler refuses its bounds)."""
    import dask.array as da
    import xarray as xr
    import zarr

    from ..results import open_result

    if level == 0:
        array = open_result(path, variable)
        if (round_180 := _wrapped_crs(array.rio.crs, *_span(array))) is not None:
            array = array.rio.write_crs(round_180)
        return array.rename({"class": "band"}) if variable == "probabilities" else array
    array = _zarr_array(path, variable, 0, mtime_ns, inode)  # level 0's grid, CRS and nodata, opened once
    if not _level_paths(path, variable, mtime_ns, inode):  # a plain Zarr: no pyramid
        with _STRIDING((path, variable, level, mtime_ns, inode)):  # those asking for it at once: one read
            return _plain_level(path, variable, level, mtime_ns, inode)
    stored = zarr.open_group(path, mode="r")[_level_paths(path, variable, mtime_ns, inode)[level]]
    grid = array.rio.transform() @ rasterio.Affine.scale(2**level)
    height, width = stored.shape[-2:]
    coords = {name: values for name, values in array.coords.items() if name not in ("x", "y", "xc", "yc", "spatial_ref")}
    coords["y"] = grid.f + (np.arange(height) + 0.5) * grid.e  # pixel centres, as rioxarray reads a grid
    coords["x"] = grid.c + (np.arange(width) + 0.5) * grid.a
    out = xr.DataArray(da.from_zarr(stored), dims=array.dims, coords=coords, attrs=array.attrs, name=array.name)
    out = out.rio.write_crs(array.rio.crs)
    return out.rio.write_nodata(array.rio.nodata, encoded=False) if array.rio.nodata is not None else out


_STRIDING = KeyedLocks()
KEPT_BYTES = 16 << 20
"""A plain Zarr's level up to this many bytes, all its classes, is read once and kept (16 at most, the cache's):
2048^2 uint8 labels are 4 MiB; counted in pixels, float32 probabilities of 5 classes kept 80 MiB a level, up to
1.3 GB."""


@functools.lru_cache(maxsize=16)
def _plain_level(path: str, variable: str, level: int, mtime_ns: int, inode: int):
    """Every (2**level)-th pixel of a plain Zarr output, on the grid of those pixels, in memory where small (a
    zoomed-out tile read the whole array at full resolution, each tile again: 20 tiles of an 8192^2 Zarr at once
    took the server to 4.6 GB); lazy where large (a tile then reads the chunks under it)."""
    step = slice(None, None, 2**level)
    strided = _zarr_array(path, variable, 0, mtime_ns, inode).isel(x=step, y=step)
    return strided.compute() if strided.nbytes <= KEPT_BYTES else strided


@functools.lru_cache(maxsize=16)
def _level_paths(path: str, variable: str, mtime_ns: int, inode: int) -> tuple[str, ...]:
    """The store keys of an OME-Zarr output's levels of ``variable``, finest first; none for a plain Zarr. Kept
    while the store is unchanged (its ``zarr.json``'s mtime and inode): a store replaced by one of fewer levels
    was read at a level it no longer had (a 500 for every zoomed-out tile)."""
    import zarr

    from ..formats import OmeZarrFormat, for_path

    if for_path(path).name != "ome-zarr":
        return ()
    group = zarr.open_group(path, mode="r")
    fmt = OmeZarrFormat()
    first = fmt.labels_key(group) if variable == "labels" else fmt.probabilities_key(group)
    parent = first.rsplit("/", 1)[0] if "/" in first else ""
    attrs = dict(group[parent].attrs) if parent else dict(group.attrs)
    datasets = attrs["ome"]["multiscales"][0]["datasets"]
    return tuple(f"{parent}/{d['path']}" if parent else d["path"] for d in datasets)


def _level_for(path: str, variable: str, zoom: int, mtime_ns: int, inode: int) -> int:
    """The coarsest level of a Zarr output (an OME-Zarr's pyramid, a plain one's :func:`_plain_level`) whose
    pixels are no larger than a Web Mercator tile's at ``zoom``
    (rio-tiler's rule for a COG's overviews), measured at the output's centre."""
    base = _zarr_array(path, variable, 0, mtime_ns, inode)
    if base.rio.crs is None:
        return 0
    from rasterio.warp import transform

    grid = base.rio.transform()
    height, width = base.sizes["y"], base.sizes["x"]
    centre = grid @ (width / 2, height / 2)
    xs, ys = transform(base.rio.crs, "EPSG:3857", [centre[0], centre[0] + grid.a], [centre[1], centre[1]])
    pixel = float(np.hypot(xs[1] - xs[0], ys[1] - ys[0]))  # one output pixel, in Web Mercator metres there
    tile_pixel = 2 * np.pi * 6378137.0 / (256 * 2**zoom)
    if not np.isfinite(pixel) or pixel <= 0:
        return 0
    # an OME-Zarr's levels past its first of one row or column (a strip's: they go on halving its other axis) are
    # left to finer ones, as a plain Zarr's are: rio-tiler's clip_box refuses a raster of one row or column
    one_row = max(1, (min(height, width) - 1).bit_length())
    levels = min(len(_level_paths(path, variable, mtime_ns, inode)), one_row) or _plain_levels(min(height, width))
    return int(max(0, min(levels - 1, np.floor(np.log2(tile_pixel / pixel)))))


def _plain_levels(side: int) -> int:
    """How many levels a plain Zarr whose shorter side is ``side`` pixels has: up to :data:`PLAIN_LEVELS`, each
    with two pixels or more on each axis (every (2**k)-th of ``side`` is ceil(side / 2**k); rioxarray refuses a
    raster of one row or column)."""
    return min(PLAIN_LEVELS, max(1, (side - 1).bit_length()))


_local = threading.local()
DATASETS_PER_THREAD = 4


def _open_gtiff(path: Path) -> rasterio.io.DatasetReader | rasterio.vrt.WarpedVRT:
    """``path`` opened with the GTiff driver only, kept open by this thread while the file is unchanged.

    A GDAL dataset belongs to the thread that uses it; keeping it open spares the
    open and keeps its decoded blocks in GDAL's cache for the next tiles a map asks. What the thread holds of a
    file removed or replaced is closed first (:func:`_close_changed`).
    """
    cache: OrderedDict = _local.__dict__.setdefault("datasets", OrderedDict())
    _close_changed(cache)
    st = path.stat()
    key, stamp = str(path), (st.st_size, st.st_mtime_ns, st.st_ino)
    held = cache.get(key)
    if held is not None and held[0] == stamp:
        cache.move_to_end(key)
        return held[1]
    if held is not None:  # replaced since the sweep above
        _close(held[1])
    cache[key] = (stamp, _round_180(rasterio.open(path, driver="GTiff")))
    while len(cache) > DATASETS_PER_THREAD:
        _close(cache.popitem(last=False)[1][1])
    return cache[key][1]


def _close_changed(cache: OrderedDict) -> None:
    """Close the datasets of ``cache`` (one thread's) whose file was removed or replaced since it was opened: each
    holds its file open, and a removed output's disk space was not freed while the thread served other outputs."""
    for key, (stamp, dataset) in list(cache.items()):
        try:
            st = os.stat(key)
        except OSError:
            st = None
        if st is None or (st.st_size, st.st_mtime_ns, st.st_ino) != stamp:
            del cache[key]
            _close(dataset)


def _round_180(dataset):
    """``dataset``, or, for a geographic grid past +-180 degrees, a VRT of it in :func:`_wrapped_crs`."""
    from rasterio.vrt import WarpedVRT

    left, _, right, _ = dataset.bounds
    if (crs := _wrapped_crs(dataset.crs, left, right, abs(dataset.res[0]))) is None:
        return dataset
    return WarpedVRT(dataset, src_crs=crs, crs=crs, transform=dataset.transform, width=dataset.width,
                     height=dataset.height, nodata=dataset.nodata)  # fmt: skip


def _span(array) -> tuple[float, float, float]:
    """The west and east edges of a Zarr output's grid, and its pixels' width."""
    left, _, right, _ = array.rio.bounds()
    return left, right, abs(array.rio.resolution()[0])


@functools.lru_cache(maxsize=16)
def _seam(path: str, mtime_ns: int, inode: int) -> float | None:
    """The longitude (-180..180) where the :func:`_wrapped_crs` of a Zarr output's grid cuts the Earth; None for a
    grid it does not wrap."""
    from ..results import open_result

    array = open_result(path, "labels")
    left, right, pixel = _span(array)
    if _wrapped_crs(array.rio.crs, left, right, pixel) is None:
        return None
    return (left + right) / 2 % 360 - 180  # the middle's antipode, taken into -180..180


def _across(longitude: float, tile: tuple[int, int, int]) -> bool:
    """Whether Web Mercator ``tile`` (x, y, zoom) reaches ``longitude`` (a tile whose west edge it is does not: a
    0..360 grid's is 0, the edge of a tile column at every zoom, and that column is drawn)."""
    import morecantile

    bounds = morecantile.tms.get("WebMercatorQuad").bounds(*tile)
    return bounds.left < longitude <= bounds.right


def _wrapped_crs(crs, left: float, right: float, pixel: float) -> CRS | None:
    """For a geographic grid more than half a ``pixel`` past +-180 degrees (0..360) from ``left`` to ``right``, its
    ``crs`` with PROJ's ``+lon_wrap`` at its middle: a tile or point west of 180 degrees (-178) is then found at 182,
    where the grid has it (it was "outside the output"); None for any other grid (one registered at its pixels'
    centres, GTOPO30's -180.0042, is read as it is: through a warped VRT, a tile took ten times as long)."""
    if crs is None or not crs.is_geographic or (-180 - pixel / 2 <= left and right <= 180 + pixel / 2):
        return None
    return CRS.from_proj4(f"{crs.to_proj4()} +lon_wrap={(left + right) / 2}")


def _close(dataset) -> None:
    """Close ``dataset`` (:func:`_open_gtiff`'s), and the file under it if it is a VRT."""
    under = getattr(dataset, "src_dataset", None)
    dataset.close()
    if under is not None:
        under.close()


def label_tile(root: Path, entry: Entry, x: int, y: int, z: int) -> bytes:
    with reader(root, entry, tile=(x, y, z)) as r:
        image = r.tile(x, y, z, indexes=1, **NEAREST)
    labels = image.data[0]
    lut = np.array([CYCLE[v] for v in range(len(CYCLE))], np.uint8)
    rgba = lut[cycled(np.where(labels < entry.n_classes, labels, 0))]  # a value past the classes: transparent
    rgba[..., 3] = np.where(image.array.mask[0], 0, rgba[..., 3])
    if entry.nodata is not None:
        rgba[labels == entry.nodata, 3] = 0
    return _png(rgba)


def probability_tile(root: Path, entry: Entry, band: int, x: int, y: int, z: int) -> bytes:
    with reader(root, entry, "probabilities", tile=(x, y, z)) as r:
        zarr = isinstance(r, XarrayReader)
        bands = r.input.sizes["band"] if zarr else r.dataset.count
        if band > bands:
            raise IndexError(f"band {band} of {bands}")
        # a COG's every band: GDAL 3.10 warps a subset of a masked COG's bands 100x slower (6 s for a zoom-0 tile)
        image = r.tile(x, y, z, indexes=band if zarr else None, **NEAREST)
    layer = 0 if zarr else band - 1
    values = image.data[layer].astype(np.float32)
    scale = 1.0 if np.issubdtype(image.data.dtype, np.floating) else 255.0
    index = np.clip(np.rint(values / scale * 255), 0, 255).astype(np.uint8)
    ramp = np.array([cmap.get("viridis")[i] for i in range(256)], np.uint8)
    rgba = ramp[index]
    # a Zarr's probabilities have no nodata: rioxarray warps a uint8 array with 255 as one, and rio-tiler masks it,
    # so p = 1.0 was transparent; where it holds no prediction, the labels say (outside them, or their nodata)
    empty = _no_labels(root, entry, x, y, z)
    rgba[..., 3] = np.where(empty if zarr else image.array.mask[layer] | empty, 0, 255)
    return _png(rgba)


def _no_labels(root: Path, entry: Entry, x: int, y: int, z: int) -> np.ndarray:
    """Where the tile has no label (the labels' nodata, or outside them): the probabilities there are the
    writer's fill, not a prediction, and are drawn transparent as the labels are."""
    with reader(root, entry, tile=(x, y, z)) as r:
        image = r.tile(x, y, z, indexes=1, **NEAREST)
    empty = np.asarray(image.array.mask[0], bool)
    return empty | (image.data[0] == entry.nodata) if entry.nodata is not None else empty


def point(root: Path, entry: Entry, lon: float, lat: float) -> dict:
    """The label, its class and the probabilities (0-1) at ``lon``/``lat`` (value and class null on nodata);
    rio-tiler's ``PointOutsideBounds`` outside the image."""
    with reader(root, entry) as r:
        value = r.point(lon, lat, indexes=1)
    label = int(value.data[0])
    if bool(value.array.mask[0]) or (entry.nodata is not None and label == entry.nodata):
        return {"lon": lon, "lat": lat, "value": None, "class": None}
    out = {"lon": lon, "lat": lat, "value": label, "class": class_name(entry.class_names, label)}
    if entry.probabilities:
        with reader(root, entry, "probabilities") as r:
            probs = r.point(lon, lat)
        data = np.asarray(probs.data, dtype=np.float64)
        if not np.issubdtype(probs.data.dtype, np.floating):
            data = data / 255.0
        names = entry.class_names
        out["probabilities"] = {class_name(names, probability_class(names, len(data), i)): round(float(p), 6)
                                for i, p in enumerate(data)}  # fmt: skip
    return out


def band_choices(root: Path, entry: Entry, shown: int = 4) -> str:
    """The bands of ``entry``'s probabilities COG as a tile asks for them, each with its class: ``&band=1 (water),
    &band=2 (land)``; a sigmoid's one band is the foreground's (:func:`probability_class`); the first ``shown``."""
    with reader(root, entry, "probabilities") as r:
        count = r.dataset.count
    names = entry.class_names
    bands = [f"&band={i + 1} ({class_name(names, probability_class(names, count, i))})" for i in range(count)]
    return ", ".join(bands[:shown]) + (f", ... &band={count}" if count > shown else "")


def _png(rgba: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
