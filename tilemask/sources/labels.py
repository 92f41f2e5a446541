"""Label images (tilemask outputs or any integer raster/volume) as lazy Dask arrays.

What statistics, polygons and ``open_result`` read: the labels of a Zarr group
written by tilemask (or a bare Zarr array), a GeoTIFF/COG, or a NIfTI volume,
chunked for the cluster and read window by window, with the geometry, the class
names and the nodata value when the file records them.

Class names come from the Zarr group's ``tilemask.classes`` attribute, or the
GeoTIFF dataset tag ``TILEMASK_CLASSES`` (a JSON list), or, for NIfTI, the 3D
Slicer colour table ``<stem>.colors.csv`` beside the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
from dataclasses import dataclass

import dask.array as da
import nibabel as nib
import numpy as np
import rasterio
import zarr
from nibabel.arrayproxy import ArrayProxy
from rasterio.errors import RasterioError
from rasterio.windows import Window

from ..classes import CLASSES_TAG, ClassNames, read_colour_table
from ..errors import InputError, ReadError, option
from ..geometry import (
    Geometry,
    RasterGeometry,
    Region,
    VolumeGeometry,
    geometry_from_attrs,
    level_geometry,
    normalize_per_axis,
    ome_axes,
)
from . import cached_handle, file_stamp, read_region, usable_geometry
from .nifti import check_length, nifti_geometry, read_failure
from .raster import block_failure, first_gdal_line, gdal_env, not_on_a_grid
from .zarr import OME_SCALES, TILEMASK_ATTRS, ome_level_multiscale, ome_multiscales, open_zarr

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class LabelImage:
    path: str
    array: da.Array  # spatial axes only, integer labels
    geometry: Geometry
    class_names: ClassNames | None
    nodata: int | None

    @property
    def is_volume(self) -> bool:
        return isinstance(self.geometry, VolumeGeometry)


NAN_LABEL = int(np.iinfo(np.int32).min)  # a float label raster's nodata pixels where int32 cannot hold its nodata


def _nodata_past_int32(nodata: float | None) -> bool:
    """A float raster's nodata no int32 holds: NaN, ArcGIS's -3.4028235e38 (float32's lowest), a fraction; its pixels
    are read as :data:`NAN_LABEL`."""
    return nodata is not None and not (-(2.0**31) <= nodata < 2.0**31 and nodata == math.floor(nodata))


@dataclass(frozen=True)
class _RasterBand:
    """Array-like view of band 1 of a GDAL raster, read by window (for ``da.from_array``)."""

    path: str
    shape: tuple[int, int]
    dtype: np.dtype
    ndim: int = 2

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        return read_label_window(self.path, *index)


@dataclass(frozen=True)
class _RasterBands:
    """Array-like view of all the bands of a GDAL raster, ``(band, row, col)``, read by window (for
    ``da.from_array``; a COG's probabilities)."""

    path: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    ndim: int = 3

    def __getitem__(self, index: tuple[slice, slice, slice]) -> np.ndarray:
        bands, rows, cols = index
        return read_band_window(self.path, rows, cols, list(range(1, self.shape[0] + 1)))[bands]


def read_band_window(path: str, rows: slice, cols: slice, bands: int | list[int] = 1) -> np.ndarray:
    """Band ``bands`` of a GDAL raster at ``[rows, cols]`` (a list of bands: ``(band, row, col)``; its handle
    kept per worker thread), read with tilemask's GDAL settings (on S3 or a web server: the endpoint the AWS
    variables name); a damaged file as a :class:`ReadError` naming it and the window."""
    ds = None
    try:
        with gdal_env(path):
            ds = cached_handle(("label-raster", path), lambda: rasterio.open(path), file_stamp(path))
            return ds.read(bands, window=Window.from_slices(rows, cols, height=ds.height, width=ds.width))
    except RasterioError as exc:
        detail = first_gdal_line(exc)
    if ds is not None:  # libtiff's broken block in words
        with gdal_env(path):
            detail = block_failure(path, detail, ds, ((rows.start, rows.stop), (cols.start, cols.stop)),
                                   bands if isinstance(bands, list) else [bands])  # fmt: skip
    # raised outside the handler: GDAL's exception chain must not travel back to the client
    raise ReadError(f"{path}: read failed at rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop}: {detail}")


def read_label_window(path: str, rows: slice, cols: slice) -> np.ndarray:
    """The labels of a one-band GDAL raster at ``[rows, cols]`` (:func:`read_band_window`); stored as floats (QGIS's
    Rasterize writes Float32 by default), as ``int32`` (:func:`_whole`), its nodata pixels as :data:`NAN_LABEL` where
    int32 cannot hold its nodata (NaN, ArcGIS's -3.4028235e38)."""
    data = read_band_window(path, rows, cols)
    if data.dtype.kind != "f":
        return data
    with gdal_env(path):
        nodata = cached_handle(("label-raster", path), lambda: rasterio.open(path), file_stamp(path)).nodata
    if _nodata_past_int32(nodata):
        hidden = np.isnan(data) if math.isnan(nodata) else data == data.dtype.type(nodata)
        data = np.where(hidden, data.dtype.type(NAN_LABEL), data)  # float32 holds -2**31 exactly
    return _whole(path, (rows, cols), data)


def unscaled(proxy, keep_file_open: bool = False) -> ArrayProxy:
    """A NIfTI data proxy of the stored values: its file, offset, shape and dtype, without its ``scl_slope`` /
    ``scl_inter`` (nibabel's own proxy gives scaled integers as floats)."""
    return ArrayProxy(proxy.file_like, (proxy.shape, proxy.dtype, proxy.offset), keep_file_open=keep_file_open)


@dataclass(frozen=True)
class _NiftiVolume:
    """Array-like view of a NIfTI volume's data (memory-mapped, or indexed_gzip for .nii.gz); the first voxel of
    trailing axes of length 1 (``extra_axes``); ``labels`` stored as floats given as ``int32`` (:func:`_whole`);
    ``stored``: the values as stored, without the header's ``scl_slope`` / ``scl_inter`` (uint8 probabilities, 1/255,
    given as ``round(p * 255)``: nibabel's proxy gave them as float 0-1, not the dtype the array was made with)."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    ndim: int = 3
    extra_axes: int = 0
    labels: bool = False
    stored: bool = False

    def _data(self):
        """The file's data proxy: nibabel's, or one of the stored values (:func:`unscaled`)."""
        data = nib.load(self.path, keep_file_open=True, mmap=True).dataobj
        return unscaled(data, keep_file_open=True) if self.stored else data

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        def block() -> np.ndarray:
            data = cached_handle(("label-nifti", self.path, self.stored), self._data, file_stamp(self.path))
            return np.asarray(data[index + (0,) * self.extra_axes])

        data = read_region(self.path, _region(index), block, read_failure)  # nibabel, gzip and zlib: many types
        return _whole(self.path, index, data) if self.labels and data.dtype.kind == "f" else data


def _whole(path: str, index: tuple[slice, ...], data: np.ndarray) -> np.ndarray:
    """Labels a NIfTI or a raster stores as floats (MONAI's ``SaveImage`` writes float32 by default, QGIS's
    Rasterize too) as ``int32``; a value that is no whole number (or NaN, or past int32) is an :class:`InputError`
    naming it and where."""
    with np.errstate(invalid="ignore"):
        wrong = (data != np.rint(data)) | ~((data >= -(2.0**31)) & (data < 2.0**31))  # 2**31 - 1 is 2**31 in float32
    if wrong.any():
        first = tuple(np.argwhere(wrong)[0])
        at = [int(i) + (s.start or 0) for i, s in zip(first, index)]
        where = f"row {at[0]}, col {at[1]}" if len(at) == 2 else f"voxel {at}"  # a raster's pixel, a volume's
        value = float(data[first])
        within = " within int32 (-2147483648 to 2147483647)" if value == np.rint(value) else ""  # 3e9 is whole
        raise InputError(f"{path}: labels stored as {data.dtype} must be whole numbers{within}; {where} holds "
                         f"{value:g}")  # fmt: skip
    return data.astype(np.int32)


@dataclass(frozen=True)
class _ZarrLabels:
    """Array-like view of a Zarr label array (for ``da.from_array``): a chunk that does not decompress or decode
    as a :class:`ReadError` naming the store and the window (zarr's own text named neither)."""

    path: str
    array: zarr.Array
    skip: int = 0  # leading axes of one point (an OME-Zarr time axis), read at that point

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)[self.skip :]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return self.array.ndim - self.skip

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return read_region(self.path, _region(index), lambda: np.asarray(self.array[(0,) * self.skip + index]))


def _region(index: tuple[slice, ...]) -> Region:
    """The region dask asks a view for, as :func:`tilemask.sources.read_region` names it."""
    return tuple((s.start, s.stop) for s in index)


def _from_zarr(path: str, array: zarr.Array, chunks, skip: int = 0) -> da.Array:
    view = _ZarrLabels(path, array, skip)
    return da.from_array(view, chunks=_chunks(chunks, tuple(array.chunks)[skip:]), asarray=False, fancy=False,
                         meta=np.empty((0,) * view.ndim, view.dtype))  # fmt: skip


def open_labels(path: str, chunks: int | tuple[int, ...] | None = None) -> LabelImage:
    """The labels at ``path`` as a lazy array; ``chunks`` defaults to the file's own blocks."""
    from ..formats import for_path

    beside = labels_beside(path)
    if beside is not None:
        raise InputError(f"{path}: the probabilities beside the labels {beside}, not labels: give the labels (in "
                         f"Python open_result({beside!r}, 'probabilities') opens these)")  # fmt: skip
    fmt = for_path(path)
    try:
        fmt.require_complete(path)
        return fmt.open_labels(path, chunks)
    except (OSError, RasterioError, ValueError, KeyError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot open as a label image: {exc}") from None


PROBABILITIES_SUFFIXES = (".tif", ".tiff", ".nii.gz", ".nii")
"""The suffixes of probabilities written beside their labels (a COG's, a NIfTI's)."""


def labels_beside(path: str) -> str | None:
    """The labels tilemask wrote beside ``path`` where it is their probabilities file (a COG's, a NIfTI's), else
    None. Such a file given as labels is refused before it is opened: a run's ``outputs`` list it, and reading it
    said only that a label image has one band (or three axes); a one-class (sigmoid) NIfTI's, 4D with a last axis
    of one, was read as labels (uint8: labels 0-255, in ``open_result``, ``stats`` and ``evaluate`` alike). Only
    beside labels tilemask wrote: a label image of the user's may be named so."""
    from ..formats import for_path
    from ..storage import exists

    name = str(path)
    for suffix in PROBABILITIES_SUFFIXES:
        if name.lower().endswith(f"_probabilities{suffix}"):
            labels = name[: -len(f"_probabilities{suffix}")] + name[-len(suffix) :]
            fmt = for_path(labels)
            with contextlib.suppress(OSError):  # one that cannot be asked is opened as it is given
                if fmt.probabilities_path(labels) == name and exists(labels) and fmt.written_by_tilemask(labels):
                    return labels
    return None


def check_chunks(chunks) -> None:
    """``chunks`` a positive integer, one per axis, or None, checked before a file is opened (the commands' own
    ``--chunks`` is one already; Python's may be anything: 2.5 was blamed on the file, 0 a ZeroDivisionError)."""
    def whole(n) -> bool:
        return not isinstance(n, bool) and isinstance(n, numbers.Integral) and n >= 1

    if chunks is not None and not whole(chunks) and not (isinstance(chunks, (tuple, list)) and chunks
                                                         and all(map(whole, chunks))):  # fmt: skip
        raise InputError(f"{option('chunks')} must be a positive integer or one per axis, got {chunks!r}")


SMALL_BLOCK = 256  # a block edge under which Dask's tasks cost more than the block's pixels
MOST_SMALL_BLOCKS = 20_000


def check_block_count(image: LabelImage, chunks) -> None:
    """Refuse ``chunks`` (given, not the file's own) that cut ``image`` into more than :data:`MOST_SMALL_BLOCKS`
    blocks under :data:`SMALL_BLOCK` along an axis, as ``tilemask run`` refuses such ``output.chunks``: each is
    Dask tasks of its own (a review's ``--chunks 1`` on the demo's 0.57-megapixel mask held 2 GB and was still
    running after 100 s)."""
    array = image.array
    blocks = math.prod(array.numblocks)
    if chunks is None or blocks <= MOST_SMALL_BLOCKS:
        return
    if any(edge < min(SMALL_BLOCK, size) for edge, size in zip(array.chunksize, array.shape)):
        raise InputError(f"{option('chunks')} {chunks} cuts {image.path} into {blocks:,} blocks, more than "
                         f"{MOST_SMALL_BLOCKS:,}, each Dask tasks of its own; give {SMALL_BLOCK} or more, or leave "
                         "it out (the file's own blocks)")  # fmt: skip


def open_nifti_probabilities(path: str, chunks) -> tuple[da.Array, VolumeGeometry]:
    """The probabilities tilemask writes beside NIfTI labels (4D, classes last) as a lazy ``(class, i, j, k)``
    array, each block all classes, as stored (uint8 ones ``round(p * 255)``, not scaled by their ``scl_slope``
    1/255), and their grid."""
    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 4:
        raise InputError(f"{path}: probabilities are a 4D volume (i, j, k, class), this one has shape {shape}")
    check_length(path, img, shape)
    dtype = np.dtype(img.get_data_dtype())
    spatial = _chunks(chunks, tuple(min(s, 128) for s in shape[:3]))
    lazy = da.from_array(_NiftiVolume(path, shape, dtype, ndim=4, stored=True), chunks=(*spatial, shape[3]),
                         asarray=False, fancy=False, meta=np.empty((0,) * 4, dtype))  # fmt: skip
    return da.moveaxis(lazy, 3, 0), nifti_geometry(path, img)


def _chunks(chunks, native: tuple[int, ...]) -> tuple[int, ...]:
    return native if chunks is None else tuple(normalize_per_axis(chunks, len(native), "chunks"))


def open_zarr_labels(path: str, chunks) -> LabelImage:
    node = open_zarr(path)
    attrs = dict(node.attrs)
    array = node["labels"] if isinstance(node, zarr.Group) else node
    meta = attrs.get("tilemask", {})
    geometry = usable_geometry(path, geometry_from_attrs(attrs, array.ndim), TILEMASK_ATTRS)
    lazy = _from_zarr(path, array, chunks)
    classes = tuple(meta["classes"]) if meta.get("classes") else None
    return LabelImage(path, lazy, geometry, classes, meta.get("nodata"))


def open_zarr_array_labels(path: str, chunks) -> LabelImage:
    """A label array inside a Zarr store, on the grid an input array gets (:meth:`ZarrSource.open`: its OME-Zarr
    level's scale); a tilemask output's labels or their coarser levels as :func:`_output_labels` opens them."""
    from .zarr import ZarrSource

    of_output = _output_labels(path, chunks)
    if of_output is not None:
        return of_output
    array = open_zarr(path, "array")
    multiscale = ome_level_multiscale(path)
    skip = 0 if multiscale is None else leading_time_point(path, multiscale, array.shape)
    if array.ndim - skip not in (2, 3):
        raise InputError(f"{path}: a label image has 2 or 3 axes, this Zarr array has {array.ndim}")
    if not np.issubdtype(np.dtype(array.dtype), np.integer):
        raise InputError(f"{path}: labels must be integers, the array holds {np.dtype(array.dtype)}")
    geometry = ZarrSource.open(path, array.ndim - skip).geometry
    return LabelImage(path, _from_zarr(path, array, chunks, skip), geometry, None, None)


def _output_labels(path: str, chunks) -> LabelImage | None:
    """The labels of the tilemask output whose store holds ``path``, where ``path`` is its labels (the output,
    opened whole) or a coarser level of them (the output's classes and nodata on that level's grid); None where no
    tilemask output holds ``path``. Another of an output's arrays (its probabilities: uint8 ones read as 3D labels on
    1 mm voxels) is refused."""
    from ..formats import for_path, zarr_store_of

    store, key = zarr_store_of(path)
    output = for_path(store)
    if not output.written_by_tilemask(store):
        return None
    root = open_zarr(store, "group")
    labels_key = output.labels_key(root)
    if key == labels_key:
        output.require_complete(store)
        return output.open_labels(store, chunks)
    image, _, name = key.rpartition("/")
    multiscale = (ome_multiscales(dict(root[image].attrs)) or [{}])[0] if image == labels_key.rpartition("/")[0] else {}
    levels = [d.get("path") for d in multiscale.get("datasets", [])]
    if name not in levels[1:]:
        raise InputError(f"{path}: not the labels of the tilemask output {store} (they are {store}/{labels_key}); "
                         f"give {store}")  # fmt: skip
    output.require_complete(store)
    output.require_complete(store, key)  # the level read: its chunks too
    whole = output.open_labels(store, None)
    geometry = level_geometry(whole.geometry, multiscale, levels.index(name))
    return LabelImage(path, _from_zarr(path, open_zarr(path, "array"), chunks), geometry, whole.class_names,
                      whole.nodata)  # fmt: skip


def omezarr_labels_key(root, path: str | None = None) -> str:
    """The first level of an OME-Zarr's first label image (tilemask records it: ``labels/labels/0``); ``path``, the
    OME-Zarr as the user named it, names it in the refusal (else its store's folder)."""
    meta = dict(root.attrs).get("tilemask", {})
    if meta.get("labels"):
        return meta["labels"]
    try:
        container = dict(root["labels"].attrs)
        names = container.get("ome", container).get("labels", [])
        multiscales = ome_multiscales(dict(root[f"labels/{names[0]}"].attrs))
        return f"labels/{names[0]}/{multiscales[0]['datasets'][0]['path']}"
    except (KeyError, IndexError, TypeError):
        # not zarr's store as it prints itself: file:///..., or <FsspecStore(HTTPFileSystem, http://...)> (seen)
        where = path if path is not None else getattr(root.store, "root", root.store)
        raise InputError(f"{where}: an OME-Zarr without a label image (no labels/ with multiscales)") from None


def open_omezarr_labels(path: str, chunks) -> LabelImage:
    """The first level of an OME-Zarr's first label image, with its geometry and class names."""
    root = open_zarr(path, "group")
    attrs = dict(root.attrs)
    meta = attrs.get("tilemask", {})
    labels_path = omezarr_labels_key(root, path)
    array = root[labels_path]
    if meta:
        skip, geometry = 0, usable_geometry(path, geometry_from_attrs(attrs, array.ndim), TILEMASK_ATTRS)
    else:
        skip, geometry = _ome_geometry(path, root[labels_path.rsplit("/", 1)[0]], array.shape)
    lazy = _from_zarr(path, array, chunks, skip)
    classes = tuple(meta["classes"]) if meta.get("classes") else None
    return LabelImage(path, lazy, geometry, classes, meta.get("nodata"))


def _ome_geometry(path: str, group, shape: tuple[int, ...]) -> tuple[int, Geometry]:
    """The leading axes to skip (:func:`leading_time_point`) of the label image ``group``'s first level, of
    ``shape``, and its grid."""
    from ..geometry import ome_geometry

    multiscales = ome_multiscales(dict(group.attrs))
    named = f"{path.rstrip('/')}/{group.path}"
    if multiscales is None:
        raise InputError(f"{named}: an OME-Zarr label image without multiscales")
    skip = leading_time_point(named, multiscales[0], shape)
    return skip, usable_geometry(path, ome_geometry(multiscales[0], len(shape) - skip), OME_SCALES)


def leading_time_point(path: str, multiscale: dict, shape: tuple[int, ...]) -> int:
    """The leading axes of the labels of ``shape`` to read at their one point: 1 for a time axis of one point
    (bioformats2raw writes every image t, c, z, y, x; NGFF puts time first), else 0. Labels with other axes than
    space ones (a channel, several time points) are refused: the message was an input's, "OME-Zarr with 2 space
    axes for a 3D model", naming no file."""
    kinds = [a["type"] for a in ome_axes(multiscale)]
    skip = int(kinds[:1] == ["time"] and len(shape) == len(kinds) and int(shape[0]) == 1)
    if any(kind != "space" for kind in kinds[skip:]):
        names = ", ".join(str(a.get("name")) for a in ome_axes(multiscale))
        if len(shape) != len(kinds):  # not a time axis of several points: an array of other axes than named
            why = f" (its array has {len(shape)} axes)"
        else:
            why = " (several time points: give one's)" if kinds[:1] == ["time"] and not skip else ""
        raise InputError(f"{path}: a label image has space axes only, or a time axis of one point before them; "
                         f"this OME-Zarr's are {names}{why}")  # fmt: skip
    return skip


def open_raster_probabilities(path: str, chunks) -> tuple[da.Array, RasterGeometry, list[str]]:
    """The probabilities tilemask writes beside COG labels as a lazy ``(class, y, x)`` array, each block all
    classes, with their grid and class names.  Read as the labels are (:func:`read_band_window`): rioxarray read
    them with none of tilemask's GDAL settings, so not from the S3 endpoint the AWS variables name."""
    try:
        with gdal_env(path), rasterio.open(path) as ds:
            shape, dtype = (ds.count, ds.height, ds.width), np.dtype(ds.dtypes[0])
            geometry = RasterGeometry(ds.crs.to_wkt() if ds.crs else None, tuple(ds.transform.to_gdal()))
            tag = ds.tags().get(CLASSES_TAG)
    except RasterioError as exc:  # one line, as the labels' (open_labels)
        raise InputError(f"{path}: cannot open as probabilities: {first_gdal_line(exc)}") from None
    lazy = da.from_array(_RasterBands(path, shape, dtype), chunks=(shape[0], *_chunks(chunks, (1024, 1024))),
                         asarray=False, fancy=False, meta=np.empty((0, 0, 0), dtype))  # fmt: skip
    return lazy, geometry, json.loads(tag) if tag else []


def open_raster_labels(path: str, chunks) -> LabelImage:
    with gdal_env(path), rasterio.open(path) as ds:
        bands = ds.count
        if bands != 1:  # a Zarr group GDAL opens has none: ds.dtypes[0] was an IndexError
            raise InputError(f"{path}: a label image has one band, this raster has {bands}")
        shape = (ds.height, ds.width)
        dtype = np.dtype(ds.dtypes[0])
        block = ds.block_shapes[0]
        crs = ds.crs.to_wkt() if ds.crs else None
        if off_grid := not_on_a_grid(path, ds):  # as an input is (README): areas in pixels
            raise InputError(off_grid)
        geometry = usable_geometry(path, RasterGeometry(crs, tuple(ds.transform.to_gdal())))
        nodata = ds.nodata
        tag = ds.tags().get(CLASSES_TAG)
        scale, offset = ds.scales[0], ds.offsets[0]
    if dtype.kind not in "iuf":  # a complex band
        raise InputError(f"{path}: labels must be integers, the raster holds {dtype}")
    if (scale, offset) != (1, 0):  # counted on stored values, they were not the labels GDAL's users read; as NIfTI
        raise InputError(f"{path}: labels must be stored as unscaled integers (band scale {scale:g}, offset "
                         f"{offset:g})")
    if dtype.kind == "f":  # whole numbers, read as int32 as a NIfTI's are (read_label_window)
        if _nodata_past_int32(nodata):  # NaN, ArcGIS's -3.4028235e38: its pixels are read as NAN_LABEL
            nodata = NAN_LABEL
        dtype = np.dtype(np.int32)
    nodata = None if nodata is None else int(nodata)
    native = tuple(max(b, 1024 // b * b) for b in block)  # whole GDAL blocks, about 1024 px
    lazy = da.from_array(_RasterBand(path, shape, dtype), chunks=_chunks(chunks, native), asarray=False, fancy=False,
                         meta=np.empty((0, 0), dtype))  # fmt: skip (given, dask does not read an empty window for it)
    return LabelImage(path, lazy, geometry, tuple(json.loads(tag)) if tag else None, nodata)


def open_nifti_labels(path: str, chunks) -> LabelImage:
    img = nib.load(path)
    if len(img.shape) < 3 or any(s != 1 for s in img.shape[3:]):  # (x, y, z, 1): MONAI's labels, channel last
        raise InputError(f"{path}: a label volume must be 3D, this one has shape {img.shape}")
    stored = np.dtype(img.get_data_dtype())
    if stored.kind not in "iuf" or img.dataobj.slope not in (1, None) or img.dataobj.inter not in (0, None):
        raise InputError(f"{path}: labels must be stored as unscaled integers, or floats holding whole numbers "
                         f"(dtype {stored})")  # fmt: skip
    check_length(path, img, tuple(int(s) for s in img.shape))
    shape = tuple(int(s) for s in img.shape[:3])
    dtype = np.dtype(np.int32) if stored.kind == "f" else stored
    from ..formats import for_path, nifti_nodata

    geometry = nifti_geometry(path, img)
    lazy = da.from_array(
        _NiftiVolume(path, shape, dtype, extra_axes=len(img.shape) - 3, labels=True),
        chunks=_chunks(chunks, tuple(min(s, 128) for s in shape)), asarray=False, fancy=False,
        meta=np.empty((0, 0, 0), dtype),
    )  # fmt: skip
    names = read_colour_table(for_path(path).class_table_path(path))
    return LabelImage(path, lazy, geometry, names, nifti_nodata(img.header["descrip"]))
