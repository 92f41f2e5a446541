"""Zarr arrays (v2 or v3) read by region.

An array of ``spatial_dims`` axes is one channel; one with an extra leading axis
is channel-first.  Geometry comes from tilemask's own attributes when present
(``crs`` + ``transform`` for rasters, ``affine`` for volumes), else identity.
A group is read as an OME-Zarr image when it holds OME-Zarr multiscales,
whatever its name says (NGFF 0.4 stores are often plain ``.zarr``); an array
inside a group is given by its path (``scan.zarr/0``), and read here unless it
is a georeferenced raster GDAL wrote (:func:`read_by_gdal`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import zarr

from ..errors import InputError
from ..geometry import Geometry, Region, geometry_from_attrs, ome_axes
from ..storage import network_object, zarr_options
from . import ImageSource, cached_handle, file_stamp, read_region, usable_geometry

logger = logging.getLogger(__name__)

_OPENERS = {"node": zarr.open, "array": zarr.open_array, "group": zarr.open_group}


def open_zarr(path: str, kind: str = "node"):
    """The Zarr ``kind`` (``node``, ``array`` or ``group``) at ``path``, opened to read: on object storage through
    the endpoint the environment names and on a web server, with GDAL's timeouts
    (:func:`tilemask.storage.zarr_options`).  An array inside a store on S3 was opened without them."""
    return _OPENERS[kind](path, mode="r", **zarr_options(path))


def _why_not_opened(path: str, exc: Exception) -> str:
    """zarr's reason for not opening ``path``; for one on object storage or a web server where nothing is, what is
    missing (zarr said "No group found in store StorePath(FsspecStore, '<FsspecStore(S3FileSystem, ...)>')")."""
    if isinstance(exc, FileNotFoundError) and network_object(path):
        return "nothing there (no zarr.json, .zgroup or .zarray under it)"
    return str(exc)


def read_by_gdal(path: str, spatial_dims: int) -> bool:
    """Whether the array at ``path``, inside a Zarr store, is left to GDAL: a 2D raster GDAL georeferenced (its
    ``_CRS``, which GDAL's Zarr driver reads and zarr-python does not), or no array zarr-python opens.  Volumes
    are read here: GDAL would make bands of their third axis."""
    try:
        attrs = dict(open_zarr(path, "array").attrs)
    except Exception:  # noqa: BLE001 - not an array zarr-python opens: GDAL names the problem
        return True
    return spatial_dims == 2 and "_CRS" in attrs


def ome_multiscales(attrs: dict) -> list | None:
    """An OME-Zarr group's multiscales (NGFF 0.5 under ``ome``, 0.4 at the top), else None."""
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    return multiscales if isinstance(multiscales, list) and multiscales else None


def ome_space_unit(path: str) -> str | None:
    """The unit an OME-Zarr image's space axes share (an output is written in it, for viewers such as napari
    that place layers by their numbers), else None: not an OME-Zarr, no unit, or units that differ.  An array
    inside a store that is a level of its group's multiscale (``scan.ome.zarr/0``) has its group's unit."""
    from ..formats import for_path, inside_zarr_store

    if not (for_path(path).zarr_store or inside_zarr_store(path)):
        return None
    try:
        multiscales = ome_multiscales(dict(open_zarr(path, "group").attrs))
    except Exception:  # noqa: BLE001 - not a Zarr group: an array, or no Zarr at all
        level = ome_level_multiscale(path)
        multiscales = [level] if level else None
    units = {a.get("unit") for a in ome_axes((multiscales or [{}])[0]) if a["type"] == "space"}
    return units.pop() if len(units) == 1 else None


def _has_geometry(attrs: dict) -> bool:
    return "affine" in attrs or "transform" in attrs


def _parent_attrs(path: str) -> dict:
    """The attributes of the Zarr group holding the array at ``path`` ({} where none does)."""
    parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""
    try:
        return dict(open_zarr(parent, "group").attrs) if parent else {}
    except Exception:  # noqa: BLE001 - not inside a Zarr group
        return {}


def _ome_level(path: str, parent: dict) -> int | None:
    """Which level of its parent group's OME-Zarr multiscale (``parent``: the group's attributes) the array at
    ``path`` is (``scan.ome.zarr/0``: 0), else None: its grid is that level's scale."""
    datasets = (ome_multiscales(parent) or [{}])[0].get("datasets")
    paths = [d.get("path") if isinstance(d, dict) else None for d in datasets] if isinstance(datasets, list) else []
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return paths.index(name) if name in paths else None


def ome_level_multiscale(path: str) -> dict | None:
    """The OME-Zarr multiscale of the group holding the array at ``path``, where the array is one of its levels."""
    parent = _parent_attrs(path)
    return ome_multiscales(parent)[0] if _ome_level(path, parent) is not None else None


def ome_label_names(path: str) -> list[str] | None:
    """The label images an OME-Zarr ``labels`` group at ``path`` lists, else None (not such a group)."""
    try:
        attrs = dict(open_zarr(path, "group").attrs)
    except Exception:  # noqa: BLE001 - not a Zarr group
        return None
    names = attrs.get("ome", attrs).get("labels")
    return [str(n) for n in names] if isinstance(names, list) else None


def ome_first_level(path: str) -> str | None:
    """The path of the first level of the OME-Zarr multiscale group at ``path`` (a label image inside a store:
    ``seg.ome.zarr/labels/labels``), else None."""
    try:
        multiscales = ome_multiscales(dict(open_zarr(path, "group").attrs))
        return f"{path.rstrip('/')}/{multiscales[0]['datasets'][0]['path']}" if multiscales else None
    except Exception:  # noqa: BLE001 - not a Zarr group, or a multiscale without datasets
        return None


def _spatial_shape(path: str, node: zarr.Array, spatial_dims: int, skip: int = 0) -> tuple[int, ...]:
    """The shape of the array ``node`` at ``path`` past its first ``skip`` axes (a time axis of one point):
    ``spatial_dims`` axes, or one more (channels first)."""
    shape = tuple(int(s) for s in node.shape)[skip:]
    if len(shape) not in (spatial_dims, spatial_dims + 1):
        raise InputError(f"{path}: Zarr array with {len(shape)} axes for a {spatial_dims}D model")
    return shape


TILEMASK_ATTRS = "tilemask's attributes ('affine' for a volume, 'transform' for a raster)"
OME_SCALES = "the multiscale's scale transformations"


@dataclass(frozen=True)
class ZarrSource(ImageSource):
    path: str
    array_shape: tuple[int, ...]
    channel_first: bool
    zarr_geometry: Geometry
    floating: bool = False
    timed: bool = False  # a leading time axis of one point (bioformats2raw's t, c, z, y, x), read at that point

    @classmethod
    def open(cls, path: str, spatial_dims: int) -> ZarrSource:
        try:
            node = open_zarr(path)
        except Exception as exc:
            raise InputError(f"{path}: cannot open Zarr: {_why_not_opened(path, exc)}") from None
        if isinstance(node, zarr.Group):
            if ome_multiscales(dict(node.attrs)) is not None:
                return cls.open_ome(path, spatial_dims)
            arrays = sorted(name for name, _ in node.arrays())
            example = f" (it holds {', '.join(arrays[:5])})" if arrays else " (it holds no array)"
            raise InputError(f"{path}: a Zarr group without OME-Zarr multiscales; give the path of the image array "
                             f"inside it, {path.rstrip('/')}/NAME{example}")  # fmt: skip
        from ..formats import inside_zarr_store

        attrs = dict(node.attrs)
        if not _has_geometry(attrs) and inside_zarr_store(path):  # an array of a group whose attributes place it
            parent = _parent_attrs(path)
            level = _ome_level(path, parent)
            if level is not None:
                return cls.open_ome(path.rstrip("/").rsplit("/", 1)[0], spatial_dims, level)
            if "tilemask" in parent and _has_geometry(parent):  # an array of a tilemask output's .zarr group
                attrs = parent
        shape = _spatial_shape(path, node, spatial_dims)
        geometry = usable_geometry(path, geometry_from_attrs(attrs, spatial_dims), TILEMASK_ATTRS)
        return cls(path, shape, len(shape) == spatial_dims + 1, geometry, np.dtype(node.dtype).kind == "f")

    @classmethod
    def open_ome(cls, path: str, spatial_dims: int, level: int = 0) -> ZarrSource:
        """An OME-Zarr image: a level of its first multiscale (the first: full resolution), with that level's scale
        as its grid."""
        from ..geometry import level_geometry, ome_geometry

        try:
            attrs = dict(open_zarr(path, "group").attrs)
        except Exception as exc:
            raise InputError(f"{path}: not an OME-Zarr image: {_why_not_opened(path, exc)}") from None
        multiscales = ome_multiscales(attrs)
        if multiscales is None:
            raise InputError(f"{path}: not an OME-Zarr image: its group has no multiscales")
        multiscale = multiscales[0]
        kinds = [a["type"] for a in ome_axes(multiscale)]
        if "time" in kinds[1:] or kinds.count("channel") > 1:
            raise InputError(f"{path}: OME-Zarr axes {kinds}: tilemask reads channel and space axes only")
        try:
            dataset = multiscale["datasets"][level]["path"]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{path}: an OME-Zarr multiscale without datasets") from None
        array = f"{path.rstrip('/')}/{dataset}"
        try:
            node = open_zarr(array, "array")
        except Exception as exc:
            raise InputError(f"{array}: cannot open Zarr: {_why_not_opened(array, exc)}") from None
        timed = kinds[:1] == ["time"]  # NGFF puts time first; one point is read as the image it is
        if timed and int(node.shape[0]) != 1:
            raise InputError(f"{path}: OME-Zarr of {node.shape[0]} time points (axes {kinds}); tilemask reads one "
                             "image: give one time point's (a time axis of length 1)")  # fmt: skip
        shape = _spatial_shape(array, node, spatial_dims, int(timed))
        if "tilemask" in attrs:  # a tilemask output's grid keeps the CRS and flips NGFF has no place for
            recorded = geometry_from_attrs(attrs, spatial_dims)
            geometry = usable_geometry(path, level_geometry(recorded, multiscale, level) if level else recorded,
                                       TILEMASK_ATTRS)  # fmt: skip
        else:
            geometry = usable_geometry(path, ome_geometry(multiscale, spatial_dims, level), OME_SCALES)
        return cls(array, shape, len(shape) == spatial_dims + 1, geometry, np.dtype(node.dtype).kind == "f", timed)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array_shape if self.channel_first else (1, *self.array_shape)

    @property
    def geometry(self) -> Geometry:
        return self.zarr_geometry

    def read(self, region: Region) -> np.ndarray:
        index = tuple(slice(lo, hi) for lo, hi in region)

        def block() -> np.ndarray:
            opener = lambda: open_zarr(self.path, "array")  # noqa: E731
            array = cached_handle(("zarr", self.path), opener, file_stamp(self.path))
            at = (0,) if self.timed else ()  # the one time point
            return np.asarray(array[(*at, slice(None), *index)] if self.channel_first else array[(*at, *index)][None])

        return read_region(self.path, region, block)
