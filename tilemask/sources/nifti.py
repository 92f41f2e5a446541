"""NIfTI volumes read by region with nibabel.

Uncompressed files are memory-mapped.  ``.nii.gz`` files are opened through
``indexed_gzip`` (nibabel uses it when installed and the file is kept open), so
a region is read by seeking in the compressed stream instead of inflating the
whole file; the seek index is built once per worker and reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import nibabel as nib
import numpy as np

from ..errors import InputError, ReadError
from ..geometry import Region, VolumeGeometry
from . import ImageSource, cached_handle, file_stamp
from ..storage import local_copy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NiftiSource(ImageSource):
    """A 3D volume ``(1, i, j, k)`` or a 4D one with channels last on disk ``(C, i, j, k)``; ``volumes``
    selects some of a 4D file's volumes as the channels, in that order (``preprocess.bands``, 1-based)."""

    selects_bands: ClassVar[bool] = True

    path: str
    volume_shape: tuple[int, ...]
    volume_geometry: VolumeGeometry
    floating: bool = False  # float storage, or scaled by scl_slope / scl_inter
    volumes: tuple[int, ...] | None = None  # 0-based indexes of the 4th axis; None: all

    @classmethod
    def open(cls, path: str, bands: list[int] | None = None) -> NiftiSource:
        try:
            img = nib.load(local_copy(path))  # an archive's member or an object: copied here once (storage)
            shape = tuple(int(s) for s in img.shape)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error...)
            raise InputError(f"{path}: cannot open NIfTI: {exc}") from None
        if len(shape) not in (3, 4):
            raise InputError(f"{path}: NIfTI with {len(shape)} axes; expected 3 (i, j, k) or 4 (i, j, k, channel)")
        affine = tuple(tuple(float(v) for v in row) for row in img.affine)
        slope, inter = img.dataobj.slope, img.dataobj.inter
        scaled = slope not in (1, None) or inter not in (0, None)
        volumes = None
        if bands:
            count = shape[3] if len(shape) == 4 else 1
            bad = [b for b in bands if not 1 <= b <= count]
            if bad:
                raise InputError(f"{path}: preprocess.bands {bad} out of range: the file holds {count} volume(s)")
            volumes = tuple(b - 1 for b in bands)
        floating = np.dtype(img.get_data_dtype()).kind == "f" or scaled
        return cls(path, shape, VolumeGeometry(affine), floating, volumes)

    @property
    def shape(self) -> tuple[int, ...]:
        channels = self.volume_shape[3] if len(self.volume_shape) == 4 else 1
        return (len(self.volumes) if self.volumes is not None else channels, *self.volume_shape[:3])

    @property
    def geometry(self) -> VolumeGeometry:
        return self.volume_geometry

    def read(self, region: Region) -> np.ndarray:
        index = tuple(slice(lo, hi) for lo, hi in region)
        try:
            local = local_copy(self.path)
            img = cached_handle(("nifti", local, file_stamp(local)), lambda: nib.load(local, keep_file_open=True, mmap=True))
            if len(self.volume_shape) == 3:
                block = np.asarray(img.dataobj[index])[None]
            elif self.volumes is None:
                block = np.moveaxis(np.asarray(img.dataobj[index]), -1, 0)
            else:  # one volume at a time: nibabel reads a 4th-axis slice without the others
                block = np.stack([np.asarray(img.dataobj[(*index, v)]) for v in self.volumes])
            return block
        except Exception as exc:  # nibabel, gzip and zlib raise many types
            detail = f"{type(exc).__name__}: {exc}"
        raise ReadError(f"{self.path}: read failed at {region}: {detail}")
