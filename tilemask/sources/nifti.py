"""NIfTI volumes read by region with nibabel.

Uncompressed files are memory-mapped.  A compressed one (``.nii.gz``) is
decompressed once per worker process into a temporary file that is unlinked at
once (:func:`_unpacked`), and read from there: the disk space comes back when
the process lets it go or dies.  Reading each block from the compressed stream
instead (``indexed_gzip`` seeks to the block's span) inflates every span once per
block that shares it: the blocks of a volume share their slabs of the slowest
axis on disk, so a 512^3 scan was inflated about 12 times over, 0.4-1.1 s a
block.  Where the temporary file cannot be written (a full disk), the stream is
read that way.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections import OrderedDict
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
            img = _image(local_copy(self.path))
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


UNPACKED_PER_PROCESS = 2  # decompressed volumes a process keeps: the one in work and the next input's
_unpacked_images: OrderedDict[tuple, nib.Nifti1Image | None] = OrderedDict()  # None: could not be written
_unpacked_lock = threading.Lock()
unpacks = 0  # compressed files this process has decompressed (once each while kept)


def _image(local: str):
    """The image whose voxels :meth:`NiftiSource.read` slices: memory-mapped where uncompressed, else
    :func:`_unpacked`, else (no room for it) the compressed stream kept open per thread."""
    key = (local, file_stamp(local))
    if nib.openers.Opener.compress_ext_map.get(_suffix(local)) is None:
        return cached_handle(("nifti", *key), lambda: nib.load(local, mmap=True))
    return _unpacked(key) or cached_handle(("nifti", *key), lambda: nib.load(local, keep_file_open=True))


def _suffix(path: str) -> str:
    return "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""


def _unpacked(key: tuple):
    """The compressed file ``key[0]`` decompressed into an unlinked temporary file, once per process, as an
    image read through that file (nibabel locks each seek and read); None when it cannot be written."""
    global unpacks
    with _unpacked_lock:
        if key in _unpacked_images:
            _unpacked_images.move_to_end(key)
            return _unpacked_images[key]
        local = key[0]
        klass = type(nib.load(local))  # the header alone: NIfTI-1 or -2
        try:
            spool = _decompressed(local)
        except OSError as exc:  # not tried again for this file: a full disk would fill up once per block
            logger.warning("%s: cannot decompress it into a temporary file (%s): reading the compressed stream",
                           local, exc)  # fmt: skip
            image = None
        else:
            image = klass.from_file_map(klass.make_file_map({"image": spool}))
            unpacks += 1
        _unpacked_images[key] = image
        while len(_unpacked_images) > UNPACKED_PER_PROCESS:
            # not closed here: a thread may still be reading it; its file closes (and, unlinked, gives its
            # space back) when the last reader lets it go
            _unpacked_images.popitem(last=False)
        return image


def _decompressed(local: str):
    """An unlinked temporary file holding ``local`` decompressed (closed again if that fails)."""
    spool = tempfile.TemporaryFile(prefix="tilemask-nifti-")
    try:
        with nib.openers.Opener(local, "rb") as stream:
            shutil.copyfileobj(stream, spool, 1 << 24)
    except BaseException:
        spool.close()
        raise
    return spool
