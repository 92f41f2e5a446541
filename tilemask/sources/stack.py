"""Several files as the channels of one input: nnU-Net's ``case_0000``, ``case_0001``, ... or the assets
of a STAC item.

Every file must be on the same grid (same spatial shape and geometry); the
channels are the files' channels in the order given.  A pixel is invalid only
where every file marks it invalid, as GDAL's mask of a multi-band raster
(``dataset_mask``) says for the same bands in one file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..geometry import Geometry, RasterGeometry, Region
from . import ImageSource


@dataclass(frozen=True)
class StackedSource(ImageSource):
    sources: tuple[ImageSource, ...]

    @classmethod
    def of(cls, sources: list[ImageSource]) -> StackedSource:
        first = sources[0]
        for other in sources[1:]:
            if other.spatial_shape != first.spatial_shape:
                raise InputError(
                    f"{other.path}: shape {list(other.spatial_shape)} differs from {first.path}'s "
                    f"{list(first.spatial_shape)}; the channels of one case must share a grid"
                )
            if not _same_grid(first.geometry, other.geometry):
                raise InputError(f"{other.path}: its grid (affine / transform) differs from {first.path}'s")
        return cls(tuple(sources))

    @property
    def path(self) -> str:
        return self.sources[0].path

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(s.channels for s in self.sources), *self.sources[0].spatial_shape)

    @property
    def geometry(self) -> Geometry:
        return self.sources[0].geometry

    @property
    def floating(self) -> bool:
        return any(s.floating for s in self.sources)

    @property
    def has_invalid(self) -> bool:
        return all(s.has_invalid for s in self.sources)

    def read(self, region: Region) -> np.ndarray:
        return _stacked([s.read(region) for s in self.sources])

    def read_valid(self, region: Region) -> np.ndarray | None:
        return _either([s.read_valid(region) for s in self.sources])

    def read_with_valid(self, region: Region) -> tuple[np.ndarray, np.ndarray | None]:
        """Each file's pixels and mask read together: a mask from nodata values comes from the pixels read."""
        blocks, masks = zip(*(s.read_with_valid(region) for s in self.sources))
        return _stacked(list(blocks)), _either(list(masks))


def _stacked(blocks: list[np.ndarray]) -> np.ndarray:
    dtype = np.result_type(*blocks)
    return np.concatenate([b.astype(dtype, copy=False) for b in blocks])


def _either(masks: list[np.ndarray | None]) -> np.ndarray | None:
    """Valid where any file's pixel is (None: every pixel, where a file marks none invalid)."""
    return None if any(m is None for m in masks) else np.logical_or.reduce(masks)


def _same_grid(a: Geometry, b: Geometry) -> bool:
    if isinstance(a, RasterGeometry) != isinstance(b, RasterGeometry):
        return False
    if isinstance(a, RasterGeometry):
        return a.crs_wkt == b.crs_wkt and np.allclose(a.transform, b.transform, rtol=0, atol=1e-6)
    return np.allclose(a.affine, b.affine, rtol=0, atol=1e-4)
