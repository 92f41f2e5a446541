"""tilemask outputs as xarray: lazy, dask-backed, with the CRS attached (rioxarray).

COG and Zarr outputs open alike: labels as a ``(y, x)`` DataArray named
``labels``, probabilities as ``(class, y, x)`` named ``probabilities``, with
pixel-centre ``x``/``y`` coordinates (2D ``xc``/``yc`` on a rotated grid, as ``rioxarray.open_rasterio`` gives),
``spatial_ref`` holding the CRS and transform, the nodata value as ``_FillValue``
(integers are not masked) and the class names in ``attrs["class_names"]``.
Volumes (NIfTI, Zarr, OME-Zarr) open as ``(i, j, k)`` with the voxel-to-RAS affine in ``attrs``, and their
labels' nodata value as ``_FillValue`` there too; the class names of a NIfTI whose colour table names values other
than 0 to n - 1 are a dict of value to name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine
from rioxarray.rioxarray import affine_to_coords

from .classes import ClassNames, class_count, read_colour_table
from .errors import InputError, UsageError, first_line
from .formats import for_path
from .geometry import RasterGeometry, normalize_per_axis
from .sources.labels import check_chunks, open_labels, open_nifti_probabilities, open_raster_probabilities
from .sources.zarr import open_zarr
from .storage import exists, network_object

logger = logging.getLogger(__name__)


def open_result(path: str, variable: str = "labels", chunks: int | tuple[int, ...] | None = None) -> xr.DataArray:
    """A tilemask output (COG ``.tif``, ``.zarr``, ``.ome.zarr``, NIfTI labels) as a lazy DataArray with its CRS
    (a volume: its affine).

    ``variable`` is ``"labels"`` or ``"probabilities"`` (for a COG or NIfTI labels, the
    ``<stem>_probabilities.tif`` or ``.nii.gz`` beside ``path``; a volume's as ``(class, i, j, k)``; as stored:
    uint8 ones are ``round(p * 255)``, with ``scale_factor`` 1/255 in their attrs for ``xr.decode_cf``; their
    ``class_names`` name the channels, a sigmoid's one its foreground); ``chunks`` is the dask block edge
    (default: the file's own blocks, about 1024 pixels).
    """
    check_chunks(chunks)
    path = os.fspath(path) if isinstance(path, os.PathLike) else path  # a pathlib.Path, as rasterio.open takes
    if variable == "labels":
        return _labels(path, chunks)
    if variable == "probabilities":
        return _probabilities(path, chunks)
    raise UsageError(f"variable must be 'labels' or 'probabilities', not {variable!r}")


def _labels(path: str, chunks) -> xr.DataArray:
    image = open_labels(path, chunks)
    if not isinstance(image.geometry, RasterGeometry):
        attrs = {"affine": [list(r) for r in image.geometry.affine], "class_names": _names_attr(image.class_names)}
        nodata = {} if image.nodata is None else {"_FillValue": image.nodata}  # as rio.write_nodata marks a raster's
        return xr.DataArray(image.array, dims=("i", "j", "k"), name="labels", attrs={**attrs, **nodata})
    array = _georeferenced(image.array, ("y", "x"), image.geometry, "labels")
    array.attrs["class_names"] = list(image.class_names or ())
    if image.nodata is not None:
        array = array.rio.write_nodata(image.nodata, encoded=False)
    return array


def _probabilities(path: str, chunks) -> xr.DataArray:
    fmt = for_path(path)
    if fmt.zarr_store:  # probabilities inside the output
        group = open_zarr(path, "group")
        fmt.require_complete(path)
        key = fmt.probabilities_key(group)
        if key is None:
            raise InputError(f"{path}: this output holds no probabilities")
        stored = group[key]
        spatial = stored.ndim - 1
        per_axis = stored.chunks[1:] if chunks is None else _per_axis(chunks, spatial)
        lazy = da.from_zarr(stored, chunks=(stored.chunks[0] if chunks is None else stored.shape[0], *per_axis))
        attrs = dict(group.attrs)
        names = attrs.get("tilemask", {}).get("classes") or []
        if "affine" in attrs:  # a volume: voxel axes and the nibabel affine, no CRS
            return xr.DataArray(
                lazy, dims=("class", "i", "j", "k"), name="probabilities",
                attrs={"affine": attrs["affine"], **_probability_attrs(lazy, list(names))},
            )  # fmt: skip
        geometry = RasterGeometry(attrs.get("crs"), tuple(attrs["transform"]))
    elif fmt.name == "cog":  # probabilities beside the labels
        lazy, geometry, names = open_raster_probabilities(_beside(path, fmt), None if chunks is None else
                                                          _per_axis(chunks, 2))  # fmt: skip
    elif fmt.name == "nifti":  # probabilities beside the labels, 4D with classes last
        if network_object(path):  # (nibabel reads a local file; outputs on object storage are COG or Zarr)
            raise InputError(f"{path}: a NIfTI's probabilities are read from a local file; copy them here")
        lazy, volume = open_nifti_probabilities(_beside(path, fmt), chunks)
        names = _names_attr(read_colour_table(fmt.class_table_path(path)))
        attrs = {"affine": [list(r) for r in volume.affine], **_probability_attrs(lazy, names)}
        return xr.DataArray(lazy, dims=("class", "i", "j", "k"), name="probabilities", attrs=attrs)
    else:
        raise InputError(f"{path}: probabilities are read from .tif, .zarr or NIfTI outputs")
    array = _georeferenced(lazy, ("class", "y", "x"), geometry, "probabilities")
    array.attrs.update(_probability_attrs(lazy, list(names)))
    return array


def _probability_attrs(lazy: da.Array, names: list[str] | dict[int, str]) -> dict:
    """The class names of the probability channels (a sigmoid's one channel: the foreground's), and for uint8
    probabilities, ``round(p * 255)``, their CF ``scale_factor`` and ``add_offset``, as rioxarray gives a COG's
    band scale: ``xr.decode_cf`` reads them as 0-1."""
    if lazy.shape[0] == 1 and class_count(names) == 2:
        names = [names[1]] if isinstance(names, list) else {1: names[1]}
    scale = {"scale_factor": 1 / 255, "add_offset": 0.0} if lazy.dtype == np.uint8 else {}
    return {"class_names": names, **scale}


def _per_axis(chunks: int | tuple[int, ...], spatial: int) -> tuple[int, ...]:
    try:
        return normalize_per_axis(chunks, spatial, "chunks")
    except ValueError as exc:  # one per axis of another number of axes
        raise UsageError(str(exc)) from None


def _names_attr(names: ClassNames | None) -> list[str] | dict[int, str]:
    """Class names for ``attrs``: a list (of values 0, 1, ...), or a dict of the values a sparse colour table names."""
    return dict(names) if isinstance(names, Mapping) else list(names or ())


def _beside(path: str, fmt) -> str:
    """The probabilities file of the labels at ``path`` (``path`` itself when it is one; on disk or object
    storage), refused in one line when it is not there."""
    beside = path if fmt.stem(path).endswith("_probabilities") else fmt.probabilities_path(path)
    try:
        if exists(beside):
            return beside
        labels_there = exists(path)  # asked only to say which is missing
    except Exception as exc:  # noqa: BLE001 - the store refused the key, or is not reached: many types
        raise InputError(f"{path}: cannot reach it: {type(exc).__name__}: {first_line(exc)}") from None
    name = beside.rstrip("/").rsplit("/", 1)[-1]
    missing = f"has no probabilities beside it ({name} is missing)" if labels_there else "does not exist"
    raise InputError(f"{path}: {missing}")


def _georeferenced(lazy: da.Array, dims: tuple[str, ...], geometry: RasterGeometry, name: str) -> xr.DataArray:
    """Wrap ``lazy`` with pixel-centre coordinates and ``spatial_ref`` (CRS and transform)."""
    transform = Affine.from_gdal(*geometry.transform)
    height, width = lazy.shape[-2:]
    coords = affine_to_coords(transform, width, height)  # the coordinates rioxarray.open_rasterio gives
    if np.ndim(coords["x"]) == 2:  # rotated grid: 2D coordinates, named xc/yc as rioxarray names them
        coords = {f"{k}c": (("y", "x"), v) for k, v in coords.items()}
    array = xr.DataArray(lazy, dims=dims, coords=coords, name=name)
    if geometry.crs_wkt:
        array = array.rio.write_crs(geometry.crs_wkt)
    return array.rio.write_transform(transform)
