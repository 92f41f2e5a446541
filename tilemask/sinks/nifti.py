"""NIfTI output: integer labels on the reference scan's exact grid.

The client writes a header (NIfTI-2 for a NIfTI-2 scan or a side over 32767, else
NIfTI-1; on the reference scan's grid, its qform, sform, codes, zooms and units as
they are; on another grid, its affine in mm as both, the qform without the shear of a tilted gantry's series,
:func:`unsheared`) and sizes
the data part of an uncompressed temporary file; workers write their chunks into
it with ``pwrite`` (NIfTI data is Fortran-ordered, so a chunk is a set of strided
runs of the file, and distinct chunks never share bytes).  The temporary file and
the compressed one are hidden staged siblings (:mod:`tilemask.outputs`); on commit
a ``.nii.gz`` is compressed by streaming the temporary file (constant memory),
then renamed into place.  The header's ``descrip`` says ``tilemask labels``, which
is how a later run knows it may replace the file, then ``; nodata 255`` when the
input had invalid voxels (their label: NIfTI has no field for it; tilemask's label
reader and ``tilemask stats`` read it there).  Labels carry NIfTI's ``NIFTI_INTENT_LABEL`` (NiiVue
colours each value apart) and ``cal_min`` / ``cal_max``, the display range (values above ``cal_max`` show as it),
0 to the last class or to the nodata label when there is one, and to at least 1: a one-class map's (0, 0) reads
as "not set" (nifti1.h: the fields are used "if nonzero").
Probabilities go to ``<stem>_probabilities.nii.gz``, 4D with classes last, their ``descrip``
``tilemask probabilities``; uint8 ones are ``round(p * 255)`` with ``scl_slope`` 1/255 (``; round(p * 255)`` in the
``descrip``), so nibabel's ``get_fdata``, MONAI's ``LoadImage`` and SimpleITK read 0-1 (until 2026-12-07 they read
0-255: no slope, and the labels' ``descrip``); ``cal_min`` / ``cal_max`` 0 and 1, in those scaled values.  The class
names and colours go to ``<stem>.colors.csv``, a 3D Slicer colour table, published with the labels.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..classes import write_colour_table
from ..errors import OutputError, first_line
from ..formats import for_path, nifti_affine_mm, nifti_descrip, nifti_probabilities_descrip
from ..geometry import Region
from ..outputs import publish, remove, staged_path
from ..storage import local_copy
from . import LabelSink, OutputLayout

logger = logging.getLogger(__name__)

VOX_OFFSETS = {348: 352, 540: 544}  # by header size, NIfTI-1 and NIfTI-2: the header + a 4-byte "no extensions" flag
NIFTI1_MAX_DIM = 32767  # NIfTI-1's dim fields are int16
COPY_BLOCK = 16 << 20
GRID_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
               "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")  # fmt: skip
COMPRESS_LEVEL = nib.openers.Opener.default_compresslevel  # nibabel's, so as nib.save (and MONAI's SaveImage): 1


def unsheared(affine: np.ndarray) -> np.ndarray:
    """The qform of a grid whose slices step off their normal (a tilted gantry's series): the slices' own axes and
    step length, the step along their normal, where ITK (SimpleITK, nnU-Net's reader) puts the series;
    nibabel's ``set_qform`` of the sheared affine made a rotated compromise that ITK read 4.3 mm off the series at
    the 14th slice of a 15-degree tilt, and no qform (code 0) is refused by ITK.  Any other affine as it is."""
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    lengths = np.linalg.norm(matrix, axis=0)
    if not lengths.all():
        return affine
    rows, columns, step = (matrix / lengths).T
    normal = np.cross(rows, columns)
    if abs(rows @ columns) > 1e-6 or np.linalg.norm(np.cross(normal, step)) <= 1e-6:
        return affine  # the slices' axes not at right angles (nibabel's compromise), or no shear
    qform = np.array(affine, dtype=np.float64)
    qform[:3, 2] = normal / np.linalg.norm(normal) * np.sign(normal @ step) * lengths[2]
    return qform


def reference_image(reference: str):
    """The scan's NIfTI image (its header), None when the scan is no NIfTI (a DICOM series, a Zarr volume: scanner
    coordinates). A scan on a web server, in object storage or in an archive is read from the copy its reader made
    when it was opened (:func:`tilemask.storage.local_copy`, made once): ``nib.load`` of its URL failed, and its
    labels held the sform in both, codes 1, which SimpleITK put 5.9 mm from where it put the scan (its qform)."""
    if for_path(reference).name != "nifti":
        return None
    try:
        return nib.load(local_copy(reference))
    except Exception as exc:  # noqa: BLE001 - a header nibabel cannot load: the labels' grid is tilemask's
        logger.warning("%s: cannot read its NIfTI header (%s); the labels' qform and sform are tilemask's grid",
                       reference, first_line(exc))  # fmt: skip
        return None


@dataclass(frozen=True)
class NiftiVolume:
    """One NIfTI file being assembled: its final path and its uncompressed temporary twin."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    run_id: str
    nodata: int | None = None  # the labels of invalid voxels, recorded in the header's descrip
    display: tuple[float, float] = (0.0, 0.0)  # the header's cal_min and cal_max: the values' range, for viewers
    intent: str = "none"  # the header's intent code, nibabel's name for it: "label" for labels
    slope: float = 1.0  # the header's scl_slope: what readers multiply the stored values by (1/255: uint8 p)
    descrip: bytes | None = None  # the header's descrip; None: the labels' (with their nodata)

    @property
    def partial(self) -> str:
        """The uncompressed file workers write into."""
        return staged_path(self.path, self.run_id) + ".raw.nii"

    def create(self, reference: str, affine: np.ndarray) -> None:
        """Write the header and size the file: NIfTI-2 for a NIfTI-2 scan (its qform in float64, as it is) or a
        side over NIfTI-1's 32767, else NIfTI-1."""
        ref = reference_image(reference)
        nifti2 = isinstance(ref, nib.Nifti2Image) or max(self.shape) > NIFTI1_MAX_DIM
        header = nib.Nifti2Header() if nifti2 else nib.Nifti1Header()
        header.set_data_shape(self.shape)
        header.set_data_dtype(np.dtype(self.dtype))
        if ref is not None and ref.shape[:3] == self.shape[:3] and np.allclose(nifti_affine_mm(ref), affine, atol=1e-4):
            for field in GRID_FIELDS:  # the scan's grid as it says it, each reader's choice of qform or sform kept
                header[field] = ref.header[field]
            header["pixdim"][:4] = ref.header["pixdim"][:4]
        else:  # another grid (the model's): tilemask's, in mm
            codes = (int(ref.header["sform_code"]) or 1, int(ref.header["qform_code"]) or 1) if ref else (1, 1)
            header.set_sform(affine, code=codes[0])
            header.set_qform(unsheared(affine), code=codes[1])
            header.set_xyzt_units("mm", "sec")
        vox_offset = VOX_OFFSETS[len(header.binaryblock)]
        header["vox_offset"] = vox_offset
        header.set_slope_inter(self.slope, 0.0)
        header["descrip"] = nifti_descrip(self.nodata) if self.descrip is None else self.descrip
        header["cal_min"], header["cal_max"] = self.display
        header.set_intent(self.intent)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "wb") as f:
            f.write(header.binaryblock)
            f.write(b"\0" * (vox_offset - len(header.binaryblock)))
            f.truncate(vox_offset + int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize)

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
        run_axes = 1
        while run_axes < ndim and starts[run_axes - 1] == 0 and stops[run_axes - 1] == self.shape[run_axes - 1]:
            run_axes += 1
        itemsize = np.dtype(self.dtype).itemsize
        # the region's bytes in file order: its runs one after the other, each at its own offset in the file
        data = memoryview(np.asarray(values, dtype=self.dtype).tobytes(order="F"))
        run = int(np.prod([stops[a] - starts[a] for a in range(run_axes)])) * itemsize
        outer = np.meshgrid(*[np.arange(starts[a], stops[a]) for a in range(run_axes, ndim)], indexing="ij")
        first = int(np.dot(starts[:run_axes], strides[:run_axes]))
        offsets = sum((c.ravel(order="F") * strides[a] for a, c in enumerate(outer, start=run_axes)), np.int64(first))
        fd = os.open(self.partial, os.O_RDWR)
        try:
            vox_offset = VOX_OFFSETS[int.from_bytes(os.pread(fd, 4, 0), "little")]  # NIfTI-1 or -2, as create chose
            for i, offset in enumerate((vox_offset + np.atleast_1d(offsets) * itemsize).tolist()):
                os.pwrite(fd, data[i * run : (i + 1) * run], offset)
        finally:
            os.close(fd)

    @property
    def finished(self) -> str:
        """The whole file, ready to be renamed onto ``path``."""
        return staged_path(self.path, self.run_id) if self.path.endswith(".gz") else self.partial

    def finish(self) -> None:
        """Compress a ``.nii.gz`` by streaming the uncompressed file (constant memory), at nibabel's level.  The
        uncompressed file is removed only once the compressed one is whole, so a finish that Dask runs again (its
        worker died) finds a volume without it done: skipped where the compressed volume is whole
        (:meth:`compressed_whole`); with neither, the uncompressed file's absence is the failure."""
        if not self.path.endswith(".gz") or (not os.path.exists(self.partial) and self.compressed_whole()):
            return
        with open(self.partial, "rb") as src, gzip.open(self.finished, "wb", compresslevel=COMPRESS_LEVEL) as dst:
            shutil.copyfileobj(src, dst, COPY_BLOCK)
        remove(self.partial)

    def compressed_whole(self) -> bool:
        """Whether the compressed volume ends as a whole one does: its gzip trailer's size (modulo 2**32) is the
        header's and the data's. A compression cut short ends otherwise; with its uncompressed file gone (removed by
        hand) a finish had published it (exit 0), and nibabel read it as ``Expected 120000 bytes, got 45151``."""
        try:
            with gzip.open(self.finished, "rb") as f:
                vox_offset = VOX_OFFSETS.get(int.from_bytes(f.read(4), "little"))
            with open(self.finished, "rb") as f:
                f.seek(-4, os.SEEK_END)
                size = int.from_bytes(f.read(4), "little")
        except (OSError, EOFError, zlib.error):  # none, not gzip, or its deflate stream damaged from the start
            return False
        data = int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
        return vox_offset is not None and size == (vox_offset + data) % 2**32

    def publish(self) -> None:
        publish(self.finished, self.path)

    def abort(self) -> None:
        remove(self.partial)
        remove(staged_path(self.path, self.run_id))


