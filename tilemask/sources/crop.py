"""A box of a volume as a volume of its own: nnU-Net's ``crop_to_nonzero`` (``preprocess.crop: nonzero``).

Its voxel ``v`` is the volume's ``v + box start``, and its affine places it where the volume has it, so the model
grid of the box (:func:`tilemask.spatial.model_grid`) is the grid nnU-Net resamples the cropped array onto.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Region, VolumeGeometry
from . import ImageSource


@dataclass(frozen=True)
class CroppedSource(ImageSource):
    source: ImageSource
    box: Region  # in the source's voxels, inside it

    @property
    def path(self) -> str:  # type: ignore[override]
        return self.source.path

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.source.channels, *(hi - lo for lo, hi in self.box))

    @property
    def geometry(self) -> VolumeGeometry:
        shift = np.eye(4)
        shift[:3, 3] = [lo for lo, _ in self.box]
        affine = np.asarray(self.source.geometry.affine, dtype=float) @ shift
        return VolumeGeometry(tuple(tuple(float(v) for v in row) for row in affine))

    @property
    def has_invalid(self) -> bool:
        return self.source.has_invalid

    @property
    def floating(self) -> bool:
        return self.source.floating

    def read(self, region: Region) -> np.ndarray:
        return self.source.read(self._in_source(region))

    def read_valid(self, region: Region) -> np.ndarray | None:
        return self.source.read_valid(self._in_source(region))

    def read_with_valid(self, region: Region) -> tuple[np.ndarray, np.ndarray | None]:
        return self.source.read_with_valid(self._in_source(region))

    def _in_source(self, region: Region) -> Region:
        return tuple((lo + start, hi + start) for (lo, hi), (start, _) in zip(region, self.box))
