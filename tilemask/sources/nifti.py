"""NIfTI volumes read by region with nibabel.

Uncompressed files are memory-mapped.  A compressed one (``.nii.gz``) is
decompressed once per worker process into a temporary file that is unlinked at
once (:func:`tilemask.sources.unpacked`), and read from there: the disk space comes back when
the process lets it go or dies.  Reading each block from the compressed stream
instead (``indexed_gzip`` seeks to the block's span) inflates every span once per
block that shares it: the blocks of a volume share their slabs of the slowest
axis on disk, so a 512^3 scan was inflated about 12 times over, 0.4-1.1 s a
block.  Where the temporary file cannot be written (a full disk), the stream is
read that way.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from typing import ClassVar

import nibabel as nib
import numpy as np

from ..errors import InputError, first_line
from ..formats import nifti_affine_mm
from ..geometry import Region, VolumeGeometry, affine_problem
from ..storage import local_copy
from . import ImageSource, Spool, cached_handle, file_stamp, read_region, unpacked

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
        local = None
        try:
            local = local_copy(path)  # an archive's member or an object: copied here once (storage)
            img = nib.load(local)
            shape = tuple(int(s) for s in img.shape)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except InputError:  # an object or a web server that cannot give the file, named by storage
            raise
        except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error...)
            # nibabel's "Cannot work out file type" for a .nii.gz is also what a damaged stream gives: read it
            # through (never for a refused header, which costs no decompression of a large scan)
            unknown = isinstance(exc, nib.filebasedimages.ImageFileError)
            damage = _gzip_damage(local) if unknown and local and _suffix(local) == ".gz" else None
            raise InputError(f"{path}: cannot open NIfTI: {damage or exc}") from None
        if len(shape) not in (3, 4):
            raise InputError(f"{path}: NIfTI with {len(shape)} axes; expected 3 (i, j, k) or 4 (i, j, k, channel)")
        stored = np.dtype(img.get_data_dtype())
        if stored.kind not in "biuf":  # an RGB (structured) or complex NIfTI: not one real value per voxel
            kind = "RGB" if stored.fields else stored.name
            raise InputError(f"{path}: NIfTI of {kind} voxels; tilemask reads one real value per voxel and channel")
        check_length(path, img, shape)
        geometry = nifti_geometry(path, img)
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
        return cls(path, shape, geometry, floating, volumes)

    @property
    def shape(self) -> tuple[int, ...]:
        channels = self.volume_shape[3] if len(self.volume_shape) == 4 else 1
        return (len(self.volumes) if self.volumes is not None else channels, *self.volume_shape[:3])

    @property
    def geometry(self) -> VolumeGeometry:
        return self.volume_geometry

    def read(self, region: Region) -> np.ndarray:
        index = tuple(slice(lo, hi) for lo, hi in region)

        def block() -> np.ndarray:
            img = _image(local_copy(self.path))
            if len(self.volume_shape) == 3:
                return np.asarray(img.dataobj[index])[None]
            if self.volumes is None:
                return np.moveaxis(np.asarray(img.dataobj[index]), -1, 0)
            # one volume at a time: nibabel reads a 4th-axis slice without the others
            return np.stack([np.asarray(img.dataobj[(*index, v)]) for v in self.volumes])

        return read_region(self.path, region, block, self._failure)

    def _failure(self, exc: BaseException) -> str:
        """What a read failed on: the copy of an object or a web server's file, storage's words without the path
        (it names it); else :func:`read_failure` (nibabel, gzip and zlib raise many types)."""
        if isinstance(exc, InputError):
            return first_line(exc).removeprefix(f"{self.path}: ")
        return read_failure(exc)


def nifti_geometry(path: str, img) -> VolumeGeometry:
    """The voxel-to-RAS affine in mm of a NIfTI image, as MONAI reads it (:func:`tilemask.formats.nifti_affine_mm`),
    refused now (exit 2) where it cannot place the voxels: not finite, or singular
    (:func:`tilemask.geometry.affine_problem`)."""
    affine = nifti_affine_mm(img)
    problem = affine_problem(affine)
    if problem:
        header = img.header
        origin = ("sform (srow_x, srow_y, srow_z)" if int(header["sform_code"]) else
                  "qform (quatern_b/c/d, qoffset_x/y/z, pixdim)" if int(header["qform_code"]) else
                  "pixdim (it has no sform or qform code)")  # fmt: skip
        raise InputError(f"{path}: its affine (voxel-to-world matrix) is not usable: {problem}; it is the header's "
                         f"{origin}")  # fmt: skip
    return VolumeGeometry(affine)


TRUNCATED = re.compile(r"Expected \d+ bytes, got \d+|n_bytes does not look right|Compressed file ended")


def read_failure(exc: BaseException) -> str:
    """What reading a NIfTI's voxels failed on, in a line: a file that ends before the voxels its header describes
    (nibabel's "Expected N bytes, got M", gzip's end of stream; cut short since :func:`check_length` passed it) is
    called truncated."""
    if isinstance(exc, EOFError) or TRUNCATED.search(str(exc)):
        return "the file is truncated: it ends before the voxels its header describes"
    return f"{type(exc).__name__}: {first_line(exc)}"


def _image(local: str):
    """The image whose voxels :meth:`NiftiSource.read` slices: memory-mapped where uncompressed, else
    decompressed once per process (:func:`tilemask.sources.unpacked`), else the compressed stream kept open
    per thread."""
    stamp = file_stamp(local)
    if nib.openers.Opener.compress_ext_map.get(_suffix(local)) is None:
        return cached_handle(("nifti", local), lambda: nib.load(local, keep_file_open=True, mmap=True), stamp)
    return unpacked((local, stamp), lambda spool: _decompressed(local, spool)) or cached_handle(
        ("nifti", local), lambda: nib.load(local, keep_file_open=True), stamp
    )


def _gzip_damage(local: str) -> str | None:
    """What is wrong with the gzip stream of ``local``, read to its end, else None. nibabel calls a .nii.gz whose
    stream is damaged in its middle a file of unknown type (indexed_gzip fails its look at the header)."""
    try:
        with gzip.open(local, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        return f"its gzip stream is damaged: {first_line(exc)}"
    return None


def _suffix(path: str) -> str:
    return "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""


def _decompressed(local: str, spool: Spool):
    """``local`` decompressed into ``spool``, as an image read through it (nibabel locks each seek and read)."""
    klass = type(nib.load(local))  # the header alone: NIfTI-1 or -2
    with nib.openers.Opener(local, "rb") as stream:
        shutil.copyfileobj(stream, spool, 1 << 24)
    return klass.from_file_map(klass.make_file_map({"image": spool.file}))


def check_length(path: str, img, shape: tuple[int, ...]) -> None:
    """A file shorter than its header says is refused now (exit 2), not when a block past its end is read
    (nibabel's "n_bytes does not look right" or "Expected N bytes, got M", exit 1)."""
    data_file = img.file_map["image"].filename
    if not data_file:
        return
    needed = int(img.dataobj.offset) + math.prod(shape) * np.dtype(img.get_data_dtype()).itemsize
    if str(data_file).endswith(".gz"):
        held = _gzip_short(path, str(data_file), needed)
        if held is not None:
            raise InputError(f"{path}: truncated: its header describes {needed} bytes, the file holds {held} once "
                             "decompressed")  # fmt: skip
        return
    held = os.path.getsize(data_file)
    if held < needed:
        raise InputError(f"{path}: truncated: its header describes {needed} bytes, the file holds {held}")


def _gzip_short(path: str, local: str, needed: int) -> int | None:
    """The bytes the gzipped ``local`` holds once decompressed where that is fewer than ``needed``, else None.

    The gzip trailer's last 4 bytes (the decompressed size mod 2^32) answer for a whole file; only where they
    disagree (a file cut short ends in other bytes, or one of several gzip members) is the stream inflated to
    count, up to ``needed``."""
    with open(local, "rb") as stream:
        stream.seek(-4, os.SEEK_END)
        if int.from_bytes(stream.read(4), "little") == needed % (1 << 32):
            return None
    held = 0
    try:
        with gzip.open(local, "rb") as stream:
            while held < needed and (chunk := stream.read1(1 << 20)):  # read1: what came before the end counts
                held += len(chunk)
    except EOFError:  # "Compressed file ended before the end-of-stream marker was reached": short
        pass
    except (OSError, zlib.error) as exc:  # a bad CRC, a damaged deflate stream
        raise InputError(f"{path}: the compressed file is damaged: {first_line(exc)}") from None
    return held if held < needed else None