@dataclass(frozen=True)
class NiftiSink(LabelSink):
    path: str
    layout: OutputLayout

    @property
    def volumes(self) -> tuple[NiftiVolume, NiftiVolume | None]:
        layout = self.layout
        top = max(1, len(layout.class_names) - 1, layout.nodata or 0)  # every value shown, none clipped
        labels = NiftiVolume(self.path, layout.shape, layout.labels_dtype, layout.run_id, layout.nodata,
                             display=(0, top), intent="label")  # fmt: skip
        if not layout.writes_probabilities:
            return labels, None
        stored = layout.probabilities_dtype
        probabilities = NiftiVolume(
            for_path(self.path).probabilities_path(self.path),
            (*layout.shape, layout.probability_channels),
            stored,
            layout.run_id,
            display=(0, 1),  # p, as readers scale uint8 ones (cal_min and cal_max are in scaled values)
            slope=1 / 255 if stored == "uint8" else 1.0,  # round(p * 255) read back as p
            descrip=nifti_probabilities_descrip(stored),
        )
        return labels, probabilities

    @property
    def class_table(self) -> str:
        return for_path(self.path).class_table_path(self.path)

    def create(self) -> None:
        affine = np.asarray(getattr(self.layout.geometry, "affine", np.eye(4)), dtype=np.float64)
        if len(self.layout.shape) != 3:
            raise OutputError(f"{self.path}: NIfTI output needs a 3D image, this one is {len(self.layout.shape)}D")
        for volume in self.volumes:
            if volume is not None:
                volume.create(self.layout.reference, affine)
        write_colour_table(staged_path(self.class_table, self.layout.run_id), self.layout.class_names)

    def write(self, region: Region, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        index = tuple(slice(lo, hi) for lo, hi in region)
        label_volume, probability_volume = self.volumes
        label_volume.write(index, labels)
        if probability_volume is not None and probabilities is not None:
            probability_volume.write((*index, slice(None)), np.moveaxis(probabilities, 0, -1))

    def finish(self) -> None:
        for volume in self.volumes:
            if volume is not None:
                volume.finish()

    def publish(self) -> list[str]:
        """Every file is finished before any is renamed: new labels never stand beside old probabilities."""
        volumes = [v for v in self.volumes if v is not None]
        replaced = os.path.exists(self.path)
        for volume in volumes:
            volume.publish()
        self.remove_stale_probabilities(replaced)
        publish(staged_path(self.class_table, self.layout.run_id), self.class_table)
        return [volume.path for volume in volumes] + [self.class_table]

    def abort(self) -> None:
        for volume in self.volumes:
            if volume is not None:
                volume.abort()
        remove(staged_path(self.class_table, self.layout.run_id))
