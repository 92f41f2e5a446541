"""GeoTIFF / COG (any GDAL raster, local or remote) read by window with rasterio.

Values are returned as stored unless the bands carry scale/offset metadata, in
which case ``stored * scale + offset`` (float32) is returned.  Validity follows
GDAL's dataset mask (``rasterio``'s ``dataset_mask``): an internal or external
mask if there is one, else the alpha band, else the nodata value (a pixel is
invalid when every band holds nodata), else the bands' own masks (a VRT's ``<MaskBand>``
per band: invalid where every band's is).  Alpha bands are not image bands: they
are left out of the default band selection.

Remote rasters (``https://``, ``s3://``, ``/vsi...``) are read with HTTP range
requests; :data:`CLOUD_DEFAULTS` are GDAL settings for that (timeouts and retries
included, so a stalled server fails a read instead of hanging it), applied
through ``rasterio.Env`` around every open and read unless the environment sets
them.  tilemask never writes them into ``os.environ``: a library must not change
its caller's process.

A raster georeferenced only by GCPs or RPCs is refused: its pixels have no transform,
and outputs would silently lose their place on Earth (warp it first, e.g.
``gdalwarp``, or ``gdalwarp -rpc``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import RasterioError
from rasterio.windows import Window

from ..errors import InputError, ReadError
from ..geometry import RasterGeometry, Region
from ..storage import gdal_options, network_object, object_problem, object_version, prefix_entries
from . import ImageSource, cached_handle, file_stamp, missing_local, usable_geometry

logger = logging.getLogger(__name__)

CLOUD_DEFAULTS = {
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_VERSION": "2",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(64 << 20),
    "GDAL_CACHEMAX": 16 << 20,  # bytes (rasterio hands the number to GDALSetCacheMax64): a block's tiles, once
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",  # seconds to connect
    "GDAL_HTTP_TIMEOUT": "30",  # seconds for one request, retries aside
    "CPL_VSIL_GZIP_WRITE_PROPERTIES": "NO",  # no index GDAL would leave beside a .tar.gz input (x.tar.gz.properties)
}


NETWORK = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift", "/vsiwebhdfs", "://")


# GDAL keeps what it read of a network file (its size, its blocks) after the file is closed, for the next open of
# the same name: a worker reading an object replaced since would read the old one's blocks.  Files under these
# prefixes are dropped from that cache when closed (a colon-separated list, each a prefix of the names)
NOT_CACHED_ACROSS_OPENS = "/vsicurl/:/vsis3/:/vsigs/:/vsiaz/:/vsiadls/:/vsioss/:/vsiswift/"


def gdal_env(path: str | None = None) -> rasterio.Env:
    """:data:`CLOUD_DEFAULTS`, less what the environment sets itself, and the S3 endpoint the AWS variables
    name (:func:`tilemask.storage.gdal_options`), as a ``rasterio.Env``; for a ``path`` over the network, no
    directory listing to find sidecar files (a request per open), and nothing of it cached once closed
    (:data:`NOT_CACHED_ACROSS_OPENS`).  A local file's sidecars (``.msk``, ``.tfw``, ``.aux.xml``) are GDAL's to
    find: without them its mask and georeferencing are lost, silently; so where the environment says
    ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` (set for cloud reads), a local file's are probed one by one
    (``TRUE``), but for a local VRT naming files over the network (:func:`_names_network_files`)."""
    settings, local = dict(CLOUD_DEFAULTS), {}
    if path is not None and any(marker in path for marker in NETWORK):
        settings["GDAL_DISABLE_READDIR_ON_OPEN"] = "EMPTY_DIR"
        settings["CPL_VSIL_CURL_NON_CACHED"] = NOT_CACHED_ACROSS_OPENS
    elif (path is not None and os.environ.get("GDAL_DISABLE_READDIR_ON_OPEN", "").upper() == "EMPTY_DIR"
          and not _names_network_files(path)):  # fmt: skip
        local["GDAL_DISABLE_READDIR_ON_OPEN"] = "TRUE"
    return rasterio.Env(**{k: v for k, v in settings.items() if k not in os.environ}, **local, **gdal_options())


def _names_network_files(path: str) -> bool:
    """Whether the local ``path`` is a VRT that names files over the network, itself or through the local VRTs it
    names: GDAL opens its sources under the VRT's settings, and ``TRUE`` asked the server for 7 sidecars of each
    source opened (``.aux.xml``, ``.aux``, ``.xml``, ...), where the environment's ``EMPTY_DIR`` asks for none. A
    VRT this process cannot read (in an archive, ``/vsizip/``) is taken to name some.  Its sources' names are what
    counts: a URL elsewhere in its text (a metadata item's licence, ``https://...``) kept ``EMPTY_DIR``, and a local
    source's ``.msk`` was lost; a local VRT naming a VRT of remote files asked for their sidecars.  Each VRT is read
    once a version (:func:`_vrt_sources`), each looked at as it is now: with the outer VRT's version alone, an inner
    VRT changed from a remote source to a local one kept ``EMPTY_DIR``, and that source's ``.msk`` was lost."""
    if not path.lower().endswith(".vrt"):
        return False
    pending, seen = [path], set()
    while pending:
        vrt = pending.pop()
        if os.path.realpath(vrt) in seen:  # a VRT naming itself, or one named twice
            continue
        seen.add(os.path.realpath(vrt))
        try:
            stat = os.stat(vrt)
        except OSError:
            if vrt.startswith("/vsi"):  # in an archive: as one it cannot read
                return True
            continue
        for name in _vrt_sources(vrt, stat.st_mtime_ns, stat.st_size):
            if any(marker in name for marker in NETWORK):
                return True
            if name.lower().endswith(".vrt"):
                pending.append(name)
    return False


@functools.lru_cache(maxsize=64)
def _vrt_sources(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """The files a VRT's bands, mask and overviews read (its ``SourceFilename`` and ``SourceDataset``), those
    relative to it joined to its folder; GDAL's ``vrt://`` connection strings as the file they name; read once a
    version (``mtime_ns``, ``size``).  A VRT that is no XML (GDAL then opens none of its sources) names none; one
    this process cannot read names none."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return ()
    names = []
    for element in root.iter():
        if element.tag not in ("SourceFilename", "SourceDataset") or not (element.text or "").strip():
            continue
        name = element.text.strip()
        if name.startswith("vrt://"):
            name = name[len("vrt://"):].split("?", 1)[0]
        if element.get("relativeToVRT") == "1" and not os.path.isabs(name) and not name.startswith("/vsi"):
            name = os.path.join(os.path.dirname(path), name)
        names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class RasterSource(ImageSource):
    """Bands x rows x cols of a GDAL raster; ``bands`` are 1-based, in the order asked for."""

    selects_bands: ClassVar[bool] = True

    path: str
    bands: tuple[int, ...]
    height: int
    width: int
    dtype: str
    raster_geometry: RasterGeometry
    masked: bool = False  # the dataset has a nodata value, a mask or an alpha band
    scales: tuple[float, ...] | None = None  # per selected band, when not all 1 / 0
    offsets: tuple[float, ...] | None = None
    nodata_values: tuple[float, ...] | None = None  # per selected band: GDAL's mask is "any band != its nodata"
    version: str | None = None  # of an object on the network, when opened (:func:`tilemask.storage.object_version`)

    @classmethod
    def open(cls, path: str, bands: list[int] | None = None) -> RasterSource:
        try:
            with gdal_env(path), rasterio.open(path) as ds:
                count, height, width = ds.count, ds.height, ds.width
                off_grid = not_on_a_grid(path, ds)
                dtypes = ds.dtypes
                geometry = RasterGeometry(
                    crs_wkt=ds.crs.to_wkt() if ds.crs else None, transform=tuple(ds.transform.to_gdal())
                )
                image_bands = [i for i, c in enumerate(ds.colorinterp, start=1) if c != ColorInterp.alpha]
                # a nodata value, a mask of the dataset's or an alpha band, or every band a mask of some kind (GDAL's
                # dataset mask is valid where any band's is: one band without a mask makes every pixel valid)
                flags_per_band = ds.mask_flag_enums
                masked = (
                    ds.nodata is not None
                    or any(MaskFlags.per_dataset in flags or MaskFlags.alpha in flags for flags in flags_per_band)
                    or all(flags != [MaskFlags.all_valid] for flags in flags_per_band)
                )
                scales, offsets = ds.scales, ds.offsets
                nodata_only = all(flags == [MaskFlags.nodata] for flags in ds.mask_flag_enums)
                nodatavals = ds.nodatavals
                subdatasets = ds.subdatasets
                sources = ds.files[1:] if ds.driver == "VRT" else []
        except RasterioError as exc:
            from .archive import archive_problem

            if missing_local(path):  # GDAL's line said "cannot open raster: {path}: No such file or directory"
                raise InputError(f"{path}: no such file or folder") from None
            # a member damaged where GDAL reads its header: GDAL's line named its own source file and zlib's code
            detail = archive_problem(path) or _damage_seen(path) or first_gdal_line(exc)
            url = network_object(path)  # an object the store refused to a key it does not know, or a server that
            if url and "not recognized as being" in detail:  # stalled after its headers: GDAL's line said "not
                detail = object_problem(url, body=True) or detail  # recognized as being in a supported file format"
            if url and ("does not exist" in detail or "404" in detail):  # a "folder" of scenes: no object by its name
                entries = prefix_entries(url)
                if entries:
                    counted = f"{entries} {'entry' if entries == 1 else 'entries'}"
                    detail = (f"no such object; it is a prefix (a folder) of {counted}: list its scenes in "
                              "input.list, one URL a line (a folder or a glob is expanded on the local file system "
                              "only)")
            if url and url.startswith("s3://") and detail.rstrip(".") == "Access Denied" and (
                    os.environ.get("AWS_REQUEST_PAYER", "").lower() != "requester"):  # fmt: skip
                detail += " (a requester-pays bucket's objects need AWS_REQUEST_PAYER=requester)"
            if url and " " in url and "Malformed input" in detail:  # CURL's: it sends no raw space
                detail += " (a space in a URL is written %20)"
            raise InputError(f"{path}: cannot open raster: {detail}") from None
        if off_grid:
            raise InputError(off_grid)
        if not count:  # a container (NetCDF, HDF) whose rasters are its subdatasets, or a VRT of no band
            hint = f" (it holds {len(subdatasets)} subdatasets: write the one to segment to a GeoTIFF first, " \
                f"gdal_translate '{subdatasets[0]}' out.tif)" if subdatasets else ""
            raise InputError(f"{path}: a raster with no bands{hint}")
        missing = [(f, why) for f, why in _sources_problems(sources) if why]
        if missing:  # GDAL opens the VRT and fails at the first read of the file, on a worker (exit 1)
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"{path}: a VRT whose source {missing[0][0]} {missing[0][1]}{more}")
        from .archive import damaged_member

        damage = damaged_member(path)
        if damage:
            raise InputError(damage)
        usable_geometry(path, geometry)
        if bands:
            bad = [b for b in bands if b > count]
            if bad:
                raise InputError(f"{path}: preprocess.bands {bad} out of range, the raster has {count} bands")
        chosen = tuple(bands or image_bands or range(1, count + 1))
        complex_band = next((b for b in chosen if np.dtype(dtypes[b - 1]).kind == "c"), None)
        if complex_band:  # numpy's cast to float dropped the imaginary part without a word
            raise InputError(
                f"{path}: band {complex_band} holds complex ({dtypes[complex_band - 1]}) pixels; tilemask reads one "
                "real value per pixel and band (write the amplitude or the parts as bands first)"
            )
        dtype = np.result_type(*(dtypes[b - 1] for b in chosen)).name  # bands of several types: read_bands
        band_scales = tuple(float(scales[b - 1]) for b in chosen)
        band_offsets = tuple(float(offsets[b - 1]) for b in chosen)
        rescaled = any(s != 1.0 for s in band_scales) or any(o != 0.0 for o in band_offsets)
        # the mask from integer nodata values, when every band is read: computed from the pixels read
        # (what GDAL's dataset mask computes by reading every band again)
        from_pixels = (
            nodata_only and np.dtype(dtype).kind in "iu" and sorted(chosen) == list(range(1, count + 1))
            and all(v is not None and _holds(dtype, v) for v in nodatavals)
        )  # fmt: skip
        return cls(
            path, chosen, height, width, dtype, geometry, masked,
            band_scales if rescaled else None, band_offsets if rescaled else None,
            tuple(int(nodatavals[b - 1]) for b in chosen) if from_pixels else None,
            object_version(url) if (url := network_object(path)) else None,
        )  # fmt: skip

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.bands), self.height, self.width)

    @property
    def geometry(self) -> RasterGeometry:
        return self.raster_geometry

    @property
    def has_invalid(self) -> bool:
        return self.masked

    @property
    def floating(self) -> bool:
        return np.dtype(self.dtype).kind == "f" or self.scales is not None

    def _dataset(self):
        version = self.version or file_stamp(self.path)  # opened again where the file was replaced since
        return cached_handle(("raster", self.path), lambda: rasterio.open(self.path), version)

    def read(self, region: Region) -> np.ndarray:
        return self._scaled(self._read_raw(region))

    def with_nodata(self, values: tuple[float, ...]) -> RasterSource:
        """This raster masked by ``values`` (one a band of the file, or one for all), not by GDAL's mask; unchanged,
        with a warning, where they do not name a value of each band read that its pixels can hold (GDAL would then
        find every pixel valid)."""
        if len(values) != 1 and max(self.bands) > len(values):
            logger.warning("%s: its STAC raster:bands declare %d nodata value(s), none for some of the bands read, %s: "
                           "its own mask is used", self.path, len(values), list(self.bands))  # fmt: skip
            return self
        chosen = tuple(values[0] if len(values) == 1 else values[b - 1] for b in self.bands)
        if not all(_holds(self.dtype, v) for v in chosen):
            logger.warning("%s: the nodata values %s that its STAC raster:bands declare are not values of its %s "
                           "bands %s: its own mask is used", self.path, list(values), self.dtype, list(self.bands))
            return self
        return dataclasses.replace(self, masked=True, nodata_values=chosen)

    def read_with_valid(self, region: Region) -> tuple[np.ndarray, np.ndarray | None]:
        if self.nodata_values is None:
            return self.read(region), self.read_valid(region)
        raw = self._read_raw(region)
        return self._scaled(raw), _valid(raw, self.nodata_values)

    def _scaled(self, data: np.ndarray) -> np.ndarray:
        if self.scales is None:
            return data
        shape = (-1, 1, 1)
        return data * np.float32(self.scales).reshape(shape) + np.float32(self.offsets).reshape(shape)

    def _read_raw(self, region: Region) -> np.ndarray:
        (r0, r1), (c0, c1) = region
        ds = None
        try:
            with gdal_env(self.path):
                ds = self._dataset()
                return read_bands(ds, self.bands, window=Window(c0, r0, c1 - c0, r1 - r0))
        except RasterioError as exc:
            detail = first_gdal_line(exc)
        if ds is not None:  # not opened again: a file that failed to open (a stalled server) fails so again, raw
            with gdal_env(self.path):
                detail = block_failure(self.path, detail, ds, region, self.bands)
        # raised outside the handler: GDAL's exception chain must not travel back to the client
        raise ReadError(f"{self.path}: read failed at rows {r0}:{r1}, cols {c0}:{c1}: {detail}")

    def read_valid(self, region: Region) -> np.ndarray | None:
        if not self.masked:
            return None
        if self.nodata_values is not None:
            return _valid(self._read_raw(region), self.nodata_values)
        (r0, r1), (c0, c1) = region
        try:
            with gdal_env(self.path):
                return self._dataset().dataset_mask(window=Window(c0, r0, c1 - c0, r1 - r0)) > 0
        except RasterioError as exc:
            detail = first_gdal_line(exc)
        raise ReadError(f"{self.path}: mask read failed at rows {r0}:{r1}, cols {c0}:{c1}: {detail}")


def _holds(dtype, value: float) -> bool:
    """Whether pixels of ``dtype`` can hold ``value`` (any, NaN included, for floats; a whole number in range for
    integers)."""
    kind = np.dtype(dtype)
    if kind.kind == "f":
        return True
    return not math.isnan(value) and float(value).is_integer() and np.iinfo(kind).min <= value <= np.iinfo(kind).max


def _valid(raw: np.ndarray, nodata: tuple[float, ...]) -> np.ndarray:
    """Where any band of ``raw`` differs from its ``nodata`` value (GDAL's mask from nodata values); a NaN value
    matches NaN pixels."""
    if any(math.isnan(v) for v in nodata):
        return np.any([~np.isnan(band) if math.isnan(v) else band != v for band, v in zip(raw, nodata)], axis=0)
    return np.any(raw != np.asarray(nodata, raw.dtype).reshape(-1, 1, 1), axis=0)


def not_on_a_grid(path: str, ds) -> str | None:
    """Why a raster cannot be read on a grid: no transform, georeferenced only by ground control points or by RPCs
    (an RPC-only scene ran into outputs in pixels, their place on Earth lost without a word; one with a CRS too,
    into pixels a degree wide at 0, 0)."""
    if not ds.transform.is_identity:  # a CRS beside GCPs or RPCs does not place the pixels: no transform does
        return None
    if ds.gcps[0]:
        return f"{path}: georeferenced by ground control points only; warp it to a grid first (gdalwarp)"
    if ds.rpcs is not None:
        return f"{path}: georeferenced by RPCs only; orthorectify it to a grid first (gdalwarp -rpc)"
    return None


def read_bands(ds, bands, out_shape: tuple[int, int] | None = None, **read) -> np.ndarray:
    """``ds.read(bands, ...)`` (1-based ``bands``; ``out_shape`` of one band), in their common type when they are of
    several types (a VRT stacking files), which rasterio reads one type a call only ("more than one 'dtype'")."""
    types = {ds.dtypes[b - 1] for b in bands}
    if len(types) == 1:
        return ds.read(list(bands), out_shape=out_shape and (len(bands), *out_shape), **read)
    common = np.result_type(*types)
    parts = [ds.read(b, out_shape=out_shape, out_dtype=common, **read) for b in bands]
    return np.ma.stack(parts) if read.get("masked") else np.stack(parts)


REMOTE_SOURCES_OPENED = 16
"""A VRT's remote sources opened (their headers read) when it is planned, three requests each; the others are
asked for by one request each (a HEAD), :data:`SOURCES_ASKED_AT_ONCE` at a time (a mosaic of 400 sources on
Python's test server over loopback: 1.3 s to plan without, 2.7-4.5 s with; opening every source cost 5.7 s at 50 ms
a request): a source that is gone is refused then (exit 2), not at its first read on a worker (exit 1)."""
SOURCES_ASKED_AT_ONCE = 32


def _sources_problems(names: list[str]) -> list[tuple[str, str | None]]:
    """``(source, why)`` for each of a VRT's sources: a local one by :func:`_unreadable_source`, its first
    :data:`REMOTE_SOURCES_OPENED` remote ones opened by GDAL, the others' objects asked for
    (:func:`tilemask.storage.object_problem`), all together."""
    remote = [name for name in names if _remote(name)]
    local = [(name, _unreadable_source(name)) for name in names if not _remote(name)]
    if not remote:
        return local
    from concurrent.futures import ThreadPoolExecutor

    opened, asked = remote[:REMOTE_SOURCES_OPENED], remote[REMOTE_SOURCES_OPENED:]
    unreached = threading.Event()  # one source not reached (a stalled server): the rest are not asked

    def missing(name: str) -> str | None:
        """Refused only where it is not there (a 404 or 410): one that fsspec cannot ask for, or cannot reach where
        GDAL may (its own credentials and headers: ``AWS_NO_SIGN_REQUEST``, ``GDAL_HTTP_HEADERS``), is left to the
        read."""
        if unreached.is_set():
            return None
        url = network_object(name)
        problem = url and object_problem(url)
        if problem and problem != "no such object":
            unreached.set()
        return "cannot be opened: no such object" if problem == "no such object" else None

    with ThreadPoolExecutor(max_workers=min(len(remote), SOURCES_ASKED_AT_ONCE)) as pool:
        found = [*pool.map(_unreadable_source, opened), *pool.map(missing, asked)]
    return local + list(zip(opened + asked, found))


def _damage_seen(path: str) -> str | None:
    """:func:`~.archive.damaged_member` of a member GDAL could not open; None where the check cannot read it (a
    remote zip without the member, a server without the zip): GDAL's line says so, naming the path, where the
    check said "cannot read it to check its checksum: KeyError ..." naming the zip alone."""
    from .archive import damaged_member

    try:
        return damaged_member(path)
    except InputError:
        return None


def _unreadable_source(name: str) -> str | None:
    """Why a VRT's source file cannot be read (GDAL opens a VRT without its sources, and would say so at the first
    read, on a worker): a local file that does not exist, an archive of ``/vsizip/``/``/vsitar/`` that is not there
    or lacks the member, a remote source GDAL cannot open (a 404: its header is read, as GDAL opens it); None for
    one named as a subdataset, which GDAL says at the first read."""
    from .archive import archive_problem, split_member

    if split_member(name):
        problem = archive_problem(name)
        return problem and f"cannot be read: {problem}"
    if _remote(name):
        try:
            with gdal_env(name), rasterio.open(name):
                return None
        except RasterioError as exc:
            return f"cannot be opened: {first_gdal_line(exc)}"
    if name.startswith("/vsi") or SUBDATASET.match(name) or os.path.exists(name):
        return None
    return "does not exist"


def _remote(name: str) -> bool:
    return any(marker in name for marker in NETWORK)


SUBDATASET = re.compile(r"[A-Za-z][A-Za-z0-9_]+:")  # a VRT's source named as GDAL names a subdataset: NETCDF:"x.nc":t


def tiff_read_detail(path: str, detail: str, shape: tuple[int, int], block_shape: Callable[[], tuple[int, int]]) -> str:
    """GDAL's words for a failed read of the raster at ``path`` (``shape``: its rows and columns), with libtiff's
    broken block said in words. libtiff names a broken tile by number, with a row/col that may lie outside the
    block being read (``TIFFFillTile:Read error at row 512, col 0, tile 3``): where that tile is, in pixels; a
    short read of a block it cannot place (``TIFFReadEncodedStrip:Read error at scanline 4294967295``, -1) is in
    the window read."""
    found = re.search(r"\btile (\d+)", detail)
    unplaced = re.search(r"Read error at (scanline|row) 4294967295\b", detail)
    if not found and not unplaced:
        return detail
    rest = detail.split(";", 1)[1].strip() if ";" in detail else detail
    remote = any(marker in path for marker in NETWORK)  # a short read there is more often a stall
    what = "is damaged or cut short"
    if remote:
        what = "could not be read whole (the server stopped answering, or the file is damaged)"
    if not found:
        return f"a TIFF {'strip' if unplaced.group(1) == 'scanline' else 'tile'} in this window {what}: {rest}"
    (height, width), (block_h, block_w) = shape, block_shape()
    across, down = -(-width // block_w), -(-height // block_h)
    tile = int(found.group(1)) % (across * down)  # separate planes number their tiles band after band
    t0, u0 = tile // across * block_h, tile % across * block_w
    rows, cols = f"{t0}:{min(t0 + block_h, height)}", f"{u0}:{min(u0 + block_w, width)}"
    return f"TIFF tile {found.group(1)} (rows {rows}, cols {cols}) {what}: {rest}"


CODEC_FAILURE = re.compile(r"decod|decompress|code not yet in table|corrupted|jpeglib", re.IGNORECASE)
"""libtiff's words for a block that does not decompress: ``ZIPDecode:Decoding error at scanline 256``,
``<file>:Using code not yet in table`` (LZW), ``ZSTDDecode:Error in ZSTD_decompressStream()``, ``LZMADecode:...``,
``LERCPreDecode:lerc_decode() failed``, ``JPEGLib:...``."""
MAX_BLOCKS_PROBED = 64


def block_failure(path: str, detail: str, ds, region: Region, bands) -> str:
    """GDAL's words ``detail`` for a failed read of ``region`` (rows, cols) of ``bands`` of the open raster ``ds``
    at ``path``, with the broken TIFF block said in words (:func:`tiff_read_detail`).  A tile that does not
    decompress, libtiff names by a scanline at most (``ZIPDecode:Decoding error at scanline 256``) or not at all
    (LZW's ``<file>:Using code not yet in table``): the window's tiles (:data:`MAX_BLOCKS_PROBED` at most) are read
    one by one, and the first that fails is named, ``TIFF tile 5 (rows 256:512, cols 256:512) does not decompress
    (DEFLATE): Decoding error``."""
    placed = tiff_read_detail(path, detail, (ds.height, ds.width), lambda: ds.block_shapes[0])
    if placed != detail or not CODEC_FAILURE.search(detail) or ds.driver != "GTiff":
        return placed
    (block_h, block_w), ((r0, r1), (c0, c1)) = ds.block_shapes[0], region
    across = -(-ds.width // block_w)
    tiles = [(t0, u0) for t0 in range(max(r0, 0) // block_h * block_h, min(r1, ds.height), block_h)
             for u0 in range(max(c0, 0) // block_w * block_w, min(c1, ds.width), block_w)]  # fmt: skip
    for t0, u0 in tiles[:MAX_BLOCKS_PROBED]:
        t1, u1 = min(t0 + block_h, ds.height), min(u0 + block_w, ds.width)
        try:
            read_bands(ds, bands, window=Window(u0, t0, u1 - u0, t1 - t0))
        except RasterioError as exc:
            words = first_gdal_line(exc)
            for module in (path, ds.name):  # libtiff's module: its function, or the file's name (LZW's)
                words = words.removeprefix(f"{module}:")
            words = re.sub(r" at scanline \d+", "", re.sub(r"^\w+:", "", words))  # the tile is placed
            # a tile's number where the bands share it (pixel interleaving); band after band, each has its own
            number = f" {t0 // block_h * across + u0 // block_w}" if ds.count == 1 or not _planar(ds) else ""
            codec = f" ({ds.compression.value})" if ds.compression else ""
            return f"TIFF tile{number} (rows {t0}:{t1}, cols {u0}:{u1}) does not decompress{codec}: {words}"
    return detail


def _planar(ds) -> bool:
    """Whether ``ds`` holds its bands one after another (TIFF PlanarConfiguration 2): a tile for each band."""
    return ds.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE") == "BAND"


def first_gdal_line(exc: BaseException) -> str:
    """GDAL's own words: the root of rasterio's exception chain, first line."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
