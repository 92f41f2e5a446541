"""Zarr arrays (v2 or v3) read by region.

An array of ``spatial_dims`` axes is one channel; one with an extra leading axis
is channel-first.  Geometry comes from tilemask's own attributes when present
(``crs`` + ``transform`` for rasters, ``affine`` for volumes), else identity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import zarr

from ..errors import InputError, ReadError
from ..geometry import Geometry, Region, geometry_from_attrs
from . import ImageSource, cached_handle, file_stamp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZarrSource(ImageSource):
    path: str
    array_shape: tuple[int, ...]
    channel_first: bool
    zarr_geometry: Geometry
    floating: bool = False

    @classmethod
    def open(cls, path: str, spatial_dims: int) -> ZarrSource:
        try:
            node = zarr.open(path, mode="r")
        except Exception as exc:
            raise InputError(f"{path}: cannot open Zarr: {exc}") from None
        if isinstance(node, zarr.Group):
            raise InputError(f"{path}: is a Zarr group; give the path of the array inside it")
        shape = tuple(int(s) for s in node.shape)
        if len(shape) not in (spatial_dims, spatial_dims + 1):
            raise InputError(f"{path}: Zarr array with {len(shape)} axes for a {spatial_dims}D model")
        geometry = geometry_from_attrs(dict(node.attrs), spatial_dims)
        return cls(path, shape, len(shape) == spatial_dims + 1, geometry, np.dtype(node.dtype).kind == "f")

    @classmethod
    def open_ome(cls, path: str, spatial_dims: int) -> ZarrSource:
        """An OME-Zarr image: the first level of its first multiscale, with that level's scale as its grid."""
        from ..geometry import ome_geometry

        try:
            group = zarr.open_group(path, mode="r")
            attrs = dict(group.attrs)
            multiscale = attrs.get("ome", attrs)["multiscales"][0]
        except Exception as exc:
            raise InputError(f"{path}: not an OME-Zarr image: {exc}") from None
        kinds = [a.get("type") if isinstance(a, dict) else a for a in multiscale.get("axes", [])]
        if "time" in kinds or kinds.count("channel") > 1:
            raise InputError(f"{path}: OME-Zarr axes {kinds}: tilemask reads channel and space axes only")
        try:
            level0 = multiscale["datasets"][0]["path"]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{path}: an OME-Zarr multiscale without datasets") from None
        source = cls.open(f"{path.rstrip('/')}/{level0}", spatial_dims)
        geometry = geometry_from_attrs(attrs, spatial_dims) if "tilemask" in attrs else ome_geometry(multiscale, spatial_dims)
        return cls(source.path, source.array_shape, source.channel_first, geometry, source.floating)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array_shape if self.channel_first else (1, *self.array_shape)

    @property
    def geometry(self) -> Geometry:
        return self.zarr_geometry

    def read(self, region: Region) -> np.ndarray:
        index = tuple(slice(lo, hi) for lo, hi in region)
        try:
            array = cached_handle(("zarr", self.path, file_stamp(self.path)), lambda: zarr.open_array(self.path, mode="r"))
            block = array[(slice(None), *index)] if self.channel_first else array[index][None]
            return np.asarray(block)
        except Exception as exc:  # codecs and stores raise many types
            detail = f"{type(exc).__name__}: {exc}"
        raise ReadError(f"{self.path}: read failed at {region}: {detail}")
