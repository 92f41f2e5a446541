"""NIfTI output: integer labels on the reference scan's exact grid.

The client writes a header (the reference image's affine as both sform and qform,
its units) and sizes the data part of an uncompressed temporary file; workers
write their chunks into it with ``pwrite`` (NIfTI data is Fortran-ordered, so a
chunk is a set of strided runs of the file, and distinct chunks never share
bytes).  On commit a ``.nii.gz`` is compressed by streaming the
temporary file (constant memory), then renamed into place.  Probabilities go to
``<stem>_probabilities.nii.gz``, 4D with classes last.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import OutputError
from ..geometry import Region
from . import LabelSink, OutputLayout

logger = logging.getLogger(__name__)

VOX_OFFSET = 352  # 348-byte header + 4-byte "no extensions" flag
COPY_BLOCK = 16 << 20


@dataclass(frozen=True)
class NiftiVolume:
    """One NIfTI file being assembled: its final path and its uncompressed temporary twin."""

    path: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def partial(self) -> str:
        p = Path(self.path)
        return str(p.with_name(f".{p.name}.partial.nii"))

    def create(self, reference: str, affine: np.ndarray) -> None:
        header = nib.Nifti1Header()
        try:
            ref = nib.load(reference).header
            header.set_xyzt_units(*ref.get_xyzt_units())
            codes = int(ref["sform_code"]) or 1, int(ref["qform_code"]) or 1
        except Exception:  # the reference is not a NIfTI (a Zarr volume): scanner coordinates
            codes = 1, 1
        header.set_data_shape(self.shape)
        header.set_data_dtype(np.dtype(self.dtype))
        header.set_sform(affine, code=codes[0])
        header.set_qform(affine, code=codes[1])
        header["vox_offset"] = VOX_OFFSET
        header.set_slope_inter(1.0, 0.0)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "wb") as f:
            f.write(header.binaryblock)
            f.write(b"\0" * (VOX_OFFSET - len(header.binaryblock)))
            f.truncate(VOX_OFFSET + int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize)

    def write(self, index: tuple[slice, ...], values: np.ndarray) -> None:
        """Write ``values`` at ``index`` with ``pwrite`` of its contiguous runs.

        NIfTI data is Fortran-ordered: a run spans the first axis of the region,
        and the following axes too while the region covers them whole.  Writing
        bytes (not memory-mapped pages) keeps concurrent writers of neighbouring
        chunks from overwriting each other, also on network file systems.
        """
        ndim = len(self.shape)
        starts = [s.start or 0 for s in index]
        stops = [self.shape[a] if s.stop is None else s.stop for a, s in enumerate(index)]
        strides = np.cumprod((1, *self.shape[:-1]))  # elements, Fortran order
        block = np.asarray(values, dtype=self.dtype)
        run_axes = 1
        while run_axes < ndim and starts[run_axes - 1] == 0 and stops[run_axes - 1] == self.shape[run_axes - 1]:
            run_axes += 1
        itemsize = np.dtype(self.dtype).itemsize
        fd = os.open(self.partial, os.O_WRONLY)
        try:
            outer_ranges = [range(starts[a], stops[a]) for a in range(run_axes, ndim)]
            for outer in itertools.product(*outer_ranges):
                coords = [*starts[:run_axes], *outer]
                local = (slice(None),) * run_axes + tuple(c - starts[a] for a, c in enumerate(outer, start=run_axes))
                data = block[local].tobytes(order="F")
                os.pwrite(fd, data, VOX_OFFSET + int(np.dot(coords, strides)) * itemsize)
        finally:
            os.close(fd)

    def commit(self) -> None:
        if self.path.endswith(".gz"):
            staged = self.partial + ".gz"
            with open(self.partial, "rb") as src, gzip.open(staged, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst, COPY_BLOCK)
            os.replace(staged, self.path)
            os.remove(self.partial)
        else:
            os.replace(self.partial, self.path)

    def abort(self) -> None:
        for leftover in (self.partial, self.partial + ".gz"):
            if os.path.exists(leftover):
                os.remove(leftover)


@dataclass(frozen=True)
class NiftiSink(LabelSink):
    path: str
    layout: OutputLayout

    @property
    def volumes(self) -> tuple[NiftiVolume, NiftiVolume | None]:
        layout = self.layout
        labels = NiftiVolume(self.path, layout.shape, layout.labels_dtype)
        if not layout.writes_probabilities:
            return labels, None
        name = Path(self.path).name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
        probabilities = NiftiVolume(
            str(Path(self.path).with_name(f"{stem}_probabilities.nii.gz")),
            (*layout.shape, layout.probability_channels),
            layout.probabilities_dtype,
        )
        return labels, probabilities

    def create(self) -> None:
        affine = np.asarray(getattr(self.layout.geometry, "affine", np.eye(4)), dtype=np.float64)
        if len(self.layout.shape) != 3:
            raise OutputError(f"{self.path}: NIfTI output needs a 3D image, this one is {len(self.layout.shape)}D")
        for volume in self.volumes:
            if volume is not None:
                volume.create(self.layout.reference, affine)

    def write(self, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        index = tuple(slice(lo, hi) for lo, hi in region)
        label_volume, probability_volume = self.volumes
        label_volume.write(index, labels)
        if probability_volume is not None and probabilities is not None:
            probability_volume.write((*index, slice(None)), np.moveaxis(probabilities, 0, -1))

    def commit(self) -> list[str]:
        written = []
        for volume in self.volumes:
            if volume is not None:
                volume.commit()
                written.append(volume.path)
        return written

    def abort(self) -> None:
        for volume in self.volumes:
            if volume is not None:
                volume.abort()
